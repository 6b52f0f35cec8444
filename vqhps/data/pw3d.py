"""3DPW sequences (``sequenceFiles/<split>/<seq>.pkl`` + ``imageFiles/<seq>/image_XXXXX.jpg``) ->
validated arrays and samples in the shared schema of :mod:`vqhps.data.sample`.

Geometry: ``cam_poses[t]`` is the world->camera extrinsic [R_c | t_c]; the mesh in the camera frame
is ``R_c (SMPL(pose, betas) + trans) + t_c`` and the root rotation in the camera frame is
``R_c @ R(global_orient)``. The canonical mesh is SMPL with zero global orientation, centred.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from vqhps.body.base import BodyModel
from vqhps.data.sample import apply_affine, canonicalize, crop_and_resize, project_points, square_bbox

REQUIRED_KEYS = ("sequence", "genders", "poses", "betas", "trans", "cam_poses", "cam_intrinsics", "campose_valid")
BBOX_SCALE = 1.2
_GENDER_NAMES = {"m": "male", "f": "female", "n": "neutral", "male": "male", "female": "female",
                 "neutral": "neutral"}


@dataclass
class Pw3dSequence:
    """One 3DPW sequence, validated: P people over T frames."""

    path: Path
    sequence: str
    genders: list[str]  # "male" / "female" / "neutral", one per person
    poses: list[np.ndarray]  # (T, 72) float32 per person, axis-angle, joint 0 = world orientation
    betas: list[np.ndarray]  # (10,) float32 per person
    trans: list[np.ndarray]  # (T, 3) float32 per person, world frame
    cam_poses: np.ndarray  # (T, 4, 4) float64 world -> camera
    cam_intrinsics: np.ndarray  # (3, 3) float64
    campose_valid: list[np.ndarray]  # (T,) bool per person
    img_frame_ids: np.ndarray  # (T,) int64 image number of each pose frame

    @property
    def n_frames(self) -> int:
        return int(self.cam_poses.shape[0])

    @property
    def n_people(self) -> int:
        return len(self.poses)

    def image_path(self, image_root: str | Path, t: int) -> Path:
        """``<image_root>/<sequence>/image_{frame:05d}.jpg`` of pose frame ``t``."""
        return Path(image_root) / self.sequence / f"image_{int(self.img_frame_ids[t]):05d}.jpg"


def _array(path: Path, name: str, value: Any, shape: tuple[int | None, ...], dtype: Any = np.float64) -> np.ndarray:
    """``value`` as a finite array of ``shape`` (None = any); ValueError naming file and field otherwise."""
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: field '{name}' is not a numeric array ({exc})") from exc
    if arr.ndim != len(shape) or any(w is not None and w != g for w, g in zip(shape, arr.shape)):
        want = tuple("*" if w is None else w for w in shape)
        raise ValueError(f"{path}: field '{name}' has shape {arr.shape}, expected {want}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{path}: field '{name}' contains non-finite values")
    return arr


def _per_person(path: Path, raw: dict[str, Any], key: str, n_people: int) -> list[Any]:
    value = raw[key]
    if isinstance(value, np.ndarray) and value.dtype != object:
        value = list(value)
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != n_people:
        raise ValueError(f"{path}: field '{key}' must be a list with one entry per person ({n_people})")
    return list(value)


def load_pw3d_sequence(path: str | Path) -> Pw3dSequence:
    """Read and validate a 3DPW sequence pickle (latin1). FileNotFoundError when absent, ValueError
    naming the file and the field when malformed; only the geometry/camera keys are required."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"3DPW sequence file not found: {path}")
    try:
        with path.open("rb") as fh:
            raw = pickle.load(fh, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure: unreadable file
        raise ValueError(f"{path}: not a readable 3DPW pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(raw).__name__}")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise ValueError(f"{path}: missing field '{key}'")

    sequence = raw["sequence"]
    sequence = sequence.decode() if isinstance(sequence, bytes) else sequence
    if not isinstance(sequence, str) or not sequence:
        raise ValueError(f"{path}: field 'sequence' must be a non-empty string")
    cam_poses = _array(path, "cam_poses", raw["cam_poses"], (None, 4, 4))
    n_frames = cam_poses.shape[0]
    if n_frames == 0:
        raise ValueError(f"{path}: field 'cam_poses' has no frames")
    rot = cam_poses[:, :3, :3]
    if np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max() > 1e-3:
        raise ValueError(f"{path}: field 'cam_poses' holds non-rigid transforms")
    intrinsics = _array(path, "cam_intrinsics", raw["cam_intrinsics"], (3, 3))

    genders_raw = raw["genders"]
    if not isinstance(genders_raw, (list, tuple, np.ndarray)) or len(genders_raw) == 0:
        raise ValueError(f"{path}: field 'genders' must be a non-empty list")
    genders = []
    for g in genders_raw:
        g = g.decode() if isinstance(g, bytes) else str(g)
        if g.lower() not in _GENDER_NAMES:
            raise ValueError(f"{path}: field 'genders' has unknown entry {g!r}")
        genders.append(_GENDER_NAMES[g.lower()])
    n_people = len(genders)

    poses = [_array(path, f"poses[{p}]", v, (n_frames, 72)).astype(np.float32)
             for p, v in enumerate(_per_person(path, raw, "poses", n_people))]
    trans = [_array(path, f"trans[{p}]", v, (n_frames, 3)).astype(np.float32)
             for p, v in enumerate(_per_person(path, raw, "trans", n_people))]
    betas = []
    for p, v in enumerate(_per_person(path, raw, "betas", n_people)):
        b = _array(path, f"betas[{p}]", v, (None,))
        if b.size < 10:
            raise ValueError(f"{path}: field 'betas[{p}]' has shape {b.shape}, expected (10,)")
        betas.append(b[:10].astype(np.float32))
    valid = [_array(path, f"campose_valid[{p}]", v, (n_frames,)) != 0
             for p, v in enumerate(_per_person(path, raw, "campose_valid", n_people))]
    if "img_frame_ids" in raw:
        frame_ids = _array(path, "img_frame_ids", raw["img_frame_ids"], (n_frames,), np.int64)
    else:
        frame_ids = np.arange(n_frames, dtype=np.int64)
    return Pw3dSequence(path, sequence, genders, poses, betas, trans, cam_poses, intrinsics, valid, frame_ids)


def _body_for(body: BodyModel | Mapping[str, BodyModel], gender: str) -> BodyModel:
    if isinstance(body, BodyModel):
        return body
    for key in (gender, gender[0], "neutral"):
        if key in body:
            return body[key]
    raise ValueError(f"no body model for gender {gender!r} (have {sorted(body)})")


def pw3d_samples(pkl_path: str | Path, image_root: str | Path, body: BodyModel | Mapping[str, BodyModel],
                 crop_size: int = 224, batch_size: int = 64) -> Iterator[dict[str, Any]]:
    """Samples (schema of :mod:`vqhps.data.sample`) of every person in every frame, person-major.

    ``body`` is one SMPL model for everyone or a mapping gender -> model ("male"/"female"/"neutral").
    Every image is checked before any work starts: a missing one raises FileNotFoundError naming it.
    Extra keys: sequence, frame, person, gender, smpl_pose (72,), smpl_betas (10,).
    """
    seq = load_pw3d_sequence(pkl_path)
    image_paths = [seq.image_path(image_root, t) for t in range(seq.n_frames)]
    for img_path in image_paths:
        if not img_path.is_file():
            raise FileNotFoundError(f"3DPW image not found: {img_path} (expected <image_root>/<sequence>/"
                                    f"image_XXXXX.jpg, as in 3DPW's imageFiles/)")
    return _generate(seq, image_paths, body, crop_size, batch_size)


def _generate(seq: Pw3dSequence, image_paths: list[Path], body: BodyModel | Mapping[str, BodyModel],
              crop_size: int, batch_size: int) -> Iterator[dict[str, Any]]:
    K = seq.cam_intrinsics.astype(np.float32)
    for person in range(seq.n_people):
        model = _body_for(body, seq.genders[person])
        for start in range(0, seq.n_frames, batch_size):
            frames = np.arange(start, min(start + batch_size, seq.n_frames))
            geo = _camera_geometry(seq, person, frames, model)
            for i, t in enumerate(frames):
                proj = project_points(geo["verts_cam"][i].astype(np.float64), seq.cam_intrinsics)
                bbox = square_bbox(proj, BBOX_SCALE)
                with Image.open(image_paths[t]) as img:
                    crop, affine = crop_and_resize(img, bbox, crop_size)
                joints2d = {n: apply_affine(project_points(geo[f"joints{n}"][i].astype(np.float64),
                                                           seq.cam_intrinsics), affine).astype(np.float32)
                            for n in (24, 17)}
                yield {
                    "image": crop,
                    "joints2d_24": joints2d[24],
                    "joints2d_17": joints2d[17],
                    "root_rot": geo["root_rot"][i],
                    "canonical": geo["canonical"][i],
                    "verts_cam": geo["verts_cam"][i],
                    "K": K,
                    "bbox": bbox,
                    "valid": np.bool_(seq.campose_valid[person][t]),
                    "sequence": seq.sequence,
                    "frame": int(seq.img_frame_ids[t]),
                    "person": person,
                    "gender": seq.genders[person],
                    "smpl_pose": seq.poses[person][t].copy(),
                    "smpl_betas": seq.betas[person].copy(),
                }


@torch.no_grad()
def _camera_geometry(seq: Pw3dSequence, person: int, frames: np.ndarray, body: BodyModel) -> dict[str, np.ndarray]:
    """Camera-frame mesh and joints, canonical mesh and camera-frame root rotation of some frames."""
    device, dtype = body.template.device, body.template.dtype
    pose = torch.as_tensor(seq.poses[person][frames], dtype=dtype, device=device)
    betas = torch.as_tensor(seq.betas[person][: body.shape_dim], dtype=dtype, device=device)
    betas = betas[None].expand(len(frames), -1)
    trans = torch.as_tensor(seq.trans[person][frames], dtype=dtype, device=device)
    world = body(pose, betas).vertices + trans[:, None]
    pose_zero = pose.clone()
    pose_zero[:, :3] = 0.0
    canonical = canonicalize(body(pose_zero, betas).vertices)

    cam = torch.as_tensor(seq.cam_poses[frames], dtype=dtype, device=device)
    verts_cam = world @ cam[:, :3, :3].transpose(1, 2) + cam[:, None, :3, 3]
    global_rot = Rotation.from_rotvec(seq.poses[person][frames, :3].astype(np.float64)).as_matrix()
    root_rot = seq.cam_poses[frames, :3, :3] @ global_rot
    return {
        "verts_cam": verts_cam.float().cpu().numpy(),
        "canonical": canonical.float().cpu().numpy(),
        "root_rot": root_rot.astype(np.float32),
        "joints24": body.joints24(verts_cam).float().cpu().numpy(),
        "joints17": body.joints17(verts_cam).float().cpu().numpy(),
    }
