"""CLIFF baseline (Li et al. 2022): HMR whose regressor also reads the bounding box's place and size
in the full frame, trained with the reprojection of the joints into the full frame.

Conventions. bbox (B, 4) = (x0, y0, x1, y1) full-frame pixels, K (B, 3, 3) full-frame intrinsics.
A crop pixel is ``u = (x - x0) * S / (x1 - x0) - 0.5`` and crop units are ``(u + 0.5) * 2 / S - 1``,
so a full-frame point x has crop unit ``2 (x - cx) / w`` with bbox centre cx and width w. The crop
camera (s, tx, ty) projects centred camera-aligned points X as ``s X[:2] + t``; matching it with a
pinhole at the bbox gives the full-frame translation of the vertex mean (CLIFF's formula written in
this project's ``s X + t`` convention, principal point (px, py) from K):

    Tz = 2 f / (b s),  Tx = (tx + 2 (cx - px) / b) / s,  Ty = (ty + 2 (cy - py) / b) / s.

With ``bbox_info = ((cx - px) / f, (cy - py) / f, b / f)`` (the paper's normalisation, the
principal point standing for the image centre) this depends on bbox_info alone, so the model
outputs the full-frame translation ``trans`` itself.
"""
from __future__ import annotations

from typing import Any

import torch

from ..geometry import perspective_project
from .body_params import full_precision, parametric_terms, weighted_mean_abs, weighted_total
from .hmr import HMR

#: smallest camera scale used when converting to a translation (keeps depth finite and positive)
MIN_SCALE = 1e-2
#: smallest depth (m) a projected point may have
MIN_DEPTH = 1e-2


def _bbox_geometry(bbox: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bbox = bbox.float()
    return ((bbox[:, 0] + bbox[:, 2]) / 2, (bbox[:, 1] + bbox[:, 3]) / 2,
            bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1])


def bbox_info(bbox: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(B, 4) bbox and (B, 3, 3) K -> (B, 3) ``((cx - px) / f, (cy - py) / f, b / f)``: bbox centre
    relative to the principal point and bbox size (the width; boxes are square), over the focal length."""
    cx, cy, w, _ = _bbox_geometry(bbox)
    K = K.float()
    f = K[:, 0, 0]
    return torch.stack(((cx - K[:, 0, 2]) / f, (cy - K[:, 1, 2]) / f, w / f), dim=-1)


def batch_bbox_info(batch: dict[str, Any]) -> torch.Tensor:
    """The CLIFF input of a prepared batch: ``bbox_info`` of its bbox and K (``prepare_batch`` makes
    the bbox the augmented crop's: mirrored for flips, its side divided by the zoom for scales)."""
    return bbox_info(batch["bbox"], batch["K"])


def crop_cam_to_translation(cam: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """(B, 3) crop camera (s, tx, ty) and (B, 3) bbox_info -> (B, 3) full-frame translation of the
    mesh's vertex mean (module docstring); s is clamped to ``MIN_SCALE``."""
    cam, info = cam.float(), info.float()
    s = cam[:, 0].clamp_min(MIN_SCALE)
    b = info[:, 2]
    tz = 2.0 / (b * s)
    tx = (cam[:, 1] + 2.0 * info[:, 0] / b) / s
    ty = (cam[:, 2] + 2.0 * info[:, 1] / b) / s
    return torch.stack((tx, ty, tz), dim=-1)


def translation_to_crop_cam(trans: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """Inverse of ``crop_cam_to_translation``: the crop camera whose full-frame translation is ``trans``."""
    trans, info = trans.float(), info.float()
    b = info[:, 2]
    s = 2.0 / (b * trans[:, 2])
    return torch.stack((s, s * trans[:, 0] - 2.0 * info[:, 0] / b, s * trans[:, 1] - 2.0 * info[:, 1] / b), -1)


def crop_to_full(points: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
    """(B, J, 2) crop units ([-1, 1] over the crop) -> full-frame pixels through the bbox."""
    cx, cy, w, h = _bbox_geometry(bbox)
    centre = torch.stack((cx, cy), -1)[:, None]
    half = torch.stack((w, h), -1)[:, None] / 2
    return points.float() * half + centre


def full_to_crop(points: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
    """(B, J, 2) full-frame pixels -> crop units (inverse of ``crop_to_full``)."""
    cx, cy, w, h = _bbox_geometry(bbox)
    centre = torch.stack((cx, cy), -1)[:, None]
    half = torch.stack((w, h), -1)[:, None] / 2
    return (points.float() - centre) / half


def project_full_frame(points: torch.Tensor, trans: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(B, J, 3) centred camera-aligned points placed at ``trans`` (B, 3) -> (B, J, 2) full-frame
    pixels through K; depths below ``MIN_DEPTH`` are clamped."""
    p = points.float() + trans.float()[:, None]
    p = torch.cat((p[..., :2], p[..., 2:].clamp_min(MIN_DEPTH)), dim=-1)
    return perspective_project(p, K.float())


def full_frame_size(batch: dict[str, Any]) -> torch.Tensor:
    """(B, 2) full-frame (width, height): ``batch["full_size"]`` when given, else ``2 c + 1`` from
    K's principal point c (the renderer puts it at ``(size - 1) / 2``)."""
    if "full_size" in batch:
        return batch["full_size"].float()
    K = batch["K"].float()
    return 2.0 * K[:, :2, 2] + 1.0


class CLIFF(HMR):
    """``CLIFF(cfg, body)``: HMR whose regressor input is [pooled feature ⊕ bbox_info ⊕ params];
    ``forward(images, bbox_info)`` adds ``trans`` (B, 3), the full-frame translation, to HMR's
    outputs. The loss replaces HMR's crop reprojection by the full-frame one (weight
    ``weights["reproj"]``), errors divided by half the full-frame size; the crop reprojection is still
    reported and weighs ``crop_reproj_weight`` (default 0). Other arguments: see ``HMR``."""

    extra_dim = 3
    #: CLIFF sees where the box is, so it predicts the full frame's camera-frame rotation
    frame = "camera"

    def __init__(self, cfg, body, n_iter: int = 3, hidden: int = 1024, init_pose: str | None = "stand",
                 weights: dict[str, float] | None = None, crop_reproj_weight: float = 0.0) -> None:
        super().__init__(cfg, body, n_iter, hidden, init_pose, weights)
        self.crop_reproj_weight = float(crop_reproj_weight)

    def forward(self, images: torch.Tensor, bbox_info: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if bbox_info is None:
            raise ValueError("CLIFF needs bbox_info (B, 3): vqhps.models.cliff.batch_bbox_info(batch), i.e. "
                             "bbox_info(batch['bbox'], batch['K'])")
        info = bbox_info.to(images.device).float()
        out = self.decode(self.regress(images, info)[-1])
        with full_precision(out["cam"]):
            out["trans"] = crop_cam_to_translation(out["cam"], info)
        out["bbox_info"] = info
        return out

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """HMR's terms plus ``reproj_full``: L1 between the full-frame projection (``trans``, K) of the
        predicted joints24 and the target crop joints mapped back through the (augmented) bbox,
        divided by half the full-frame size. Batch also needs K and bbox, optional ``full_size``."""
        terms = parametric_terms(outputs, batch, self.body, self.frame)
        with full_precision(outputs["vertices"]):
            target = crop_to_full(batch["joints2d"], batch["bbox"])
            pred = project_full_frame(outputs["joints24"], outputs["trans"], batch["K"])
            half = full_frame_size(batch)[:, None] / 2
            terms["reproj_full"] = weighted_mean_abs((pred - target) / half, batch.get("joints2d_weight"))
        weights = {**self.weights, "reproj": self.crop_reproj_weight, "reproj_full": self.weights["reproj"]}
        return weighted_total(terms, weights)


__all__ = ["CLIFF", "bbox_info", "batch_bbox_info", "crop_cam_to_translation",
           "translation_to_crop_cam", "crop_to_full", "full_to_crop", "project_full_frame", "full_frame_size"]
