"""Figures of the method comparison (notebook 04): the qualitative grid of the paper's Fig. 4 (test
images x each method's mesh overlaid, beside the ground truth) and the baselines' learning curves.

Overlays reuse the demo's camera (``demo.overlay_camera`` / ``demo.render_overlay``): each mesh is
drawn with its own predicted weak-perspective camera; the ground truth with the crop camera of its
true full-frame translation (``cliff.translation_to_crop_cam``), so every column is placed as its
method places it.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .hps_training import ModelFn, iterate_split, learning_curves_figure  # noqa: E402
from .models.body_params import oriented_targets  # noqa: E402
from .models.cliff import bbox_info, translation_to_crop_cam  # noqa: E402
from .train import autocast  # noqa: E402

#: quantiles of VQ-HPS's per-sample PVE at which Fig. 4's test images are taken (best to worst)
QUALITATIVE_QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)
#: (column, axis label) of the baselines' learning-curve panels
BASELINE_CURVE_PANELS = (("loss", "training loss (each model's own)"), ("pve_mm", "training PVE (mm)"),
                         ("rot_err_deg", "training rotation error (deg)"), ("val_PVE", "validation PVE (mm)"))


def pick_at_quantiles(values: Sequence[float], quantiles: Sequence[float] = QUALITATIVE_QUANTILES) -> list[int]:
    """Positions of the samples ranked at each quantile of ``values`` (rank ``round(q (n - 1))`` of a
    stable ascending sort, NaNs left out): one sample per quantile, in the quantiles' order."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    if len(finite) < len(quantiles):
        raise ValueError(f"{len(finite)} finite values, fewer than the {len(quantiles)} quantiles asked for")
    if any(not 0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
    order = finite[np.argsort(values[finite], kind="stable")]
    return [int(order[int(round(q * (len(order) - 1)))]) for q in quantiles]


@torch.no_grad()
def predict_samples(methods: dict[str, ModelFn], arrays: dict[str, np.ndarray], indices: Sequence[int], body, cfg,
                    device: torch.device) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Each method's oriented vertices (``vertices_crop`` when it has them: the crop-frame mesh its
    camera projects) and crop camera on the chosen samples, and the ground truth's:
    ({method: dict(vertices (N, V, 3), cam (N, 3))}, dict(vertices, cam)). Every method must return
    ``cam`` (the Mesh-VQ-VAE floor does not: leave it out)."""
    subset = {k: np.asarray(v)[list(indices)] for k, v in arrays.items()}
    batch = next(iterate_split(subset, body.to(device), cfg, device, batch_size=len(indices), progress=False))
    out = {}
    for name, model_fn in methods.items():
        with autocast(device, cfg.runtime.amp):
            pred = model_fn(batch)
        if "cam" not in pred:
            raise ValueError(f"method {name!r} predicts no camera ('cam'); it cannot be overlaid")
        vertices = pred.get("vertices_crop", pred["vertices"])
        out[name] = {"vertices": vertices.float().cpu().numpy(), "cam": pred["cam"].float().cpu().numpy()}
    cam = translation_to_crop_cam(batch["trans"].float(), bbox_info(batch["bbox"], batch["K"]))
    truth = {"vertices": oriented_targets(batch).cpu().numpy(), "cam": cam.cpu().numpy()}
    return out, truth


def _upscale(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size:
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def qualitative_figure(crops: np.ndarray, predictions: dict[str, dict[str, np.ndarray]], truth: dict[str, np.ndarray],
                       faces: np.ndarray, row_titles: Sequence[str] | None = None,
                       pve: dict[str, Sequence[float]] | None = None, display: int = 192, panel: float = 1.6):
    """Paper Fig. 4: one row per test image (``crops`` (N, S, S, 3) uint8), columns = the image, each
    method's mesh overlaid with its own camera, the ground truth overlaid. Crops smaller than
    ``display`` pixels are upscaled for rendering; ``pve`` ({method: (N,) mm}) labels the panels."""
    from .demo import render_overlay
    from .render import MeshRenderer

    columns = ["image", *predictions, "ground truth"]
    n = len(crops)
    size = max(int(display), int(crops.shape[1]))
    fig, axes = plt.subplots(n, len(columns), figsize=(panel * len(columns), panel * n), squeeze=False)
    with MeshRenderer(size) as renderer:
        for i in range(n):
            crop = _upscale(np.asarray(crops[i]), size)
            cells = [crop]
            for p in (*predictions.values(), truth):
                cells.append(render_overlay({"crop": crop, "cam": p["cam"][i], "vertices": p["vertices"][i]},
                                            faces, renderer))
            for j, (ax, img) in enumerate(zip(axes[i], cells)):
                ax.imshow(img)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(columns[j], fontsize=8)
                name = columns[j]
                if pve is not None and name in pve:
                    ax.set_xlabel(f"PVE {float(pve[name][i]):.0f} mm", fontsize=7)
            if row_titles is not None:
                axes[i, 0].set_ylabel(row_titles[i], fontsize=7)
    fig.tight_layout(pad=0.3)
    return fig


def baseline_curves_figure(curves: pd.DataFrame):
    """The baselines' learning curves (``BASELINE_CURVE_PANELS``), one line per run; the loss panel on a
    log scale (the parametric models' camera regulariser spikes in the first steps)."""
    fig = learning_curves_figure(curves, BASELINE_CURVE_PANELS)
    loss_ax = fig.axes[0]
    if loss_ax.has_data() and (curves["loss"].dropna() > 0).all():
        loss_ax.set_yscale("log")
    return fig
