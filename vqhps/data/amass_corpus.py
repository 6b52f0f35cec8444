"""AMASS as the Mesh-VQ-VAE's pre-training corpus (paper source): the SMPL body parameters of every
``data.amass_stride``-th frame of every motion file under ``paths.amass_dir``, global orientation
zeroed, read once (with a progress bar) into one cached table under ``cfg.data_dir``.

The table holds parameters, not meshes: a posed SMPL mesh takes 83 KB, so AMASS's million-odd
sub-sampled frames would need tens of GB, while posing a batch on the device costs about a
millisecond. Training streams shuffled batches of the table, posed on the device by
``canonical_targets`` (the benchmark's own targets), as fine-tuning does with the 3DPW meshes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from .amass import find_amass_files, load_amass_npz

CORPUS_VERSION = 1


def amass_files(cfg) -> list[Path]:
    """The motion files used: every ``.npz`` under ``paths.amass_dir`` (sorted, per-subject shape
    files left out), the first ``data.amass_max_files`` when set."""
    files = find_amass_files(cfg.paths.amass_dir)
    if not files:
        raise FileNotFoundError(f"no AMASS motion files (*.npz) under {cfg.paths.amass_dir}; set VQHPS_AMASS_DIR to "
                                f"the folder holding the unpacked AMASS datasets (SMPL+H G or SMPL-X N)")
    return files[:cfg.data.amass_max_files] if cfg.data.amass_max_files else files


def corpus_key(cfg, files: list[Path]) -> dict:
    """What the table depends on: the files (``amass_files``: names, sizes, mtimes) and the stride."""
    from .pw3d_crops import file_fingerprint

    return {"version": CORPUS_VERSION, "stride": cfg.data.amass_stride, "n_files": len(files),
            "files": file_fingerprint(files), "root": str(cfg.paths.amass_dir)}


def corpus_path(cfg) -> Path:
    return cfg.data_dir / "amass" / "corpus.npz"


def build_corpus(cfg, progress: bool = True) -> Path:
    """Read the AMASS files into the cached parameter table (pose (N, 72) with the root zeroed, betas
    (N, 10) float32) unless a table of the same files and stride is there; returns its path."""
    path = corpus_path(cfg)
    files = amass_files(cfg)  # one walk of the AMASS tree serves the key and the reading
    key = corpus_key(cfg, files)
    if _key_of(path) == key:
        return path
    poses, betas = [], []
    for file in tqdm(files, desc="reading AMASS", disable=not progress):
        seq = load_amass_npz(file)
        p = seq["poses"][::cfg.data.amass_stride].copy()
        p[:, :3] = 0.0  # canonical meshes: no global orientation
        poses.append(p)
        betas.append(np.repeat(seq["betas"][None], len(p), axis=0))
    table = {"pose": np.concatenate(poses).astype(np.float32), "shape": np.concatenate(betas).astype(np.float32),
             "key": np.array(json.dumps(key, sort_keys=True))}
    atomic_write(path, lambda f: np.savez(f, **table))
    return path


def _key_of(path: Path) -> dict | None:
    try:
        with np.load(path) as f:
            return json.loads(str(f["key"]))
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None


def load_corpus(cfg, progress: bool = True) -> dict[str, np.ndarray]:
    """The cached table {"pose", "shape"} (built first when missing or stale)."""
    with np.load(build_corpus(cfg, progress)) as f:
        return {"pose": f["pose"], "shape": f["shape"]}


def held_out(table: dict[str, np.ndarray], n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` rows of the table drawn without replacement (seeded): a sample of what pre-training sees."""
    rng = np.random.default_rng([seed, 9173])
    idx = np.sort(rng.choice(len(table["pose"]), size=min(n, len(table["pose"])), replace=False))
    return {k: v[idx] for k, v in table.items()}


__all__ = ["amass_files", "build_corpus", "load_corpus", "corpus_path", "held_out"]
