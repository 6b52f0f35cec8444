"""The synthetic benchmark (3DPW analogue): posed anny bodies rendered with pyrender over photographs
and textures, with full labels, written as checksummed shards with a manifest.

Each shard is a deterministic function of (seed, split, shard index): a missing or corrupt shard is
rebuilt alone, and a manifest that does not match the requested settings is never used.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..config import environment
from .backgrounds import background
from .sample import crop_affine, project_points, square_bbox

GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")
SPLIT_ID = {"train": 0, "val": 1, "test": 2}
#: subject ids of split s are SUBJECT_OFFSET * SPLIT_ID[s] + k: disjoint by construction
SUBJECT_OFFSET = 1_000_000
LIGHT_NAMES = ("normal", "dim", "harsh")

#: keys of a stored sample and their per-sample shapes (S = crop size)
SHARD_KEYS = ("image", "joints2d_24", "joints2d_17", "root_rot", "trans", "K", "bbox", "pose", "shape",
              "subject", "valid", "light", "occlusion", "in_frame", "yaw", "background")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything a split's content depends on; the manifest records it and must match to be reused."""

    split: str
    n: int
    seed: int
    render_size: int
    crop_size: int
    shard_size: int
    occluder_prob: float
    bad_light_prob: float
    truncation_prob: float
    body_id: str
    version: int = GENERATOR_VERSION

    @property
    def n_shards(self) -> int:
        return (self.n + self.shard_size - 1) // self.shard_size

    def shard_count(self, shard: int) -> int:
        return min(self.shard_size, self.n - shard * self.shard_size)


def split_size(cfg, split: str) -> int:
    return {"train": cfg.data.n_train, "val": cfg.data.n_val, "test": cfg.data.n_test}[split]


def make_spec(cfg, split: str, body_id: str) -> BenchmarkSpec:
    d = cfg.data
    return BenchmarkSpec(split=split, n=split_size(cfg, split), seed=d.seed, render_size=d.render_size,
                         crop_size=d.crop_size, shard_size=d.shard_size, occluder_prob=d.occluder_prob,
                         bad_light_prob=d.bad_light_prob, truncation_prob=d.truncation_prob, body_id=body_id)


# ----------------------------------------------------------------------------------------------- subjects
def subject_pool(split: str, n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Subject ids and their phenotypes (the body model's adult ranges) for a split: ~50 images each."""
    from vqhps.body.anny_body import sample_phenotypes

    n_subjects = max(4, n_images // 50)
    pheno = sample_phenotypes(np.random.default_rng([seed, SPLIT_ID[split], 7919]), n_subjects)
    ids = SUBJECT_OFFSET * SPLIT_ID[split] + np.arange(n_subjects)
    return ids, pheno


def shard_parameters(spec: BenchmarkSpec, shard: int) -> tuple[np.random.Generator, dict[str, np.ndarray]]:
    """Who is in a shard and how they stand: subject ids, phenotypes, poses and trunk pitch, drawn
    before any rendering (so the meshes of a split are known without rendering it). Returns the
    shard's random generator, positioned for the scene draws that follow."""
    from vqhps.data.poses import PoseSampler

    n = spec.shard_count(shard)
    rng = np.random.default_rng([spec.seed, SPLIT_ID[spec.split], shard, 1])
    ids, pheno = subject_pool(spec.split, spec.n, spec.seed)
    who = rng.integers(len(ids), size=n)
    pose, info = PoseSampler(seed=int(spec.seed * 1000 + SPLIT_ID[spec.split] * 100_000 + shard)).sample(n)
    return rng, {"pose": np.asarray(pose, dtype=np.float32), "shape": pheno[who], "subject": ids[who],
                 "root_pitch": np.asarray(info["root_pitch"], dtype=np.float32)}


def split_meshes(cfg, split: str, body_id: str = "") -> dict[str, np.ndarray]:
    """Pose and shape of every image of a split, without rendering: what the Mesh-VQ-VAE fine-tunes
    and is tested on (the split's canonical meshes follow from them)."""
    spec = make_spec(cfg, split, body_id)
    parts = [shard_parameters(spec, shard)[1] for shard in range(spec.n_shards)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("pose", "shape", "subject")}


# ----------------------------------------------------------------------------------------------- geometry
def rotation_x(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def rotation_y(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def rotation_z(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def sample_view(canonical: np.ndarray, size: int, rng: np.random.Generator, truncate: bool, pitch: float = 0.0):
    """Root rotation, translation and intrinsics placing a canonical mesh in a random full frame.

    Yaw covers the full circle (so 180-degree flips appear), with the pose's own forward trunk
    ``pitch`` (bending poses), small body tilt and a random camera elevation; the body fills 45-75%
    of the frame height unless ``truncate`` pushes it past an edge."""
    yaw = rng.uniform(-180.0, 180.0)
    body_tilt = (rotation_x(np.clip(rng.normal(0, 8), -20, 20)) @ rotation_z(np.clip(rng.normal(0, 5), -15, 15))
                 @ rotation_x(pitch))
    # camera frame <- body frame, body facing the camera: y up -> y down, z toward camera -> -z
    facing = np.diag([1.0, -1.0, -1.0])
    elevation = rotation_x(-rng.uniform(-10.0, 30.0))
    root_rot = elevation @ facing @ rotation_y(yaw) @ body_tilt
    fov = rng.uniform(35.0, 70.0)
    f = 0.5 * size / np.tan(np.radians(fov) / 2)
    K = np.array([[f, 0, (size - 1) / 2], [0, f, (size - 1) / 2], [0, 0, 1.0]])
    rotated = canonical @ root_rot.T
    extent = max(float(np.ptp(rotated[:, 1])), float(np.ptp(rotated[:, 0])), 0.3)
    dist = f * extent / (rng.uniform(0.45, 0.75) * size)
    centre = rng.uniform(-0.06, 0.06, 2) * size
    if truncate:
        side = rng.integers(4)
        shift = rng.uniform(0.2, 0.45) * extent * f / dist
        centre[side % 2] += shift if side < 2 else -shift
    trans = np.array([centre[0] * dist / f, centre[1] * dist / f, dist])
    return root_rot, trans, K, yaw


# ----------------------------------------------------------------------------------------------- appearance
SKIN_TONES = np.array([[255, 224, 196], [234, 192, 160], [198, 145, 110], [160, 110, 80], [110, 72, 50],
                       [80, 52, 38]], dtype=np.float32)


def outfit_colors(parts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-vertex RGBA colours: skin, a top with random sleeves, trousers or shorts, shoes, noise."""
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.05)
    top, bottom, shoes, hair = (rng.uniform(0, 255, 3) for _ in range(4))
    sleeve = rng.integers(3)  # 0 none, 1 short, 2 long
    long_legs = rng.random() < 0.7
    palette = {
        "head": skin, "torso": top, "upper_arm": top if sleeve >= 1 else skin,
        "lower_arm": top if sleeve == 2 else skin, "hand": skin, "upper_leg": bottom,
        "lower_leg": bottom if long_legs else skin, "foot": shoes,
    }
    colors = np.stack([palette[PART_NAMES[p]] for p in parts]).astype(np.float32)
    colors += rng.normal(0, 8, colors.shape)
    return np.concatenate([colors.clip(0, 255), np.full((len(parts), 1), 255.0)], 1).astype(np.uint8)


PART_NAMES = ("head", "torso", "upper_arm", "lower_arm", "hand", "upper_leg", "lower_leg", "foot")


def part_of_bone(label: str) -> int:
    """Body part of an anny bone label (for clothing colours)."""
    rules = (("neck", "head"), ("head", "head"), ("eye", "head"), ("upperarm", "upper_arm"),
             ("lowerarm", "lower_arm"), ("wrist", "hand"), ("finger", "hand"), ("metacarpal", "hand"),
             ("upperleg", "upper_leg"), ("lowerleg", "lower_leg"), ("foot", "foot"), ("toe", "foot"))
    for key, part in rules:
        if label.startswith(key):
            return PART_NAMES.index(part)
    return PART_NAMES.index("torso")


def vertex_parts(body) -> np.ndarray:
    """Part id of each body vertex from its most weighted bone."""
    idx = body.model.vertex_bone_indices.cpu().numpy()[body.keep.cpu().numpy()]
    w = body.model.vertex_bone_weights.cpu().numpy()[body.keep.cpu().numpy()]
    dominant = idx[np.arange(len(idx)), w.argmax(1)]
    bone_part = np.array([part_of_bone(b) for b in body.bone_labels])
    return bone_part[dominant]


def add_occluder(image: np.ndarray, body_mask: np.ndarray, rng: np.random.Generator, split: str) -> float:
    """Paste a textured rectangle or ellipse over the body (in place); returns the body fraction hidden."""
    s = image.shape[0]
    ys, xs = np.nonzero(body_mask)
    if len(xs) == 0:
        return 0.0
    cy, cx = ys[rng.integers(len(ys))], xs[rng.integers(len(xs))]
    hh, hw = rng.uniform(0.1, 0.3, 2) * s
    yy, xx = np.mgrid[0:s, 0:s]
    if rng.random() < 0.5:
        mask = (np.abs(yy - cy) < hh) & (np.abs(xx - cx) < hw)
    else:
        mask = ((yy - cy) / hh) ** 2 + ((xx - cx) / hw) ** 2 < 1.0
    tex, _ = background(split, s, rng)
    image[mask] = tex[mask]
    return float((mask & body_mask).sum() / max(body_mask.sum(), 1))


# ----------------------------------------------------------------------------------------------- rendering
class ShardRenderer:
    """Renders shards of one split; holds the body model, its part map and an offscreen renderer."""

    def __init__(self, body, crop_size: int):
        from vqhps.render import MeshRenderer

        self.body = body
        self.parts = vertex_parts(body)
        self.faces = body.faces.cpu().numpy()
        self.renderer = MeshRenderer(crop_size)
        self.crop_size = crop_size

    def pose_meshes(self, pose: np.ndarray, shape: np.ndarray, batch: int = 64) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(pose), batch):
                v = self.body(torch.as_tensor(pose[i:i + batch]), torch.as_tensor(shape[i:i + batch])).vertices
                out.append((v - v.mean(1, keepdim=True)).numpy())
        return np.concatenate(out)

    def render_shard(self, spec: BenchmarkSpec, shard: int, progress: bool = False) -> dict[str, np.ndarray]:
        rng, params = shard_parameters(spec, shard)
        pose, shape, pitch = params["pose"], params["shape"], params["root_pitch"]
        n = len(pose)
        canonical = self.pose_meshes(pose, shape)
        j24 = np.einsum("jv,nvc->njc", self.body.regressor24.numpy(), canonical)
        j17 = np.einsum("jv,nvc->njc", self.body.regressor17.numpy(), canonical)
        out = {k: [] for k in SHARD_KEYS}
        for i in tqdm(range(n), desc=f"{spec.split} shard {shard}", leave=False, disable=not progress):
            sample = self.render_one(spec, canonical[i], j24[i], j17[i], rng, float(pitch[i]))
            sample.update(pose=pose[i], shape=shape[i], subject=params["subject"][i])
            for k in SHARD_KEYS:
                out[k].append(sample[k])
        return {k: np.stack(v) for k, v in out.items()}

    def render_one(self, spec: BenchmarkSpec, canonical: np.ndarray, j24: np.ndarray, j17: np.ndarray,
                   rng: np.random.Generator, pitch: float = 0.0) -> dict[str, np.ndarray]:
        """One labelled crop of a canonical mesh (plus its two joint sets) in a random scene."""
        from vqhps.render import composite

        size, crop = spec.render_size, spec.crop_size
        truncate = rng.random() < spec.truncation_prob
        root_rot, trans, K, yaw = sample_view(canonical, size, rng, truncate, pitch)
        verts_cam = canonical @ root_rot.T + trans
        proj = project_points(verts_cam, K)
        bbox = square_bbox(proj, 1.2)
        affine = crop_affine(bbox, crop)
        in_frame = bool((proj >= -0.5).all() and (proj <= size - 0.5).all())
        # render the crop directly: crop pixels = affine(full-frame pixels)
        K_crop = np.vstack([affine, [0, 0, 1]]) @ K
        light = 0 if rng.random() >= spec.bad_light_prob else int(rng.integers(1, 3))
        intensity = {0: rng.uniform(2.5, 5.0), 1: rng.uniform(0.3, 0.8), 2: rng.uniform(8.0, 14.0)}[light]
        ambient = {0: rng.uniform(0.25, 0.5), 1: rng.uniform(0.02, 0.1), 2: rng.uniform(0.0, 0.05)}[light]
        light_dir = rng.normal(0, 1, 3) + np.array([0, 0.5, 1.5 if light != 2 else 0.0])
        colors = outfit_colors(self.parts, rng)
        rgba, _ = self.renderer.render(verts_cam, self.faces, K_crop, vertex_colors=colors,
                                       light_dir=light_dir, light_intensity=intensity, ambient=ambient)
        bg_full, bg_id = background(spec.split, size, rng)
        bg = warp_full_frame(bg_full, affine, crop)
        image = composite(rgba, bg)
        inside = warp_full_frame(np.full((size, size, 1), 255, np.uint8), affine, crop)[..., 0] > 127
        image[~inside] = 0  # outside the camera's frame: padding, as in a real crop
        body_mask = (rgba[..., 3] > 0) & inside
        occlusion = add_occluder(image, body_mask, rng, spec.split) if rng.random() < spec.occluder_prob else 0.0
        if light == 1:
            image = (image.astype(np.float32) * rng.uniform(0.25, 0.5)).astype(np.uint8)
        image = (image.astype(np.float32) + rng.normal(0, 3, image.shape)).clip(0, 255).astype(np.uint8)
        j2d_24 = project_points(j24 @ root_rot.T + trans, K_crop)
        j2d_17 = project_points(j17 @ root_rot.T + trans, K_crop)
        valid = in_frame and occlusion < 0.3 and light == 0
        return {"image": image, "joints2d_24": j2d_24.astype(np.float32), "joints2d_17": j2d_17.astype(np.float32),
                "root_rot": root_rot.astype(np.float32), "trans": trans.astype(np.float32),
                "K": K.astype(np.float32), "bbox": bbox.astype(np.float32), "valid": np.bool_(valid),
                "light": np.int8(light), "occlusion": np.float32(occlusion), "in_frame": np.bool_(in_frame),
                "yaw": np.float32(yaw), "background": np.int16(bg_id)}

    def close(self) -> None:
        self.renderer.close()


def warp_full_frame(image: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """The crop of a full-frame image that ``affine`` (full -> crop pixels) defines; zeros outside."""
    from PIL import Image

    a = np.vstack([affine, [0, 0, 1]])
    inv = np.linalg.inv(a)
    # PIL maps output (x, y) to input (a x + b y + c, d x + e y + f) in pixel-corner coordinates
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    m = shift @ inv @ np.linalg.inv(shift)
    channels = image.shape[2]
    pil = Image.fromarray(image if channels != 1 else image[..., 0])
    out = pil.transform((size, size), Image.AFFINE, data=tuple(m[:2].ravel()), resample=Image.BILINEAR)
    out = np.asarray(out)
    return out if channels != 1 else out[..., None]


# ----------------------------------------------------------------------------------------------- storage
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()




def shard_path(root: Path, split: str, shard: int) -> Path:
    return root / split / f"shard-{shard:04d}.npz"


def manifest_path(root: Path, split: str) -> Path:
    return root / split / "manifest.json"


class CorruptShardError(RuntimeError):
    """A shard whose bytes do not match its manifest checksum."""


def check_split(root: Path, spec: BenchmarkSpec, verify_checksums: bool = True) -> list[int]:
    """Shards of a split that are missing or corrupt (all of them when the manifest does not match)."""
    mpath = manifest_path(root, spec.split)
    if not mpath.exists():
        return list(range(spec.n_shards))
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        return list(range(spec.n_shards))
    if manifest.get("spec") != asdict(spec):
        return list(range(spec.n_shards))
    bad = []
    for shard in range(spec.n_shards):
        entry = manifest["shards"].get(str(shard)) if "shards" in manifest else None
        path = shard_path(root, spec.split, shard)
        if entry is None or not path.exists() or path.stat().st_size != entry["bytes"]:
            bad.append(shard)
        elif verify_checksums and sha256_file(path) != entry["sha256"]:
            bad.append(shard)
    return bad


def _write_shard(root: Path, spec: BenchmarkSpec, shard: int, arrays: dict[str, np.ndarray]) -> dict:
    path = shard_path(root, spec.split, shard)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), "n": int(len(arrays["image"]))}


def _write_manifest(root: Path, spec: BenchmarkSpec, shards: dict[str, dict]) -> None:
    manifest = {"spec": asdict(spec), "n": spec.n, "shards": shards}
    atomic_write(manifest_path(root, spec.split), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


# worker state of a spawn pool: one body model and one GL context per process
_WORKER: dict = {}


def _worker_init(cfg_dict_profile: str, overrides: dict) -> None:
    from vqhps.body import load_body
    from vqhps.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(cfg_dict_profile, **overrides)
    _WORKER["renderer"] = ShardRenderer(load_body(cfg), cfg.data.crop_size)


def _worker_render(args) -> tuple[BenchmarkSpec, int, dict]:
    spec, shard = args
    return spec, shard, _WORKER["renderer"].render_shard(spec, shard)


#: thread-count variables a render worker starts with: 14 processes each running a BLAS pool as wide
#: as the machine would oversubscribe the cores many times over
_WORKER_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def build_split(cfg, split: str, workers: int | None = None, progress: bool = True,
                overrides: dict | None = None) -> Path:
    """Render a split's missing or corrupt shards and (re)write its manifest; returns the split folder."""
    return build_splits(cfg, (split,), workers, progress, overrides)[split]


def build_splits(cfg, splits: tuple[str, ...] = SPLITS, workers: int | None = None, progress: bool = True,
                 overrides: dict | None = None) -> dict[str, Path]:
    """Render the missing or corrupt shards of ``splits`` (one worker pool for all of them, largest
    split first, so no split waits for another's last shard) and (re)write their manifests."""
    from vqhps.body import load_body

    root = cfg.data_dir / "benchmark"
    body = load_body(cfg)
    specs = {split: make_spec(cfg, split, body.identifier()) for split in splits}
    todo = {split: check_split(root, spec) for split, spec in specs.items()}
    shards: dict[str, dict[str, dict]] = {}
    for split, spec in specs.items():
        mpath = manifest_path(root, split)
        old = json.loads(mpath.read_text())["shards"] if mpath.exists() and len(todo[split]) < spec.n_shards else {}
        shards[split] = {k: v for k, v in old.items() if int(k) not in todo[split]}
    tasks = [(specs[split], shard) for split in sorted(specs, key=lambda s: -specs[s].n) for shard in todo[split]]
    workers = cfg.data.num_workers if workers is None else workers
    bar = tqdm(total=len(tasks), desc="rendering " + ", ".join(s for s in splits if todo[s]), disable=not progress)
    if tasks and workers <= 0:
        renderer = ShardRenderer(body, cfg.data.crop_size)
        try:
            for spec, shard in tasks:
                shards[spec.split][str(shard)] = _write_shard(root, spec, shard, renderer.render_shard(spec, shard))
                bar.update()
        finally:
            renderer.close()
    elif tasks:
        with environment({k: "1" for k in _WORKER_THREAD_ENV}):  # inherited by the spawned workers
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(tasks)), initializer=_worker_init,
                          initargs=(cfg.profile, overrides or {})) as pool:
                pending = pool.imap_unordered(_worker_render, tasks)
                for _ in tasks:
                    spec, shard, arrays = pending.next(timeout=1800)
                    shards[spec.split][str(shard)] = _write_shard(root, spec, shard, arrays)
                    bar.update()
    bar.close()
    for split, spec in specs.items():
        if todo[split]:
            _write_manifest(root, spec, dict(sorted(shards[split].items(), key=lambda kv: int(kv[0]))))
    return {split: root / split for split in splits}


def build_benchmark(cfg, workers: int | None = None, progress: bool = True) -> dict[str, Path]:
    """All three splits of the profile's benchmark (cached: only missing or corrupt shards render)."""
    return build_splits(cfg, SPLITS, workers, progress)


def load_split(cfg, split: str, verify: bool = True) -> dict[str, np.ndarray]:
    """Every array of a built split, concatenated over shards; refuses a corrupt or stale split."""
    from vqhps.body import load_body

    root = cfg.data_dir / "benchmark"
    spec = make_spec(cfg, split, load_body(cfg).identifier())
    bad = check_split(root, spec, verify_checksums=verify)
    if bad:
        raise CorruptShardError(
            f"{root / split}: shards {bad} are missing, corrupt or were built with other settings; "
            "rebuild them with vqhps.data.synthetic.build_split (or `python -m vqhps prepare`)")
    parts = []
    for shard in range(spec.n_shards):
        with np.load(shard_path(root, split, shard)) as f:
            parts.append({k: f[k] for k in f.files})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
