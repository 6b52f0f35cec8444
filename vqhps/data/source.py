"""The study's data source, one seam: everything the library and the notebooks need from the data,
dispatched on ``cfg.data.source`` — ``synthetic`` (the anny benchmark and mesh corpus) or ``paper``
(3DPW crops and AMASS meshes on the user's SMPL, ``pw3d_crops`` and ``amass_corpus``). Both give
split arrays of one schema (``synthetic.SHARD_KEYS``), so training and evaluation run unchanged.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import synthetic

SPLITS = synthetic.SPLITS
PART_NAMES = synthetic.PART_NAMES
#: the paper's Mesh-VQ-VAE pooling hierarchy on SMPL's template (vertices per level, finest first)
PAPER_LEVEL_SIZES = (6890, 1925, 400, 54)
#: SMPL joint -> body part of the vertices it moves most (``PART_NAMES``; each joint's bone runs to
#: its child, so the hip moves the thigh, the knee the shin, the shoulder the upper arm)
SMPL_JOINT_PARTS = {
    "pelvis": "torso", "spine1": "torso", "spine2": "torso", "spine3": "torso", "left_collar": "torso",
    "right_collar": "torso", "neck": "head", "head": "head", "left_hip": "upper_leg", "right_hip": "upper_leg",
    "left_knee": "lower_leg", "right_knee": "lower_leg", "left_ankle": "foot", "right_ankle": "foot",
    "left_foot": "foot", "right_foot": "foot", "left_shoulder": "upper_arm", "right_shoulder": "upper_arm",
    "left_elbow": "lower_arm", "right_elbow": "lower_arm", "left_wrist": "hand", "right_wrist": "hand",
    "left_hand": "hand", "right_hand": "hand",
}


def is_paper(cfg) -> bool:
    return cfg.data.source == "paper"


def prepare(cfg, progress: bool = True, workers: int | None = None) -> dict[str, object]:
    """Make every split (and, for the paper source, the AMASS table) the study reads; cached, so a
    second call only checks. Returns {split: folder} (plus "amass": its table's path)."""
    if not is_paper(cfg):
        return dict(synthetic.build_benchmark(cfg, workers=workers, progress=progress))
    from . import amass_corpus, pw3d_crops

    out: dict[str, object] = dict(pw3d_crops.build_splits(cfg, SPLITS, workers=workers, progress=progress))
    out["amass"] = amass_corpus.build_corpus(cfg, progress=progress)
    return out


def load_split(cfg, split: str, verify: bool = True, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """A built split's arrays (``synthetic.SHARD_KEYS``; only ``keys`` when given)."""
    if not is_paper(cfg):
        return synthetic.load_split(cfg, split, verify=verify, keys=keys)
    from . import pw3d_crops

    return pw3d_crops.load_split(cfg, split, verify=verify, keys=keys)


def split_meshes(cfg, split: str) -> dict[str, np.ndarray]:
    """Pose, shape and subject of every image of a split: the meshes the Mesh-VQ-VAE fine-tunes and is
    tested on (synthetic: drawn without rendering; paper: read from the cropped split)."""
    if not is_paper(cfg):
        return synthetic.split_meshes(cfg, split)
    return load_split(cfg, split, keys=("pose", "shape", "subject"))


class PretrainStream:
    """``batch(step)``: canonical meshes (B, V, 3) on ``device`` of pre-training step ``step``, from the
    anny mesh corpus (synthetic) or a shuffled pass over the cached AMASS table (paper), posed on the
    device; the table lives on the device, so a step copies nothing from the host."""

    def __init__(self, cfg, body, batch_size: int, device: torch.device | str):
        from ..train import device_step_indices

        self.cfg, self.body, self.batch_size, self.device = cfg, body, batch_size, device
        if is_paper(cfg):
            from .amass_corpus import load_corpus

            table = load_corpus(cfg, progress=cfg.runtime.progress)
            self.pose = torch.as_tensor(table["pose"], device=device)
            self.shape = torch.as_tensor(table["shape"], device=device)
            self.indices = device_step_indices(len(self.pose), batch_size, cfg.seed, device)

    def batch(self, step: int) -> torch.Tensor:
        if not is_paper(self.cfg):
            from ..train import rank_slice
            from .corpus import corpus_batch

            return rank_slice(corpus_batch(self.body, "train", step, self.batch_size, self.cfg.seed, self.device))
        from .datasets import canonical_targets

        idx = self.indices(step)
        return canonical_targets(self.body, self.pose[idx], self.shape[idx])


def pretrain_sample(cfg, body, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` canonical meshes of the pre-training data (synthetic: the corpus's first batches, those
    pre-training sees first; paper: a seeded draw from the AMASS table)."""
    if not is_paper(cfg):
        from .corpus import corpus_batch

        batch = cfg.vqvae.batch_size
        return torch.cat([corpus_batch(body, "train", step, batch, cfg.seed, device)
                          for step in range(-(-n // batch))])[:n]
    from .amass_corpus import held_out, load_corpus
    from .datasets import canonical_targets

    table = held_out(load_corpus(cfg, progress=False), n, cfg.seed)
    return canonical_targets(body, torch.as_tensor(table["pose"]), torch.as_tensor(table["shape"])).to(device)


def vertex_parts(body) -> np.ndarray:
    """Part id (index into ``PART_NAMES``) of each vertex, from its most weighted bone: anny's bone
    labels or SMPL's joints (``SMPL_JOINT_PARTS``)."""
    if getattr(body, "name", "") != "smpl":
        return synthetic.vertex_parts(body)
    from ..body.base import SMPL24_NAMES

    joint_part = np.array([PART_NAMES.index(SMPL_JOINT_PARTS[n]) for n in SMPL24_NAMES])
    return joint_part[body.lbs_weights.cpu().numpy().argmax(1)]


def hierarchy_levels(cfg, body) -> pd.DataFrame:
    """Vertices per level of the Mesh-VQ-VAE's pooling hierarchy on ``body`` beside the paper's (SMPL:
    6,890 -> 1,925 -> 400 -> 54) and each level's share of the finest, ours and the paper's."""
    from ..vqvae_training import body_hierarchy

    sizes = tuple(int(s) for s in body_hierarchy(cfg, body).sizes)
    rows = []
    for level, n in enumerate(sizes):
        paper = PAPER_LEVEL_SIZES[level] if level < len(PAPER_LEVEL_SIZES) else float("nan")
        rows.append({"level": level, "vertices": n, "paper_vertices": paper, "ratio": n / sizes[0],
                     "paper_ratio": paper / PAPER_LEVEL_SIZES[0], "body": body.name})
    return pd.DataFrame(rows)


def _frames(stride: int) -> str:
    return "every frame" if stride == 1 else f"one frame in {stride}"


def describe(cfg) -> pd.DataFrame:
    """One row saying which data and body a run used (``data_source.csv``; the report's caption)."""
    if not is_paper(cfg):
        row = {"source": "synthetic", "body": "anny", "images": "rendered synthetic benchmark (3DPW analogue)",
               "pretraining": "anny mesh corpus (AMASS analogue)", "like_for_like": False}
    else:
        row = {"source": "paper", "body": "smpl", "images": f"3DPW crops ({_frames(cfg.data.pw3d_stride)})",
               "pretraining": f"AMASS ({_frames(cfg.data.amass_stride)})", "like_for_like": True}
    return pd.DataFrame([row])


__all__ = ["SPLITS", "PART_NAMES", "prepare", "load_split", "split_meshes", "PretrainStream", "pretrain_sample",
           "vertex_parts", "hierarchy_levels", "describe", "is_paper"]


def example_bodies(cfg, body, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose and shape of ``n`` bodies to show: synthetic, library poses on uniformly drawn phenotypes;
    paper, AMASS frames with their subjects' betas (a seeded draw from the pre-training table)."""
    if is_paper(cfg):
        from .amass_corpus import held_out, load_corpus

        table = held_out(load_corpus(cfg, progress=False), n, cfg.seed)
        return torch.as_tensor(table["pose"]), torch.as_tensor(table["shape"])
    from .poses import PoseSampler

    rng = np.random.default_rng(cfg.seed)
    pose, _ = PoseSampler(seed=cfg.seed).sample(n)
    return torch.as_tensor(pose), torch.as_tensor(rng.uniform(0, 1, (n, body.shape_dim)), dtype=torch.float32)


def smpl_regressor_table(body) -> pd.DataFrame:
    """Where SMPL's joint regressors come from and their row sums (1 for a proper weighting): the
    user's model file and ``J_regressor_h36m.npy``; nothing is fitted for SMPL."""
    return pd.DataFrame({"set": ["24 (SMPL joints)", "17 (H36M)"],
                         "source": ["SMPL model file", getattr(body, "regressor17_source", "file")],
                         "row_sum_min": [float(body.regressor24.sum(1).min()), float(body.regressor17.sum(1).min())],
                         "row_sum_max": [float(body.regressor24.sum(1).max()), float(body.regressor17.sum(1).max())]})
