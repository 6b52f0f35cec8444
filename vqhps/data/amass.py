"""AMASS motion files (``.npz`` per sequence, SMPL / SMPL+H / SMPL-X pose layouts) -> SMPL pose
sequences and canonical meshes for the Mesh-VQ-VAE corpus.

Only body joints are kept: the first 66 pose values (root + 21 body joints) are shared by every
layout; SMPL's two hand joints are set to zero for SMPL+H (156) and SMPL-X (165) files. The first
10 betas are used with the SMPL model (AMASS fits SMPL+H, whose body shape space starts like SMPL's).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqhps.body.smpl import SMPLBody
from vqhps.data.sample import canonicalize

#: pose widths of the layouts AMASS ships (SMPL, SMPL+H, SMPL-X)
POSE_WIDTHS = {72: "smpl", 156: "smplh", 165: "smplx"}
BODY_POSE_DIMS = 66
FPS_KEYS = ("mocap_framerate", "mocap_frame_rate")


def _read(npz: Any, path: Path, key: str) -> np.ndarray:
    """One array of an open npz; ValueError naming file and field when absent or unreadable."""
    if key not in npz.files:
        raise ValueError(f"{path}: missing field '{key}' (has {sorted(npz.files)})")
    try:
        return np.asarray(npz[key])
    except Exception as exc:  # noqa: BLE001 - truncated members fail in many ways (zlib, CRC, EOF)
        raise ValueError(f"{path}: field '{key}' is unreadable ({type(exc).__name__}: {exc})") from exc


def load_amass_npz(path: str | Path) -> dict[str, Any]:
    """Read one AMASS sequence -> poses (T,72) float32, betas (10,) float32, trans (T,3) float32,
    gender str, fps float. FileNotFoundError / ValueError name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AMASS file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and I/O errors all mean "unreadable"
        raise ValueError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an .npz archive (a single array)")
    with npz:
        poses = _read(npz, path, "poses")
        if poses.ndim != 2 or poses.shape[1] not in POSE_WIDTHS or poses.shape[0] == 0:
            raise ValueError(f"{path}: field 'poses' has shape {poses.shape}, expected (T>0, one of "
                             f"{sorted(POSE_WIDTHS)})")
        trans = _read(npz, path, "trans")
        if trans.shape != (poses.shape[0], 3):
            raise ValueError(f"{path}: field 'trans' has shape {trans.shape}, expected ({poses.shape[0]}, 3)")
        betas = _read(npz, path, "betas").reshape(-1)
        if betas.size == 0:
            raise ValueError(f"{path}: field 'betas' is empty")
        fps_key = next((k for k in FPS_KEYS if k in npz.files), None)
        if fps_key is None:
            raise ValueError(f"{path}: missing field '{FPS_KEYS[0]}' (or '{FPS_KEYS[1]}')")
        fps = float(_read(npz, path, fps_key))
        gender = _read(npz, path, "gender") if "gender" in npz.files else np.array("neutral")
    for key, arr in (("poses", poses), ("trans", trans), ("betas", betas)):
        if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
            raise ValueError(f"{path}: field '{key}' is not finite numbers")

    body_poses = np.zeros((poses.shape[0], 72), np.float32)
    body_poses[:, :BODY_POSE_DIMS] = poses[:, :BODY_POSE_DIMS]
    if poses.shape[1] == 72:
        body_poses[:, BODY_POSE_DIMS:] = poses[:, BODY_POSE_DIMS:]
    betas10 = np.zeros(10, np.float32)
    betas10[: min(10, betas.size)] = betas[:10]
    gender_value = gender.item()
    if isinstance(gender_value, bytes):
        gender_value = gender_value.decode("utf-8", "replace")
    return {
        "poses": body_poses,
        "betas": betas10,
        "trans": trans.astype(np.float32),
        "gender": str(gender_value),
        "fps": fps,
    }


def find_amass_files(root: str | Path) -> list[Path]:
    """All motion ``.npz`` files under ``root``, sorted (AMASS's per-subject ``shape.npz`` left out)."""
    return sorted(p for p in Path(root).rglob("*.npz") if p.name != "shape.npz")


@torch.no_grad()
def amass_canonical_meshes(paths: str | Path | Iterable[str | Path], body: SMPLBody, stride: int = 1,
                           batch_size: int = 256) -> torch.Tensor:
    """Canonical meshes (N,V,3) float32 of every ``stride``-th frame of the given AMASS files: global
    orientation zeroed, translation dropped, centred on the vertex mean (on ``body``'s device)."""
    if stride < 1 or batch_size < 1:
        raise ValueError(f"stride and batch_size must be >= 1, got {stride}, {batch_size}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    device = body.template.device
    chunks: list[torch.Tensor] = []
    for path in paths:
        seq = load_amass_npz(path)
        poses = torch.from_numpy(seq["poses"][::stride].copy())
        poses[:, :3] = 0.0
        betas = torch.zeros(1, body.shape_dim)
        n = min(body.shape_dim, seq["betas"].size)
        betas[0, :n] = torch.from_numpy(seq["betas"][:n])
        betas = betas.to(device)
        for start in range(0, poses.shape[0], batch_size):
            batch = poses[start:start + batch_size].to(device)
            verts = body(batch, betas.expand(batch.shape[0], -1)).vertices
            chunks.append(canonicalize(verts).float())
    if not chunks:
        return torch.zeros(0, body.n_vertices, 3, device=device)
    return torch.cat(chunks)
