"""HMR baseline (Kanazawa et al. 2018): the backbone's pooled feature -> iterative error feedback
regression of body-model parameters (global rotation, 27 joint rotations, 6 phenotypes) and a
weak-perspective camera, starting from a mean standing body upright and facing the camera; the mesh
comes from the (differentiable) body model. Losses on 2D joints, 3D joints and parameters."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbone import build_backbone
from .body_params import (DEFAULT_WEIGHTS, IterativeRegressor, ParamLayout, ensure_body_device,
                          parametric_terms, pose_body, pose_spec, weighted_total)
from .layers import REGRESSION_MLP


class HMR(nn.Module):
    """``HMR(cfg, body)``: cfg is the full Config (``cfg.vqhps``: backbone, backbone_weights, dropout), body the
    body model (kept unregistered: it is not trained, not saved, and moved to the images' device on
    use). ``init_pose`` names the key pose the regression starts from (``None``: anny's rest pose);
    ``weights`` overrides entries of ``DEFAULT_WEIGHTS`` (reproj, joints3d, pose, rot, shape, cam_reg)."""

    #: width of the bounding-box input; 0 for HMR (CLIFF overrides)
    extra_dim = 0
    #: camera frame of the predicted rotation and meshes (``vqhps.data.datasets.FRAMES``): HMR sees
    #: the crop only, so it predicts them in the crop's own camera (CLIFF overrides)
    frame = "crop"

    def __init__(self, cfg, body, n_iter: int = 3, hidden: int = 1024, init_pose: str | None = "stand",
                 weights: dict[str, float] | None = None) -> None:
        super().__init__()
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        object.__setattr__(self, "body", body)  # not a submodule: see class docstring
        self.layout = ParamLayout(shape_dim=int(body.shape_dim), spec=pose_spec(body))
        self.backbone = build_backbone(cfg.vqhps.backbone, cfg.vqhps.backbone_weights)
        self.regressor = IterativeRegressor(self.backbone.out_dim + self.extra_dim, self.layout.mean(init_pose), hidden,
                                            cfg.vqhps.dropout, n_iter)
        self._arch = {"model": type(self).__name__.lower(), "n_iter": n_iter, "hidden": hidden, "mlp": REGRESSION_MLP,
                      "init_pose": init_pose, "body_id": body.identifier(), "backbone": self.backbone.name}

    def architecture(self) -> dict[str, Any]:
        """What a checkpoint must share with this model to be loaded into it."""
        return dict(self._arch)

    def regress(self, images: torch.Tensor, extra: torch.Tensor | None = None) -> list[torch.Tensor]:
        """images (B, 3, S, S) [+ extra (B, extra_dim)] -> the parameter vector after each iteration."""
        pooled, _ = self.backbone(images)
        if extra is not None:
            pooled = torch.cat((pooled, extra.to(pooled.dtype)), dim=-1)
        return self.regressor(pooled)

    def decode(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, dim) parameters -> dict(params, rotmat, local_rotmat (B, 27, 3, 3), pose (B, 104, 3, 3),
        shape, cam, canonical, vertices (oriented, centred), joints24, joints17), all fp32."""
        ensure_body_device(self.body, params.device)
        out = {"params": params, **self.layout.decode(params)}
        out.update(pose_body(self.body, out["rotmat"], out["pose"], out["shape"]))
        return out

    def forward(self, images: torch.Tensor, bbox_info: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images (B, 3, S, S) -> ``decode`` of the final parameters; ``bbox_info`` is ignored (HMR
        sees the crop only)."""
        return self.decode(self.regress(images)[-1])

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """dict(loss, reproj, joints3d, pose, rot, shape, cam_reg): see ``parametric_terms``."""
        return weighted_total(parametric_terms(outputs, batch, self.body, self.frame), self.weights)
