"""Evaluation metrics in millimetres (paper Sec. 5.2, authors' protocol).

Both meshes are centred on their vertex mean before any comparison; 17 H36M-like joints are then
taken from the centred meshes through a linear regressor. PVE compares vertices, MPJPE joints, and
PA-MPJPE joints after a similarity Procrustes alignment of the prediction. Inputs are in metres;
every per-sample function returns a (B,) tensor in mm. Computation runs in float64.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .geometry import similarity_procrustes

METRIC_COLUMNS = ("PVE", "MPJPE", "PA-MPJPE")
#: a global-rotation error above this (degrees) is a front/back flip: the body seen facing the other way
ROT_FLIP_DEG = 90.0


def centre_on_vertex_mean(verts: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) -> the same meshes translated so their vertex mean is the origin."""
    return verts - verts.mean(dim=-2, keepdim=True)


def _mean_distance_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).norm(dim=-1).mean(dim=-1) * 1000.0


def pve(pred_verts: torch.Tensor, gt_verts: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) x2 in metres -> (B,) mean per-vertex Euclidean error in mm, both centred first."""
    return _mean_distance_mm(centre_on_vertex_mean(pred_verts.double()), centre_on_vertex_mean(gt_verts.double()))


def mpjpe(pred_j17: torch.Tensor, gt_j17: torch.Tensor) -> torch.Tensor:
    """(B, J, 3) x2 in metres -> (B,) mean per-joint error in mm. The joints are used as given:
    take them from vertex-mean-centred meshes (``joints_from_centred``), as ``evaluate_meshes`` does."""
    return _mean_distance_mm(pred_j17, gt_j17)


def pa_mpjpe(pred_j17: torch.Tensor, gt_j17: torch.Tensor) -> torch.Tensor:
    """(B, J, 3) x2 in metres -> (B,) MPJPE in mm after aligning the prediction to the ground truth
    with a similarity transform (rotation, isotropic scale, translation)."""
    aligned = similarity_procrustes(pred_j17.double(), gt_j17.double())
    return _mean_distance_mm(aligned, gt_j17)


def joints_from_centred(verts: torch.Tensor, regressor: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) meshes and (J, V) regressor -> (B, J, 3) joints of the vertex-mean-centred meshes."""
    centred = centre_on_vertex_mean(verts.double())
    return torch.einsum("jv,bvc->bjc", regressor.to(device=centred.device, dtype=torch.float64), centred)


@torch.no_grad()
def evaluate_meshes(pred_verts: torch.Tensor, gt_verts: torch.Tensor, regressor17: torch.Tensor,
                    valid_mask: torch.Tensor | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-sample metrics of a batch: {"PVE", "MPJPE", "PA-MPJPE"} as (B,) float64 numpy arrays in
    mm and "valid" (B,) bool (all True when ``valid_mask`` is None). ``pandas.DataFrame(result)``
    gives the per-sample table that ``summarise`` reads; concatenate batches first."""
    pj = joints_from_centred(pred_verts, regressor17)
    gj = joints_from_centred(gt_verts, regressor17)
    out = {
        "PVE": pve(pred_verts, gt_verts),
        "MPJPE": mpjpe(pj, gj),
        "PA-MPJPE": pa_mpjpe(pj, gj),
    }
    result = {k: v.cpu().numpy() for k, v in out.items()}
    n = pred_verts.shape[0]
    if valid_mask is None:
        result["valid"] = np.ones(n, dtype=bool)
    else:
        mask = valid_mask.detach().cpu().numpy() if isinstance(valid_mask, torch.Tensor) else np.asarray(valid_mask)
        result["valid"] = mask.astype(bool).reshape(n)
    return result


def summarise(per_sample: pd.DataFrame) -> pd.DataFrame:
    """Per-sample table (columns PVE, MPJPE, PA-MPJPE and optionally a boolean "valid") -> means in
    mm, one row "full" (every sample) and one row "valid" (the valid subset; every sample when the
    column is absent; NaN when the subset is empty)."""
    missing = [c for c in METRIC_COLUMNS if c not in per_sample.columns]
    if missing:
        raise KeyError(f"per-sample table lacks columns {missing}")
    metrics = per_sample[list(METRIC_COLUMNS)].astype(float)
    valid = per_sample["valid"].astype(bool) if "valid" in per_sample.columns else pd.Series(True, index=per_sample.index)
    rows = {"full": metrics.mean(axis=0), "valid": metrics[valid.to_numpy()].mean(axis=0)}
    return pd.DataFrame(rows).T.loc[["full", "valid"], list(METRIC_COLUMNS)]
