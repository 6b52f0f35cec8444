"""Figures and tables the notebooks show: each function returns a matplotlib Figure or a DataFrame,
and ``save_figure`` writes PNGs under results/<profile>/figures/."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .body.base import H36M17_NAMES, SMPL24_NAMES  # noqa: E402

#: SMPL-24 kinematic tree (parent of each joint) for drawing skeletons
SMPL24_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)


def save_figure(fig, results_dir: Path, name: str, dpi: int = 110) -> Path:
    """Write ``fig`` to results_dir/figures/name.png and return the path."""
    path = Path(results_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


#: tables longer than this (per-sample tables) are written as CSV only: no one reads them as markdown
MARKDOWN_MAX_ROWS = 500


def save_table(df: pd.DataFrame, results_dir: Path, name: str) -> Path:
    """Write ``df`` to results_dir/tables/name.csv (and a markdown copy when it has at most
    ``MARKDOWN_MAX_ROWS`` rows) and return the CSV path."""
    path = Path(results_dir) / "tables" / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=True)
    markdown = path.with_suffix(".md")
    if len(df) <= MARKDOWN_MAX_ROWS:
        markdown.write_text(df.to_markdown() if _has_tabulate() else df.to_string())
    else:
        markdown.unlink(missing_ok=True)
    return path


def _has_tabulate() -> bool:
    """pandas' ``to_markdown`` needs the optional ``tabulate`` package."""
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


def blank_grid(n: int, cols: int, size: float):
    """A figure with enough axes (hidden frames) for ``n`` panels, and those axes flattened."""
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes.ravel()


def image_grid(images: list[np.ndarray], titles: list[str] | None = None, cols: int = 6, size: float = 2.0):
    """A grid of RGB images with optional titles."""
    fig, axes = blank_grid(len(images), cols, size)
    for i, img in enumerate(images):
        ax = axes[i]
        ax.imshow(img)
        if titles:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def draw_skeleton(ax, joints2d: np.ndarray, color: str = "lime") -> None:
    """Draw the SMPL-24 skeleton (crop pixels) on an axis."""
    for j, p in enumerate(SMPL24_PARENTS):
        if p >= 0:
            ax.plot(joints2d[[j, p], 0], joints2d[[j, p], 1], "-", color=color, lw=1.0)
    ax.scatter(joints2d[:, 0], joints2d[:, 1], s=4, c="red", zorder=3)


def sample_grid(arrays: dict[str, np.ndarray], indices: list[int], cols: int = 6, size: float = 2.0):
    """Benchmark crops with their 24 2D joints drawn, titled with light and validity."""
    from vqhps.data.synthetic import LIGHT_NAMES

    fig, axes = blank_grid(len(indices), cols, size)
    for k, i in enumerate(indices):
        ax = axes[k]
        ax.imshow(arrays["image"][i])
        draw_skeleton(ax, arrays["joints2d_24"][i])
        ax.set_title(f"{LIGHT_NAMES[int(arrays['light'][i])]}{'' if arrays['valid'][i] else ' (not valid)'}", fontsize=7)
        s = arrays["image"].shape[1]
        ax.set_xlim(-0.5, s - 0.5)
        ax.set_ylim(s - 0.5, -0.5)
    fig.tight_layout()
    return fig


def front_back_figure(body, pose: np.ndarray, shape: np.ndarray, seeds=(0, 1, 2, 3), size: int = 256):
    """One pose rendered from the front and from the back (yaw 0 and 180 degrees) with a few drawn
    appearances of the benchmark: face and eyes, hair, and garments whose front differs from the back."""
    from vqhps.data.synthetic import front_back_views

    views = front_back_views(body, pose, shape, seeds, size)
    images = [image for pair in views for image in pair]
    titles = [f"appearance {s}: {side}" for s in seeds for side in ("front", "back")]
    return image_grid(images, titles, cols=min(len(images), 4), size=2.6)


def benchmark_histograms(splits: dict[str, dict[str, np.ndarray]]):
    """Distributions of yaw, phenotypes (SMPL: betas), focal length and lighting per split."""
    from vqhps.body.anny_body import PHENOTYPES
    from vqhps.data.synthetic import LIGHT_NAMES

    n_shape = next(iter(splits.values()))["shape"].shape[1]
    anny = n_shape == len(PHENOTYPES)  # else SMPL betas: unbounded, about N(0, 1)
    half = -(-n_shape // 2)  # shape parameters 1..half in one panel, the rest in the next
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for split, a in splits.items():
        axes[0, 0].hist(a["yaw"], bins=36, range=(-180, 180), alpha=0.5, density=True, label=split)
        axes[0, 1].hist(a["K"][:, 0, 0], bins=30, alpha=0.5, density=True, label=split)
        axes[0, 2].bar(np.arange(3) + 0.25 * list(splits).index(split),
                       np.bincount(a["light"].astype(int), minlength=3) / len(a["light"]), width=0.25, label=split)
        axes[1, 0].hist(a["occlusion"][a["occlusion"] > 0], bins=20, range=(0, 1), alpha=0.5, label=split)
        for p in range(n_shape):
            axes[1, 1 + p // half].hist(a["shape"][:, p], bins=20, range=(0, 1) if anny else (-3, 3), alpha=0.35,
                                        histtype="step", label=f"{split}:{PHENOTYPES[p] if anny else f'beta {p + 1}'}")
    axes[0, 0].set_title("root yaw (deg)")
    axes[0, 1].set_title("focal length (px)")
    axes[0, 2].set_title("lighting")
    axes[0, 2].set_xticks(np.arange(3) + 0.25, LIGHT_NAMES)
    axes[1, 0].set_title("occluded fraction (occluded images)")
    what = "phenotypes" if anny else "betas"
    axes[1, 1].set_title(f"{what} 1-{half}")
    axes[1, 2].set_title(f"{what} {half + 1}-{n_shape}")
    for ax in axes.ravel():
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def data_summary(splits: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """One row per split: images, subjects, backgrounds, valid / dim / harsh / truncated / occluded share."""
    rows = {}
    for split, a in splits.items():
        rows[split] = {
            "images": len(a["image"]), "subjects": len(np.unique(a["subject"])),
            "backgrounds": len(np.unique(a["background"])), "valid_%": 100 * a["valid"].mean(),
            "dim_light_%": 100 * (a["light"] == 1).mean(), "harsh_light_%": 100 * (a["light"] == 2).mean(),
            "truncated_%": 100 * (~a["in_frame"]).mean(), "occluded_%": 100 * (a["occlusion"] > 0).mean(),
        }
    return pd.DataFrame(rows).T.round(1)


def regressor_error_table(errors24: np.ndarray, errors17: np.ndarray) -> pd.DataFrame:
    """Per-joint regressor error (mm) as a tidy table."""
    return pd.concat([
        pd.DataFrame({"set": "SMPL-24", "joint": SMPL24_NAMES, "error_mm": errors24}),
        pd.DataFrame({"set": "H36M-17", "joint": H36M17_NAMES, "error_mm": errors17}),
    ], ignore_index=True)


def regressor_error_figure(table: pd.DataFrame):
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.5))
    for ax, (name, df) in zip(axes, table.groupby("set", sort=False)):
        ax.bar(df["joint"], df["error_mm"])
        ax.set_title(f"{name} regressor: mean error {df['error_mm'].mean():.2f} mm (held-out poses)")
        ax.set_ylabel("mm")
        ax.tick_params(axis="x", rotation=90, labelsize=7)
    fig.tight_layout()
    return fig


def render_meshes(vertices: list[np.ndarray] | np.ndarray, faces: np.ndarray, size: int = 256,
                  vertex_colors: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Front views of canonical meshes (y up, facing +z) on white: one RGB image each."""
    from vqhps.render import MeshRenderer, render_canonical

    with MeshRenderer(size) as renderer:
        return [render_canonical(renderer, np.asarray(v), faces,
                                 None if vertex_colors is None else vertex_colors[i])
                for i, v in enumerate(vertices)]


def vqvae_curves(curves: pd.DataFrame):
    """Reconstruction error and codebook perplexity against step, one line per stage."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for stage, df in curves.groupby("stage", sort=False):
        axes[0].plot(df["step"], df["recon_mm"], label=stage)
        axes[1].plot(df["step"], df["perplexity"], label=stage)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean per-vertex error (mm)")
    axes[1].set_ylabel("batch codebook perplexity")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    return fig


def reconstruction_heatmaps(meshes: np.ndarray, recons: np.ndarray, per_vertex: np.ndarray, picks: list[int],
                            faces: np.ndarray, titles: list[str], size: int = 256):
    """Ground truth beside the reconstruction coloured by per-vertex error (mm), for a few meshes."""
    from vqhps.render import error_colors

    vmax = float(np.percentile(per_vertex[picks], 99))
    images, labels = [], []
    for title, i in zip(titles, picks):
        gt, rc = render_meshes([meshes[i], recons[i]], faces, size,
                               vertex_colors=[None, error_colors(per_vertex[i], vmax)])
        images += [gt, rc]
        labels += [f"{title}: ground truth", f"PVE {per_vertex[i].mean():.1f} mm"]
    fig = image_grid(images, labels, cols=len(images), size=2.6)
    sm = plt.cm.ScalarMappable(cmap="inferno", norm=plt.Normalize(0, vmax))
    fig.colorbar(sm, ax=fig.axes, fraction=0.015, label="error (mm)")
    return fig


def code_usage_figure(counts: np.ndarray, perplexity: float):
    fig, ax = plt.subplots(figsize=(10, 3))
    order = np.argsort(counts)[::-1]
    ax.bar(np.arange(len(counts)), counts[order], width=1.0)
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("uses on the test set")
    ax.set_title(f"{(counts > 0).sum()} / {len(counts)} codes used, perplexity {perplexity:.1f}")
    fig.tight_layout()
    return fig


def token_region_figure(template: np.ndarray, faces: np.ndarray, regions: np.ndarray, size: int = 320):
    """The template coloured by the token that controls each vertex (front and back)."""
    palette = (plt.cm.tab20(np.arange(20))[:, :3] * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    colors = palette[rng.permutation(int(regions.max()) + 1) % 20]
    rgba = np.concatenate([colors[regions], np.full((len(regions), 1), 255, np.uint8)], 1)
    back = template * np.array([-1.0, 1.0, -1.0])
    images = render_meshes([template, back], faces, size, vertex_colors=[rgba, rgba])
    return image_grid(images, ["front", "back"], cols=2, size=4)


def timeline_figure(manifest: dict):
    """Where a ``make reproduce`` run spent its time: one bar per notebook and background job of the
    manifest that records a start (``start_s``), on a shared clock in minutes."""
    rows = [(name.removesuffix(".ipynb"), e, "notebook") for name, e in manifest.get("notebooks", {}).items()]
    rows += [(f"job: {name}", e, "job") for name, e in manifest.get("background_jobs", {}).items()]
    rows = sorted((r for r in rows if "start_s" in r[1]), key=lambda r: r[1]["start_s"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    colours = {"notebook": "tab:blue", "job": "tab:orange"}
    for y, (label, entry, kind) in enumerate(rows):
        ax.barh(y, entry["wall_s"] / 60, left=entry["start_s"] / 60, color=colours[kind], height=0.6)
        ax.text((entry["start_s"] + entry["wall_s"]) / 60, y, f" {entry['wall_s']:.0f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("minutes since the start of the run")
    elapsed = manifest.get("elapsed_s")
    ax.set_title(f"make reproduce ({manifest.get('profile', '?')}): {elapsed / 60:.1f} min elapsed"
                 if elapsed else f"make reproduce ({manifest.get('profile', '?')})")
    fig.tight_layout()
    return fig
