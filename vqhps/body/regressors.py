"""Sparse, non-negative vertex -> joint regressors for anny, fitted like SMPL's own: least squares
over posed samples of the mesh against the skeleton points the joints stand for.

anny has no SMPL skeleton, so each of the 24 SMPL-like and 17 H36M-like joints is defined by anny
bone heads (or a surface vertex for the top of the head); the regressor then recovers it from the
vertices alone, which is what a predicted mesh offers.

The poses to fit on come from the caller (``sampler``): this module knows bodies, not pose sources.
``vqhps.body_setup`` fits with the project's pose library; ``vqhps.body.load_body`` reads the cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.optimize import nnls
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from .base import H36M17_NAMES, SMPL24_NAMES

#: bump when the fitting procedure changes, so cached regressors are refitted
FIT_VERSION = 3

#: joint -> ((anny bone, weight), ...): the joint is that weighted mean of bone heads
SMPL24_TARGETS: dict[str, tuple[tuple[str, float], ...]] = {
    "pelvis": (("upperleg01.L", 0.5), ("upperleg01.R", 0.5)),
    "left_hip": (("upperleg01.L", 1.0),),
    "right_hip": (("upperleg01.R", 1.0),),
    "spine1": (("spine03", 1.0),),
    "left_knee": (("lowerleg01.L", 1.0),),
    "right_knee": (("lowerleg01.R", 1.0),),
    "spine2": (("spine02", 1.0),),
    "left_ankle": (("foot.L", 1.0),),
    "right_ankle": (("foot.R", 1.0),),
    "spine3": (("spine01", 1.0),),
    "left_foot": (("toe3-1.L", 1.0),),
    "right_foot": (("toe3-1.R", 1.0),),
    "neck": (("neck01", 1.0),),
    "left_collar": (("shoulder01.L", 1.0),),
    "right_collar": (("shoulder01.R", 1.0),),
    "head": (("head", 1.0),),
    "left_shoulder": (("upperarm01.L", 1.0),),
    "right_shoulder": (("upperarm01.R", 1.0),),
    "left_elbow": (("lowerarm01.L", 1.0),),
    "right_elbow": (("lowerarm01.R", 1.0),),
    "left_wrist": (("wrist.L", 1.0),),
    "right_wrist": (("wrist.R", 1.0),),
    "left_hand": (("finger3-1.L", 1.0),),
    "right_hand": (("finger3-1.R", 1.0),),
}
#: H36M joint -> bone heads; "head_top" is the highest template vertex of the head (HEAD_TOP)
H36M17_TARGETS: dict[str, tuple[tuple[str, float], ...]] = {
    "pelvis": SMPL24_TARGETS["pelvis"],
    "right_hip": SMPL24_TARGETS["right_hip"],
    "right_knee": SMPL24_TARGETS["right_knee"],
    "right_ankle": SMPL24_TARGETS["right_ankle"],
    "left_hip": SMPL24_TARGETS["left_hip"],
    "left_knee": SMPL24_TARGETS["left_knee"],
    "left_ankle": SMPL24_TARGETS["left_ankle"],
    "spine": (("spine02", 0.5), ("spine03", 0.5)),
    "thorax": (("neck01", 1.0),),
    "neck": (("head", 1.0),),
    "head_top": (),
    "left_shoulder": SMPL24_TARGETS["left_shoulder"],
    "left_elbow": SMPL24_TARGETS["left_elbow"],
    "left_wrist": SMPL24_TARGETS["left_wrist"],
    "right_shoulder": SMPL24_TARGETS["right_shoulder"],
    "right_elbow": SMPL24_TARGETS["right_elbow"],
    "right_wrist": SMPL24_TARGETS["right_wrist"],
}


def target_matrix(names: tuple[str, ...], targets: dict, bone_labels: list[str]) -> np.ndarray:
    """(J, n_bones) weights so that joints = weights @ bone_heads (zero rows: vertex targets)."""
    index = {b: i for i, b in enumerate(bone_labels)}
    weights = np.zeros((len(names), len(bone_labels)))
    for j, name in enumerate(names):
        for bone, w in targets[name]:
            weights[j, index[bone]] = w
    return weights


def head_top_vertex(template: np.ndarray) -> int:
    """The top of the head: the highest template vertex (y up)."""
    return int(np.argmax(template[:, 1]))


def joint_targets(vertices: torch.Tensor, bone_heads: torch.Tensor, bone_labels: list[str], template: np.ndarray):
    """Skeleton points the two regressors imitate: (B, 24, 3) and (B, 17, 3)."""
    w24 = torch.as_tensor(target_matrix(SMPL24_NAMES, SMPL24_TARGETS, bone_labels), dtype=bone_heads.dtype)
    w17 = torch.as_tensor(target_matrix(H36M17_NAMES, H36M17_TARGETS, bone_labels), dtype=bone_heads.dtype)
    j24 = torch.einsum("jb,nbc->njc", w24, bone_heads)
    j17 = torch.einsum("jb,nbc->njc", w17, bone_heads)
    j17[:, H36M17_NAMES.index("head_top")] = vertices[:, head_top_vertex(template)]
    return j24, j17


def fit_regressor(vertices: np.ndarray, joints: np.ndarray, rest: np.ndarray, rest_joints: np.ndarray,
                  n_candidates: int = 400, sum_weight: float = 10.0) -> np.ndarray:
    """Non-negative least squares per joint over its ``n_candidates`` nearest rest vertices.

    vertices (N, V, 3), joints (N, J, 3), rest (V, 3) and rest_joints (J, 3) of the rest pose ->
    (J, V) with rows summing to ~1 (an extra
    heavily weighted equation, then exact normalisation), so the regressor commutes with translations.
    """
    n, v, _ = vertices.shape
    out = np.zeros((joints.shape[1], v))
    for j in range(joints.shape[1]):
        cand = np.argsort(np.linalg.norm(rest - rest_joints[j], axis=1))[:n_candidates]
        a = vertices[:, cand, :].transpose(0, 2, 1).reshape(n * 3, cand.size)
        b = joints[:, j, :].reshape(n * 3)
        a = np.vstack([a, np.full((1, cand.size), sum_weight)])
        b = np.append(b, sum_weight)
        w, _ = nnls(a, b, maxiter=50 * cand.size)
        out[j, cand] = w / w.sum()  # exactly affine: regressed joints move with the mesh
    return out


def posed_samples(body, n: int, seed: int, sampler: Callable, batch: int = 100):
    """Posed meshes of random shapes and of the poses ``sampler(b) -> (poses, ...)`` draws, with their
    joint targets."""
    from .anny_body import sample_phenotypes

    rng = np.random.default_rng([seed, 1])
    verts, j24, j17 = [], [], []
    for start in tqdm(range(0, n, batch), desc="posing samples", leave=False):
        b = min(batch, n - start)
        pose, _ = sampler(b)
        shape = torch.as_tensor(sample_phenotypes(rng, b))
        with torch.no_grad():
            out = body.pose_with_bones(torch.as_tensor(pose), shape)
        t24, t17 = joint_targets(out["vertices"], out["bone_heads"], body.bone_labels, body.template.numpy())
        verts.append(out["vertices"].double().numpy())
        j24.append(t24.double().numpy())
        j17.append(t17.double().numpy())
    return np.concatenate(verts), np.concatenate(j24), np.concatenate(j17)


def regressor_error_mm(regressor: np.ndarray, vertices: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """Per-joint mean distance (mm) between regressed joints and their targets."""
    pred = np.einsum("jv,nvc->njc", regressor, vertices)
    return 1000.0 * np.linalg.norm(pred - joints, axis=-1).mean(0)


def regressor_path(body, cache_dir: Path, n_samples: int = 2000, seed: int = 1234) -> Path:
    """Where the regressors of ``body`` fitted on ``n_samples`` posed samples of ``seed`` are cached."""
    key = hashlib.sha1(json.dumps([FIT_VERSION, body.identifier(), n_samples, seed, SMPL24_TARGETS, H36M17_TARGETS],
                                  sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"regressors-{key}.npz"


def load_regressors(body, cache_dir: Path, n_samples: int = 2000, seed: int = 1234) -> dict[str, np.ndarray] | None:
    """The cached regressors of ``body`` (``regressor24``, ``regressor17``), or None when not fitted yet."""
    path = regressor_path(body, cache_dir, n_samples, seed)
    if not path.exists():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def fit_regressors(body, cache_dir: Path, n_samples: int, seed: int, sampler: Callable) -> dict[str, np.ndarray]:
    """Fit both regressors of ``body`` on ``n_samples`` poses from ``sampler`` and cache them (atomically)
    where ``load_regressors`` looks."""
    verts, j24, j17 = posed_samples(body, n_samples, seed, sampler)
    with torch.no_grad():
        rest_out = body.pose_with_bones(body.rest_pose(1), torch.full((1, body.shape_dim), 0.5))
    rest = rest_out["vertices"][0].double().numpy()
    r24, r17 = joint_targets(rest_out["vertices"], rest_out["bone_heads"], body.bone_labels, body.template.numpy())
    result = {"regressor24": fit_regressor(verts, j24, rest, r24[0].double().numpy()),
              "regressor17": fit_regressor(verts, j17, rest, r17[0].double().numpy())}
    atomic_write(regressor_path(body, cache_dir, n_samples, seed), lambda f: np.savez(f, **result))
    return result
