"""3DPW as the study's image splits (paper source): every person of every ``stride``-th frame of the
train / validation / test sequences, cropped once by a worker pool and stored as checksummed shards in
the synthetic benchmark's on-disk schema (``synthetic.SHARD_KEYS``), so every training and evaluation
function reads them unchanged.

Labels follow the synthetic renders' conventions exactly: ``pose`` holds SMPL's 24 local rotations
with the root's set to the identity (``canonical_targets(body, pose, shape)`` is the canonical mesh),
``root_rot`` = R_cam R(global_orient), ``trans`` the camera-frame vertex mean, so the camera-frame
mesh is ``canonical @ root_rot.T + trans``; the 2D joints are the projection of that mesh's joints
through the full-frame ``K`` and the crop box ``bbox``. ``valid`` is 3DPW's ``campose_valid`` (the
synthetic benchmark's "valid" is its clean subset; 3DPW's is the frames whose camera pose is
trustworthy, the standard evaluation subset). Light, occlusion and background carry no 3DPW meaning:
0, 0 and the sequence's index. Shards are rebuilt when an input file (size, mtime), the SMPL files or
a setting changes (the manifest records a fingerprint of each).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..config import environment
from .pw3d import BBOX_SCALE, Pw3dSequence, load_pw3d_sequence
from .sample import apply_affine, crop_and_resize, project_points, square_bbox
from .synthetic import (SHARD_KEYS, SPLIT_ID, SUBJECT_OFFSET, CorruptShardError, _WORKER_THREAD_ENV, manifest_path,
                        sha256_file, shard_path)

CROP_VERSION = 1
#: our split names -> 3DPW's ``sequenceFiles`` folders
SPLIT_DIRS = {"train": "train", "val": "validation", "test": "test"}
#: a 3DPW-derived camera-frame mesh farther than this (m) from canonical @ root_rot.T + trans means a
#: convention error, not rounding (float32 rounding stays below 1e-5 m)
CONVENTION_TOL_M = 1e-4
#: keys stored beside SHARD_KEYS: where a crop comes from
EXTRA_KEYS = ("frame", "person")


@dataclass(frozen=True)
class CropSpec:
    """Everything a split's crops depend on; the manifest records it and must match to be reused."""

    split: str
    crop_size: int
    stride: int
    shard_size: int
    max_sequences: int | None
    inputs: str  # fingerprint of the sequence files
    body: str  # fingerprint of the SMPL model and regressor files
    version: int = CROP_VERSION


@dataclass(frozen=True)
class CropTask:
    """One shard's work: some frames (all their people) of one sequence."""

    split: str
    shard: int
    sequence_index: int
    path: str
    frames: tuple[int, ...]
    crop_size: int
    image_root: str


def file_fingerprint(paths: list[Path]) -> str:
    """Short hash of the names, sizes and modification times of ``paths`` (cheap: nothing is read)."""
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def body_fingerprint(cfg, body) -> str:
    """The body's topology identifier plus the fingerprint of the SMPL files its values come from."""
    from ..body.smpl import GENDER_FILES, H36M_REGRESSOR_FILE

    files = [cfg.paths.smpl_dir / GENDER_FILES[cfg.body.smpl_gender], cfg.paths.smpl_dir / H36M_REGRESSOR_FILE]
    return f"{body.identifier()}:{file_fingerprint([f for f in files if f.is_file()])}"


def sequence_files(cfg, split: str) -> list[Path]:
    """The split's sequence pickles, sorted (the first ``data.pw3d_max_sequences`` when set)."""
    folder = cfg.paths.pw3d_dir / "sequenceFiles" / SPLIT_DIRS[split]
    files = sorted(folder.glob("*.pkl"))
    if not files:
        raise FileNotFoundError(f"no 3DPW sequence files in {folder} (expected sequenceFiles/{SPLIT_DIRS[split]}/"
                                f"*.pkl; set VQHPS_3DPW_DIR to the folder holding sequenceFiles/ and imageFiles/)")
    return files[:cfg.data.pw3d_max_sequences] if cfg.data.pw3d_max_sequences else files


def make_spec(cfg, split: str, body) -> CropSpec:
    d = cfg.data
    return CropSpec(split=split, crop_size=d.crop_size, stride=d.pw3d_stride, shard_size=d.shard_size,
                    max_sequences=d.pw3d_max_sequences, inputs=file_fingerprint(sequence_files(cfg, split)),
                    body=body_fingerprint(cfg, body))


def crops_root(cfg) -> Path:
    return cfg.data_dir / "pw3d"


def plan(cfg, split: str) -> list[CropTask]:
    """The split's shards: each sequence's ``stride``-th frames in runs of about ``shard_size`` crops."""
    tasks = []
    for index, path in enumerate(sequence_files(cfg, split)):
        seq = load_pw3d_sequence(path)
        frames = list(range(0, seq.n_frames, cfg.data.pw3d_stride))
        per_shard = max(1, cfg.data.shard_size // seq.n_people)
        for start in range(0, len(frames), per_shard):
            tasks.append(CropTask(split, len(tasks), index, str(path), tuple(frames[start:start + per_shard]),
                                  cfg.data.crop_size, str(cfg.paths.pw3d_dir / "imageFiles")))
    return tasks


# ------------------------------------------------------------------------------------------- one shard
@torch.no_grad()
def _labels(seq: Pw3dSequence, person: int, frames: np.ndarray, body) -> dict[str, np.ndarray]:
    """Pose (root identity), betas, root_rot, trans and the camera-frame mesh (float64) of some frames;
    ValueError when 3DPW's own camera-frame mesh disagrees with the labels' (a convention error)."""
    from ..body.smpl import pose_to_rotmats
    from .datasets import canonical_targets

    n = len(frames)
    rot = pose_to_rotmats(torch.as_tensor(seq.poses[person][frames], dtype=torch.float64))  # (n, 24, 3, 3)
    local = rot.float().clone()
    local[:, 0] = torch.eye(3)
    betas = torch.as_tensor(seq.betas[person][:body.shape_dim], dtype=torch.float32)[None].expand(n, -1)
    canonical = canonical_targets(body, local, betas).double().cpu().numpy()
    world = body(rot.float(), betas).vertices.double().cpu().numpy() + seq.trans[person][frames, None].astype(np.float64)
    cam = seq.cam_poses[frames]
    from_3dpw = world @ cam[:, :3, :3].transpose(0, 2, 1) + cam[:, None, :3, 3]
    root_rot = cam[:, :3, :3] @ rot[:, 0].numpy()
    trans = from_3dpw.mean(1)
    verts_cam = canonical @ root_rot.transpose(0, 2, 1) + trans[:, None]
    worst = float(np.abs(verts_cam - from_3dpw).max())
    if worst > CONVENTION_TOL_M:
        raise ValueError(f"{seq.path}: person {person}: canonical mesh rotated by R_cam R(global_orient) is "
                         f"{worst:.2e} m from 3DPW's camera-frame mesh (frame convention broken)")
    return {"pose": local.numpy(), "shape": betas.numpy(), "root_rot": root_rot, "trans": trans,
            "verts_cam": verts_cam}


def heading_deg(root_rot: np.ndarray) -> np.ndarray:
    """(N,3,3) -> (N,) yaw of the body's forward axis (+z) as the synthetic renders define it: 0 facing
    the camera, +-180 facing away."""
    forward = root_rot[:, :, 2]
    return np.degrees(np.arctan2(forward[:, 0], -forward[:, 2]))


def crop_shard(task: CropTask, body, sequence: Pw3dSequence | None = None) -> dict[str, np.ndarray]:
    """The samples of one task in the shard schema (frame-major, people in order); each JPEG is decoded
    once, when its frame comes."""
    seq = sequence if sequence is not None else load_pw3d_sequence(task.path)
    frames = np.asarray(task.frames, dtype=np.int64)
    K = seq.cam_intrinsics.astype(np.float64)
    reg24, reg17 = body.regressor24.double().cpu().numpy(), body.regressor17.double().cpu().numpy()
    labels = [_labels(seq, p, frames, body) for p in range(seq.n_people)]
    out: dict[str, list] = {k: [] for k in (*SHARD_KEYS, *EXTRA_KEYS)}
    for i, t in enumerate(frames):
        path = seq.image_path(task.image_root, int(t))
        if not path.is_file():
            raise FileNotFoundError(f"3DPW image not found: {path} (expected imageFiles/<sequence>/image_XXXXX.jpg)")
        with Image.open(path) as img:
            width, height = img.size
            for p, lab in enumerate(labels):
                verts = lab["verts_cam"][i]
                proj = project_points(verts, K)
                bbox = square_bbox(proj, BBOX_SCALE).astype(np.float64)
                crop, affine = crop_and_resize(img, bbox, task.crop_size)
                for n, reg in ((24, reg24), (17, reg17)):
                    out[f"joints2d_{n}"].append(apply_affine(project_points(reg @ verts, K), affine).astype(np.float32))
                in_frame = bool((proj >= -0.5).all() and (proj[:, 0] <= width - 0.5).all()
                                and (proj[:, 1] <= height - 0.5).all())
                out["image"].append(crop)
                out["root_rot"].append(lab["root_rot"][i].astype(np.float32))
                out["trans"].append(lab["trans"][i].astype(np.float32))
                out["K"].append(K.astype(np.float32))
                out["bbox"].append(bbox.astype(np.float32))
                out["pose"].append(lab["pose"][i])
                out["shape"].append(lab["shape"][i])
                out["subject"].append(np.int64(SUBJECT_OFFSET * SPLIT_ID[task.split] + 100 * task.sequence_index + p))
                out["valid"].append(np.bool_(seq.campose_valid[p][t]))
                out["light"].append(np.int8(0))
                out["occlusion"].append(np.float32(0.0))
                out["in_frame"].append(np.bool_(in_frame))
                out["yaw"].append(np.float32(heading_deg(lab["root_rot"][i][None])[0]))
                out["background"].append(np.int16(task.sequence_index))
                out["frame"].append(np.int32(seq.img_frame_ids[t]))
                out["person"].append(np.int8(p))
    return {k: np.stack(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- storage
def check_split(root: Path, spec: CropSpec, verify_checksums: bool = True) -> tuple[bool, list[int]]:
    """(whether the manifest matches ``spec``, shards missing or corrupt under it)."""
    mpath = manifest_path(root, spec.split)
    try:
        manifest = json.loads(mpath.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False, []
    if manifest.get("spec") != asdict(spec):
        return False, []
    bad = []
    for key, entry in manifest["shards"].items():
        path = shard_path(root, spec.split, int(key))
        if not path.exists() or path.stat().st_size != entry["bytes"] or (
                verify_checksums and sha256_file(path) != entry["sha256"]):
            bad.append(int(key))
    return True, sorted(bad)


def _write(root: Path, task: CropTask, arrays: dict[str, np.ndarray]) -> dict:
    path = shard_path(root, task.split, task.shard)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), "n": int(len(arrays["image"]))}


_WORKER: dict = {}


def _worker_init(profile: str, overrides: dict) -> None:
    from ..body import load_body
    from ..config import load_config

    torch.set_num_threads(1)
    _WORKER["body"] = load_body(load_config(profile, **overrides))


def _worker_crop(task: CropTask) -> tuple[CropTask, dict]:
    cached = _WORKER.get("sequence")
    if cached is None or cached[0] != task.path:  # a worker's tasks mostly come from one sequence
        _WORKER["sequence"] = (task.path, load_pw3d_sequence(task.path))
    return task, crop_shard(task, _WORKER["body"], _WORKER["sequence"][1])


def build_splits(cfg, splits: tuple[str, ...] = ("train", "val", "test"), workers: int | None = None,
                 progress: bool = True, overrides: dict | None = None) -> dict[str, Path]:
    """Crop the splits' missing or corrupt shards (one pool for all) and (re)write their manifests;
    a split whose manifest does not match the current inputs and settings is rebuilt whole."""
    from ..body import load_body

    body = load_body(cfg)
    root = crops_root(cfg)
    todo: list[CropTask] = []
    entries: dict[str, dict] = {}
    specs = {split: make_spec(cfg, split, body) for split in splits}
    for split, spec in specs.items():
        matches, bad = check_split(root, spec)
        if matches and not bad:
            continue
        tasks = plan(cfg, split)
        old = json.loads(manifest_path(root, split).read_text())["shards"] if matches else {}
        entries[split] = {k: v for k, v in old.items() if int(k) not in bad}
        todo += [t for t in tasks if str(t.shard) not in entries[split]]
        entries[split]["_n_shards"] = len(tasks)
    workers = cfg.data.num_workers if workers is None else workers
    # the workers rebuild this body from the profile: the settings it depends on travel with them
    overrides = {"data.source": cfg.data.source, "paths.smpl_dir": cfg.paths.smpl_dir, "paths.cache": cfg.paths.cache,
                 "body.smpl_gender": cfg.body.smpl_gender, **(overrides or {})}
    bar = tqdm(total=len(todo), desc="cropping 3DPW " + ", ".join(entries), disable=not progress or not todo)
    if todo and workers <= 0:
        sequences: dict[str, Pw3dSequence] = {}
        for task in todo:
            seq = sequences.get(task.path) or sequences.setdefault(task.path, load_pw3d_sequence(task.path))
            entries[task.split][str(task.shard)] = _write(root, task, crop_shard(task, body, seq))
            bar.update()
            if len(sequences) > 1:  # keep only the current sequence in memory
                sequences = {task.path: seq}
    elif todo:
        with environment({k: "1" for k in _WORKER_THREAD_ENV}):  # inherited by the spawned workers
            with mp.get_context("spawn").Pool(min(workers, len(todo)), initializer=_worker_init,
                                              initargs=(cfg.profile, overrides)) as pool:
                for task, arrays in pool.imap_unordered(_worker_crop, todo):
                    entries[task.split][str(task.shard)] = _write(root, task, arrays)
                    bar.update()
    bar.close()
    for split, shards in entries.items():
        n_shards = shards.pop("_n_shards")
        ordered = {str(i): shards[str(i)] for i in range(n_shards)}
        manifest = {"spec": asdict(specs[split]), "n": sum(e["n"] for e in ordered.values()), "shards": ordered}
        atomic_write(manifest_path(root, split), lambda f, m=manifest: f.write(json.dumps(m, indent=1).encode()))
    return {split: root / split for split in splits}


def load_split(cfg, split: str, verify: bool = True, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Every array of a cropped split (only ``keys`` when given), concatenated over shards; refuses a
    split whose shards are missing, corrupt or were made from other inputs or settings."""
    from ..body import load_body

    root = crops_root(cfg)
    spec = make_spec(cfg, split, load_body(cfg))
    matches, bad = check_split(root, spec, verify_checksums=verify)
    if not matches or bad:
        why = f"shards {bad} are missing or corrupt" if matches else "no manifest matches the current files and settings"
        raise CorruptShardError(f"{root / split}: {why}; crop them with vqhps.data.source.prepare(cfg) "
                                f"(or `python -m vqhps prepare --set data.source=paper`)")
    manifest = json.loads(manifest_path(root, split).read_text())
    parts = []
    for key in sorted(manifest["shards"], key=int):
        with np.load(shard_path(root, split, int(key))) as f:
            parts.append({k: f[k] for k in f.files if keys is None or k in keys})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
