"""torch Datasets over the rendered benchmark, the paper's augmentation (done on whole batches, on the
GPU when there is one), and the ground-truth meshes a batch needs (posed on the fly from the stored
pose and shape: 50k meshes of 13k vertices would not fit on disk, a batch of them costs milliseconds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import crop_camera_rotation

#: mirror across the image's vertical axis, in the camera frame and in the body frame (both x)
MIRROR_X = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))


class BenchmarkDataset(torch.utils.data.Dataset):
    """A split held in memory (uint8 images); items are dicts of tensors, collated by the default
    collate function. ``keys`` restricts what an item carries."""

    KEYS = ("image", "joints2d_24", "joints2d_17", "root_rot", "trans", "K", "bbox", "pose", "shape", "valid",
            "light", "occlusion", "in_frame", "yaw", "subject")

    def __init__(self, arrays: dict[str, np.ndarray], keys: tuple[str, ...] | None = None):
        self.arrays = {k: arrays[k] for k in (keys or self.KEYS) if k in arrays}
        self.n = len(arrays["image"])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = {k: torch.as_tensor(np.asarray(v[idx])) for k, v in self.arrays.items()}
        item["index"] = torch.tensor(idx)
        return item


@dataclass
class Augmentation:
    """The paper's augmentation: flip, in-plane rotation of +-60 deg with p=0.4 (a roll of the crop's
    camera about its ray: a 2D rotation about the crop centre for a crop on the optical axis), scale
    +-25%, blur and colour jitter."""

    flip_prob: float = 0.5
    rot_prob: float = 0.4
    rot_deg: float = 60.0
    scale: float = 0.25
    blur_prob: float = 0.2
    color_jitter: float = 0.2


#: the camera frames a model's rotation and meshes may be in: the crop's own camera (looking through
#: the box centre, all a crop-only network can see) or the full frame's camera (CLIFF, evaluation)
FRAMES = ("crop", "camera")


def rotation_target(batch: dict, frame: str = "crop") -> torch.Tensor:
    """The ground-truth (B,3,3) rotation of a prepared batch in ``frame``: "crop" -> ``crop_rot`` (a
    batch without one has no box: its crop's camera is the camera, ``root_rot``), "camera" -> ``root_rot``."""
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; use one of {FRAMES}")
    key = "crop_rot" if frame == "crop" and "crop_rot" in batch else "root_rot"
    return batch[key].float()


def pixels_to_unit(joints2d: torch.Tensor, size: int) -> torch.Tensor:
    """Crop pixels (centres at integers) -> [-1, 1] (the crop's outer edges at -1 and 1)."""
    return (joints2d + 0.5) * (2.0 / size) - 1.0


def unit_to_pixels(joints2d: torch.Tensor, size: int) -> torch.Tensor:
    return (joints2d + 1.0) * (size / 2.0) - 0.5


def prepare_batch(batch: dict, body, device: torch.device, aug: Augmentation | None = None,
                  generator: torch.Generator | None = None, flip_index24: torch.Tensor | None = None,
                  flip_index17: torch.Tensor | None = None, channels_last: bool = False) -> dict:
    """Move a collated batch to ``device``, augment it and attach targets. Images stay in [0, 1]: each
    backbone normalises its input with its own weights' statistics (``vqhps.models.backbone``).

    Adds: ``image`` (B,3,S,S) float in [0, 1], ``joints2d`` (B,24,2) in [-1,1], ``joints2d_17``,
    ``root_rot`` and ``crop_rot`` (below), ``canonical`` (B,V,3) ground-truth canonical mesh (mirrored
    when the sample was flipped), ``flipped`` (B,) bool; ``bbox`` and ``trans`` become the augmented ones.

    Every label is the augmented image's. With Rc = ``crop_camera_rotation(bbox, K)`` (the camera
    looking through the box centre; the identity for a batch without ``bbox`` and ``K``),
    ``crop_rot = Rc^T root_rot`` is the rotation seen in the crop's own camera, what a crop-only network
    can know. A flip mirrors the whole frame about the principal point's column (bbox x -> 2 px - x,
    root_rot -> M root_rot M, crop_rot -> M crop_rot M, M = diag(-1, 1, 1)); a rotation by theta rolls
    the crop's camera about its ray through the crop centre (crop_rot -> Rz(theta) crop_rot, root_rot ->
    Rc Rz(theta) Rc^T root_rot; image and joints move by that roll's homography, see ``_geometric``); a
    scale by s about the crop centre divides the bbox side by s about its centre (rotations unchanged).
    ``trans`` moves as the body does (M trans, Rc Rz(theta) Rc^T trans). Each is exact: the labels
    reproject through K and the bbox onto the augmented joints."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    images = out["image"].permute(0, 3, 1, 2).float() / 255.0
    b, _, size, _ = images.shape
    j24, j17 = out["joints2d_24"].float(), out["joints2d_17"].float()
    rot = out["root_rot"].float()
    has_box = "bbox" in out and "K" in out
    rc = crop_camera_rotation(out["bbox"], out["K"]).float() if has_box else None
    crop_rot = _to_crop(rot, rc)
    flipped = torch.zeros(b, dtype=torch.bool, device=device)
    if aug is not None:
        # the draws come from the CPU generator (the same numbers on every device) and reach the GPU
        # without a host synchronisation, so preparing a batch never stalls the queued training step
        rand_cpu = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
        rand = lambda *shape: _to(rand_cpu(*shape), device)  # noqa: E731
        flipped = rand(b) < aug.flip_prob
        # geometry: flip, then rotate by theta and scale by s about the crop centre
        theta = torch.where(rand(b) < aug.rot_prob, (rand(b) * 2 - 1) * math.radians(aug.rot_deg),
                            torch.zeros(b, device=device))
        scale = 1.0 + (rand(b) * 2 - 1) * aug.scale
        box = (out["bbox"], out["K"]) if has_box else (None, None)
        images, j24, j17, crop_rot = _geometric(images, j24, j17, crop_rot, flipped, theta, scale,
                                                _to(flip_index24, device), _to(flip_index17, device), *box)
        images = _photometric(images, aug, rand, rand_cpu)
        trans = None
        if "trans" in out:  # the body's position moves with it: mirrored, then rolled in the crop's camera
            trans = _to_crop(out["trans"].float()[..., None], rc)
            mirrored = _to(MIRROR_X, device) @ trans
            trans = roll_matrix(theta) @ torch.where(flipped.view(b, 1, 1), mirrored, trans)
        if has_box:
            out["bbox"] = augment_bbox(out["bbox"], out["K"], flipped, scale)
            rc = crop_camera_rotation(out["bbox"], out["K"]).float()
        rot = _from_crop(crop_rot, rc)
        if trans is not None:
            out["trans"] = _from_crop(trans, rc)[..., 0]
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    out.update(image=images, joints2d=pixels_to_unit(j24, size), joints2d_17=pixels_to_unit(j17, size),
               root_rot=rot, crop_rot=crop_rot, flipped=flipped)
    if body is not None:
        out["canonical"] = canonical_targets(body, out["pose"], out["shape"], flipped)
    return out


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without synchronising the host with the GPU (the copy is
    staged at once, so the host tensor may go)."""
    return t.to(device, non_blocking=True)


def canonical_targets(body, pose: torch.Tensor, shape: torch.Tensor, flipped: torch.Tensor | None = None) -> torch.Tensor:
    """Ground-truth canonical meshes (centred on the vertex mean) posed from stored parameters."""
    device = body.template.device
    with torch.no_grad():
        verts = body(pose.to(device).float(), shape.to(device).float()).vertices
        verts = verts - verts.mean(1, keepdim=True)
        if flipped is not None:  # no `flipped.any()` shortcut: reading it back would stall the GPU queue
            mirrored = verts[:, body.vertex_flip] * _to(MIRROR_X.diagonal(), device).to(verts.dtype)
            verts = torch.where(_to(flipped, device)[:, None, None], mirrored, verts)
    return verts


def _to_crop(x: torch.Tensor, rc: torch.Tensor | None) -> torch.Tensor:
    """Camera-frame rotations or column vectors (B,3,k) -> the crop's camera frame (``Rc^T x``)."""
    return x if rc is None else rc.transpose(1, 2) @ x


def _from_crop(x: torch.Tensor, rc: torch.Tensor | None) -> torch.Tensor:
    """Crop-frame rotations or column vectors (B,3,k) -> the camera frame (``Rc x``)."""
    return x if rc is None else rc @ x


def roll_matrix(theta: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B,3,3) Rz(theta): the roll of a camera whose image turns by theta (x right,
    y down, so positive theta turns the image clockwise on screen)."""
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero, one = torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack((cos, -sin, zero, sin, cos, zero, zero, zero, one), dim=-1).reshape(-1, 3, 3)


def augment_bbox(bbox: torch.Tensor, K: torch.Tensor, flipped: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B,4) boxes of the augmented crops: mirrored about the principal point's column where flipped
    (the box of the mirrored full frame), then the side divided by ``scale`` about the centre (a crop
    magnified s times about its centre shows 1/s of the box). An in-plane rotation keeps the box."""
    bbox, px = bbox.float(), K.float()[:, 0, 2]
    mirrored = torch.stack((2 * px - bbox[:, 2], bbox[:, 1], 2 * px - bbox[:, 0], bbox[:, 3]), dim=-1)
    bbox = torch.where(flipped.view(-1, 1), mirrored, bbox)
    centre = (bbox[:, :2] + bbox[:, 2:]) / 2
    half = (bbox[:, 2:] - bbox[:, :2]) / (2 * scale.to(bbox.dtype).view(-1, 1))
    return torch.cat((centre - half, centre + half), dim=-1)


def crop_intrinsics(bbox: torch.Tensor, K: torch.Tensor, size: int) -> torch.Tensor:
    """(B,3,3) pinhole intrinsics of the crops: full-frame ``K`` followed by each box's crop affine
    (``vqhps.data.sample.crop_affine``: box edges on the crop's outer pixel edges)."""
    bbox, K = bbox.float(), K.float().expand(bbox.shape[0], 3, 3)
    sx, sy = size / (bbox[:, 2] - bbox[:, 0]), size / (bbox[:, 3] - bbox[:, 1])
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    affine = torch.stack((sx, zero, -bbox[:, 0] * sx - 0.5, zero, sy, -bbox[:, 1] * sy - 0.5, zero, zero, one),
                         dim=-1).reshape(-1, 3, 3)
    return affine @ K


def _pinhole_inverse(K: torch.Tensor) -> torch.Tensor:
    """Inverse of (B,3,3) upper-triangular pinhole intrinsics, written out (no host-side error check)."""
    a, b, c, d, e = K[:, 0, 0], K[:, 0, 1], K[:, 0, 2], K[:, 1, 1], K[:, 1, 2]
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack((1 / a, -b / (a * d), (b * e - c * d) / (a * d), zero, 1 / d, -e / d, zero, zero, one),
                       dim=-1).reshape(-1, 3, 3)


def _centred_camera(b: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(bbox, K) of crops that are their own camera: the box is the whole crop, centred on the
    principal point (so the crop's camera is the camera and a roll is a plain 2D rotation)."""
    c = (size - 1) / 2.0
    bbox = _to(torch.tensor([-0.5, -0.5, size - 0.5, size - 0.5]), device).expand(b, 4)
    K = _to(torch.tensor([[float(size), 0.0, c], [0.0, float(size), c], [0.0, 0.0, 1.0]]), device)
    return bbox, K.expand(b, 3, 3)


def _warp_homography(points: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(B,J,2) pixel positions through (B,3,3) homographies."""
    p = torch.cat((points, torch.ones_like(points[..., :1])), dim=-1) @ H.transpose(1, 2)
    return p[..., :2] / p[..., 2:]


def _geometric(images, j24, j17, rot, flipped, theta, scale, flip24, flip17, bbox=None, K=None):
    """Flip, then roll by theta and scale by s about the crop centre: images, 2D joints and the
    rotation ``rot`` in the crop's camera (M rot M, then Rz(theta) rot).

    The roll turns the crop's camera about its ray through the crop centre (the box ``bbox`` in the
    full frame of ``K``; without them the crop is its own centred camera): images and joints move by
    the homography that camera motion induces, so they stay exact perspective views of the rolled
    camera (for a crop centred on the principal point, a 2D rotation about the crop centre)."""
    b, _, size, _ = images.shape
    if bbox is None or K is None:
        bbox, K = _centred_camera(b, size, images.device)
    bbox, K = bbox.float(), K.float().expand(b, 3, 3)
    # flip: u -> size-1-u, left/right joints swap, R -> M R M (a mirrored body seen in a mirror); the
    # flipped crop is the crop of the frame mirrored about the principal point's column
    fl = flipped.view(b, 1, 1)
    images = torch.where(fl.view(b, 1, 1, 1), images.flip(-1), images)
    j24 = torch.where(fl, _mirror_u(j24[:, flip24], size), j24)
    j17 = torch.where(fl, _mirror_u(j17[:, flip17], size), j17)
    m = _to(MIRROR_X, rot.device).to(rot.dtype)
    rot = torch.where(fl, m @ rot @ m, rot)
    # roll Q = Rc Rz(theta) Rc^T of the camera about the crop's ray, and the box side divided by s:
    # a crop pixel u goes to H u with H = Kc' Q Kc^-1 (Kc, Kc' the crop intrinsics before and after)
    flipped_box = augment_bbox(bbox, K, flipped, torch.ones_like(scale))
    new_box = augment_bbox(bbox, K, flipped, scale)
    rz = roll_matrix(theta).float()
    rc = crop_camera_rotation(new_box, K).float()
    q = rc @ rz @ rc.transpose(1, 2)
    k_old, k_new = crop_intrinsics(flipped_box, K, size), crop_intrinsics(new_box, K, size)
    H = k_new @ q @ _pinhole_inverse(k_old)
    j24, j17 = _warp_homography(j24, H), _warp_homography(j17, H)
    rot = rz.to(rot.dtype) @ rot
    # sample the output image: output pixel u' comes from H^-1 u' = Kc Q^T Kc'^-1 u'
    h_inv = k_old @ q.transpose(1, 2) @ _pinhole_inverse(k_new)
    pix = torch.arange(size, device=images.device, dtype=images.dtype)
    v, u = torch.meshgrid(pix, pix, indexing="ij")
    src = _warp_homography(torch.stack((u, v), dim=-1).reshape(1, -1, 2).expand(b, -1, -1), h_inv)
    grid = ((src + 0.5) * (2.0 / size) - 1.0).reshape(b, size, size, 2)  # align_corners=False units
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return images, j24, j17, rot


def _mirror_u(joints: torch.Tensor, size: int) -> torch.Tensor:
    out = joints.clone()
    out[..., 0] = size - 1 - joints[..., 0]
    return out


def _photometric(images: torch.Tensor, aug: Augmentation, rand, rand_cpu) -> torch.Tensor:
    b = images.shape[0]
    j = aug.color_jitter
    brightness = 1 + (rand(b, 1, 1, 1) * 2 - 1) * j
    contrast = 1 + (rand(b, 1, 1, 1) * 2 - 1) * j
    per_channel = 1 + (rand(b, 3, 1, 1) * 2 - 1) * j / 2
    mean = images.mean((1, 2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean) * brightness * per_channel
    blur = rand_cpu(b) < aug.blur_prob  # decided on the host: no device-to-host read
    if bool(blur.any()):
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        k = _to((k[:, None] * k[None, :]) / 256.0, images.device)
        blurred = F.conv2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), k.expand(3, 1, 5, 5), groups=3)
        images = torch.where(_to(blur, images.device).view(b, 1, 1, 1), blurred, images)
    return images.clamp(0.0, 1.0)
