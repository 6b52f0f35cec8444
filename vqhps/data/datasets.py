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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
    """The paper's augmentation: flip, in-plane rotation of +-60 deg with p=0.4, scale +-25%,
    blur and colour jitter."""

    flip_prob: float = 0.5
    rot_prob: float = 0.4
    rot_deg: float = 60.0
    scale: float = 0.25
    blur_prob: float = 0.2
    color_jitter: float = 0.2


def pixels_to_unit(joints2d: torch.Tensor, size: int) -> torch.Tensor:
    """Crop pixels (centres at integers) -> [-1, 1] (the crop's outer edges at -1 and 1)."""
    return (joints2d + 0.5) * (2.0 / size) - 1.0


def unit_to_pixels(joints2d: torch.Tensor, size: int) -> torch.Tensor:
    return (joints2d + 1.0) * (size / 2.0) - 0.5


def prepare_batch(batch: dict, body, device: torch.device, aug: Augmentation | None = None,
                  generator: torch.Generator | None = None, flip_index24: torch.Tensor | None = None,
                  flip_index17: torch.Tensor | None = None, channels_last: bool = False) -> dict:
    """Move a collated batch to ``device``, augment it, normalise images and attach targets.

    Adds: ``image`` (B,3,S,S) float normalised, ``joints2d`` (B,24,2) in [-1,1], ``joints2d_17``,
    ``root_rot`` (augmented), ``canonical`` (B,V,3) ground-truth canonical mesh (mirrored when the
    sample was flipped), ``flipped`` (B,) bool."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    images = out["image"].permute(0, 3, 1, 2).float() / 255.0
    b, _, size, _ = images.shape
    j24, j17 = out["joints2d_24"].float(), out["joints2d_17"].float()
    rot = out["root_rot"].float()
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
        images, j24, j17, rot = _geometric(images, j24, j17, rot, flipped, theta, scale,
                                           _to(flip_index24, device), _to(flip_index17, device))
        images = _photometric(images, aug, rand, rand_cpu)
    mean = _to(torch.tensor(IMAGENET_MEAN), device).view(1, 3, 1, 1)
    std = _to(torch.tensor(IMAGENET_STD), device).view(1, 3, 1, 1)
    images = (images - mean) / std
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    out.update(image=images, joints2d=pixels_to_unit(j24, size), joints2d_17=pixels_to_unit(j17, size),
               root_rot=rot, flipped=flipped)
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


def _geometric(images, j24, j17, rot, flipped, theta, scale, flip24, flip17):
    b, _, size, _ = images.shape
    c = (size - 1) / 2.0
    # flip: u -> size-1-u, left/right joints swap, R -> M R M (a mirrored body seen in a mirror)
    fl = flipped.view(b, 1, 1)
    images = torch.where(fl.view(b, 1, 1, 1), images.flip(-1), images)
    j24 = torch.where(fl, _mirror_u(j24[:, flip24], size), j24)
    j17 = torch.where(fl, _mirror_u(j17[:, flip17], size), j17)
    m = _to(MIRROR_X, rot.device).to(rot.dtype)
    rot = torch.where(fl, m @ rot @ m, rot)
    # rotation + scale about the centre: p' = s * Rot(theta) (p - c) + c; camera roll R' = Rz(theta) R
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot2d = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B,2,2)
    fwd = scale.view(b, 1, 1) * rot2d
    j24 = (j24 - c) @ fwd.transpose(1, 2) + c
    j17 = (j17 - c) @ fwd.transpose(1, 2) + c
    rz = torch.zeros(b, 3, 3, device=rot.device, dtype=rot.dtype)
    rz[:, :2, :2] = rot2d
    rz[:, 2, 2] = 1.0
    rot = rz @ rot
    # sample the output image: output pixel p' comes from p = Rot(-theta) (p' - c) / s + c
    inv = rot2d.transpose(1, 2) / scale.view(b, 1, 1)
    affine = torch.cat([inv, torch.zeros(b, 2, 1, device=images.device)], 2)  # normalised coords share the centre
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
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
