"""Training losses of VQ-HPS (paper Sec. 4.3 and the Table 2 "3D loss" ablation).

2D joint convention: ``joints2d`` are in normalised crop coordinates: (-1, -1) is the outer
top-left corner of the crop and (1, 1) its outer bottom-right corner, i.e. ``x_n = (u + 0.5) * 2 / W - 1``
for a pixel-centre coordinate u of a W-wide crop (``vqhps.data.datasets.pixels_to_unit``); joints
outside the crop lie outside [-1, 1]. The 3D joints are in camera-aligned axes (x to the image right,
y to the image bottom: the canonical joints rotated by the root rotation), so the weak-perspective
camera ``s * X[..., :2] + t`` lands on those coordinates; s is about 2 f / (W Z) and t is where the
mesh's vertex mean projects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import weak_perspective_project


def token_cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N, S) logits and (B, N) target codebook indices -> mean cross-entropy over all B*N tokens
    (paper eq. 1)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))


def rotation_mse(R_pred: torch.Tensor, R_gt: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) x2 -> mean squared difference over all matrix entries (paper eq. 2)."""
    return F.mse_loss(R_pred.float(), R_gt.float())


def reprojection_l1(joints3d: torch.Tensor, cam: torch.Tensor, joints2d: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error between ``s * X[..., :2] + t`` of (B, J, 3) joints and (B, J, 2) target
    joints in normalised crop coordinates (module docstring), paper eq. 3. ``weight`` (B, J) or
    (B, J, 1), e.g. visibility, weighs each joint; the mean is then over weighted coordinates."""
    diff = (weak_perspective_project(joints3d.float(), cam.float()) - joints2d.float()).abs()
    if weight is None:
        return diff.mean()
    w = weight.float()
    if w.dim() == 2:
        w = w[..., None]
    w = w.expand_as(diff)
    return (diff * w).sum() / w.sum().clamp_min(1e-8)


def vertex_l2(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) x2 -> mean per-vertex Euclidean distance (same unit as the input)."""
    return (pred.float() - gt.float()).norm(dim=-1).mean()
