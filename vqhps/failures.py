"""Failure cases of an image -> mesh model on the benchmark (the paper's Fig. 6): the worst images,
180° flips of the root rotation, errors by lighting, truncation and occlusion, and a written summary
computed from those numbers.

Everything reads the per-sample frame of ``hps_training.evaluate_split`` (or
``uncertainty.spread_vs_error``): index, PVE, MPJPE, PA-MPJPE (mm), rot_err_deg and the labels
valid, light, occlusion, in_frame, yaw.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .data.synthetic import LIGHT_NAMES  # noqa: E402
from .metrics import METRIC_COLUMNS, ROT_FLIP_DEG  # noqa: E402

#: occluded fraction above which the benchmark calls an image heavily occluded (not valid)
HEAVY_OCCLUSION = 0.3
#: the conditions the benchmark labels, as (column of ``condition_bins``, title)
CONDITIONS = (("lighting", "lighting"), ("framing", "truncation"), ("occlusion", "occlusion"))


# ---------------------------------------------------------------------------------------- tables
def load_per_sample(results_dir: Path, name: str = "vqhps_per_sample") -> dict[str, pd.DataFrame]:
    """results_dir/tables/<name>.csv (notebook 03's per-sample metrics of every method) -> {method:
    frame}. FileNotFoundError naming the file and the notebook that writes it."""
    path = Path(results_dir) / "tables" / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run notebooks/03_vqhps_training.ipynb for this profile first "
                                f"(python -m vqhps reproduce --profile {Path(results_dir).name} --only 03)")
    table = pd.read_csv(path)
    if "method" not in table.columns:
        raise KeyError(f"{path}: no 'method' column; rewrite it with notebook 03")
    return {m: df.drop(columns="method").reset_index(drop=True) for m, df in table.groupby("method", sort=False)}


def flips(per_sample: pd.DataFrame, threshold: float = ROT_FLIP_DEG) -> np.ndarray:
    """(n,) bool: samples whose rotation error exceeds ``threshold`` degrees (NaN: not a flip)."""
    return (per_sample["rot_err_deg"].to_numpy(dtype=np.float64) > threshold)


def condition_bins(per_sample: pd.DataFrame) -> pd.DataFrame:
    """The benchmark's condition labels as named, ordered bins: lighting (normal / dim / harsh),
    framing (in frame / truncated), occlusion (none / < 30% / >= 30% of the body hidden)."""
    occ = per_sample["occlusion"].to_numpy(dtype=np.float64)
    occ_names = ("none", f"< {HEAVY_OCCLUSION:.0%}", f"≥ {HEAVY_OCCLUSION:.0%}")
    occ_bin = np.where(occ <= 0, 0, np.where(occ < HEAVY_OCCLUSION, 1, 2))
    frame_names = ("in frame", "truncated")
    return pd.DataFrame({
        "lighting": pd.Categorical.from_codes(per_sample["light"].to_numpy().astype(int), LIGHT_NAMES),
        "framing": pd.Categorical.from_codes((~per_sample["in_frame"].astype(bool)).to_numpy().astype(int),
                                             frame_names),
        "occlusion": pd.Categorical.from_codes(occ_bin, occ_names),
    }, index=per_sample.index)


def error_by_condition(per_sample: pd.DataFrame, metrics: Sequence[str] = (*METRIC_COLUMNS, "rot_err_deg"),
                       threshold: float = ROT_FLIP_DEG) -> pd.DataFrame:
    """Mean errors per condition bin: index (condition, bin), columns n, the ``metrics`` (mm, deg) and
    flip_% (share of samples with a rotation error above ``threshold``). Empty bins are kept with n = 0."""
    bins = condition_bins(per_sample)
    data = per_sample[list(metrics)].astype(float).assign(flip_pct=100.0 * flips(per_sample, threshold))
    parts = []
    for column, _ in CONDITIONS:
        grouped = data.groupby(bins[column], observed=False)
        part = grouped.mean().assign(n=grouped.size())
        part.index = pd.MultiIndex.from_product([[column], part.index.astype(str)], names=["condition", "bin"])
        parts.append(part)
    table = pd.concat(parts)
    return table[["n", *metrics, "flip_pct"]].rename(columns={"flip_pct": "flip_%"})


def worst_cases(per_sample: pd.DataFrame, n: int = 6, metric: str = "PVE") -> pd.DataFrame:
    """The ``n`` samples with the largest ``metric``, worst first."""
    return per_sample.sort_values(metric, ascending=False, kind="stable").head(n)


def _case_title(row: pd.Series) -> str:
    labels = [LIGHT_NAMES[int(row["light"])]]
    if not bool(row["in_frame"]):
        labels.append("truncated")
    if float(row["occlusion"]) > 0:
        labels.append(f"{float(row['occlusion']):.0%} occl.")
    return (f"#{int(row['index'])}: PVE {row['PVE']:.0f} mm, rot {row['rot_err_deg']:.0f}°\n"
            f"{', '.join(labels)}")


def worst_cases_figure(cases: pd.DataFrame, arrays: dict[str, np.ndarray], predictions: dict[str, np.ndarray],
                       truth: dict[str, np.ndarray], faces: np.ndarray, threshold: float = ROT_FLIP_DEG):
    """One row per case: the input crop, the predicted mesh over it and the ground truth over it, each
    with its own crop camera (``figures_eval.predict_samples`` on the cases' indices gives both
    ``predictions`` and ``truth``: vertices (N, V, 3), cam (N, 3)); flips are marked in the title."""
    from .demo import render_overlay
    from .render import MeshRenderer

    size = arrays["image"].shape[1]
    fig, axes = plt.subplots(len(cases), 3, figsize=(7.2, 2.5 * len(cases)), squeeze=False)
    with MeshRenderer(size) as renderer:
        for r, (_, row) in enumerate(cases.iterrows()):
            i = int(row["index"])
            crop = arrays["image"][i]
            panels = (crop, *(render_overlay({"crop": crop, "cam": p["cam"][r], "vertices": p["vertices"][r]}, faces,
                                             renderer) for p in (predictions, truth)))
            flip = " (flip)" if float(row["rot_err_deg"]) > threshold else ""
            for c, (img, title) in enumerate(zip(panels, (_case_title(row), f"prediction{flip}", "ground truth"))):
                ax = axes[r, c]
                ax.imshow(img)
                ax.set_title(title, fontsize=7, color="crimson" if flip and c == 1 else "black")
                ax.axis("off")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- figures
def rotation_error_figure(frames: dict[str, pd.DataFrame], threshold: float = ROT_FLIP_DEG):
    """Left: histogram of the rotation error (deg) of each method, the flip region (above ``threshold``)
    shaded and each method's flip share in the legend. Right: PVE of flipped against other samples."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    ax.axvspan(threshold, 180, color="crimson", alpha=0.12, label=f"flips (> {threshold:.0f}°)")
    edges = np.linspace(0, 180, 37)
    box_data, box_labels = [], []
    for name, df in frames.items():
        err = df["rot_err_deg"].to_numpy(dtype=np.float64)
        err = err[np.isfinite(err)]
        if not len(err):
            continue
        flip = flips(df, threshold)
        ax.hist(err, bins=edges, histtype="step", lw=1.6, label=f"{name}: {100 * flip.mean():.1f}% flips")
        for mask, what in ((~flip, "other"), (flip, "flip")):
            box_data.append(df["PVE"].to_numpy(dtype=np.float64)[mask])
            box_labels.append(f"{name}\n{what} (n={int(mask.sum())})")
    ax.set_xlim(0, 180)
    ax.set_xlabel("rotation error (deg)")
    ax.set_ylabel("test images")
    ax.legend(fontsize=8)
    bx.boxplot([d if len(d) else [np.nan] for d in box_data], showmeans=True)
    bx.set_xticks(range(1, len(box_labels) + 1), box_labels, fontsize=7)
    bx.set_ylabel("PVE (mm)")
    bx.set_title("flipped vs other images", fontsize=9)
    fig.tight_layout()
    return fig


def error_by_condition_figure(per_sample: pd.DataFrame, metrics: Sequence[str] = ("PVE", "PA-MPJPE")):
    """Box plots of each metric per condition bin (lighting, truncation, occlusion); means marked,
    sample counts under each box."""
    bins = condition_bins(per_sample)
    fig, axes = plt.subplots(len(metrics), len(CONDITIONS), figsize=(4.2 * len(CONDITIONS), 3.0 * len(metrics)),
                             squeeze=False)
    for r, metric in enumerate(metrics):
        values = per_sample[metric].to_numpy(dtype=np.float64)
        for c, (column, title) in enumerate(CONDITIONS):
            ax = axes[r, c]
            cats = list(bins[column].cat.categories)
            data = [values[(bins[column] == cat).to_numpy()] for cat in cats]
            ax.boxplot([d if len(d) else [np.nan] for d in data], showmeans=True)
            ax.set_xticks(range(1, len(cats) + 1), [f"{cat}\nn={len(d)}" for cat, d in zip(cats, data)], fontsize=8)
            ax.set_ylabel(f"{metric} (mm)")
            if r == 0:
                ax.set_title(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- text
def _strength(rho: float) -> str:
    if not np.isfinite(rho):
        return "undefined"
    a = abs(rho)
    word = "no" if a < 0.1 else "a weak" if a < 0.3 else "a moderate" if a < 0.5 else "a strong"
    return word if word == "no" else f"{word} {'positive' if rho > 0 else 'negative'}"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def failure_analysis_markdown(per_sample: pd.DataFrame, method: str = "VQ-HPS", n_worst: int = 6,
                              spearman: pd.DataFrame | None = None,
                              threshold: float = ROT_FLIP_DEG) -> str:
    """A short written analysis (markdown) of one method's per-sample frame: mean errors, the worst
    images, flips, errors by condition and, given ``spearman`` (``uncertainty.spearman_table``), how
    well the token spread ranks the errors. Every number in it is computed here from the inputs."""
    n = len(per_sample)
    valid = per_sample["valid"].astype(bool).to_numpy()
    pve = per_sample["PVE"].to_numpy(dtype=np.float64)
    pa = per_sample["PA-MPJPE"].to_numpy(dtype=np.float64)
    flip = flips(per_sample, threshold)
    lines = [f"**{method} on {n} test images.** Mean PVE {pve.mean():.1f} mm, PA-MPJPE {pa.mean():.1f} mm; "
             f"on the {int(valid.sum())} valid images PVE {np.nanmean(pve[valid]) if valid.any() else np.nan:.1f} mm."]

    worst = worst_cases(per_sample, n_worst)
    w_flip = int(flips(worst, threshold).sum())
    w_invalid = int((~worst["valid"].astype(bool)).sum())
    lines.append(f"**Worst {len(worst)} images** (PVE {worst['PVE'].min():.1f}–{worst['PVE'].max():.1f} mm): "
                 f"{_count(w_flip, 'is a rotation flip', 'are rotation flips')} and "
                 f"{_count(w_invalid, 'is', 'are')} outside the valid subset (bad light, truncation or heavy "
                 f"occlusion).")

    rot = per_sample["rot_err_deg"].to_numpy(dtype=np.float64)
    if np.isfinite(rot).any():
        text = (f"**Flips.** {100 * flip.mean():.1f}% of the images ({int(flip.sum())}) have a rotation error above "
                f"{threshold:.0f}° (mean rotation error {np.nanmean(rot):.1f}°).")
        if flip.any() and (~flip).any():
            text += (f" Their mean PVE is {pve[flip].mean():.1f} mm against {pve[~flip].mean():.1f} mm for the "
                     f"others, while their PA-MPJPE, which ignores the orientation, is {pa[flip].mean():.1f} mm "
                     f"against {pa[~flip].mean():.1f} mm.")
        lines.append(text)

    table = error_by_condition(per_sample, threshold=threshold)
    parts = []
    for column, title in CONDITIONS:
        rows = table.loc[column]
        rows = rows[rows["n"] > 0]
        cells = ", ".join(f"{b} {r['PVE']:.1f} mm (n={int(r['n'])})" for b, r in rows.iterrows())
        parts.append(f"{title}: {cells}")
    if parts:
        lines.append("**Mean PVE by condition.** " + "; ".join(parts) + ".")

    if spearman is not None:
        s = spearman
        text = (f"**Uncertainty.** Spearman's ρ between the token spread and PVE is {s.loc['full', 'PVE']:.2f} "
                f"on the full split ({_strength(s.loc['full', 'PVE'])} rank correlation) and "
                f"{s.loc['valid', 'PVE']:.2f} on the valid subset; with PA-MPJPE it is "
                f"{s.loc['full', 'PA-MPJPE']:.2f} (full) and {s.loc['valid', 'PA-MPJPE']:.2f} (valid).")
        rho_pve, rho_pa = s.loc["full", "PVE"], s.loc["full", "PA-MPJPE"]
        if np.isfinite(rho_pve) and np.isfinite(rho_pa):
            if max(abs(rho_pve), abs(rho_pa)) < 0.1:
                text += " At this stage the spread does not tell the good predictions from the bad ones."
            elif rho_pa > rho_pve:
                text += (" The spread ranks the pose error better than the full error: it describes the "
                         "canonical mesh and knows nothing of the rotation.")
            else:
                text += (" The spread ranks the full error at least as well as the pose error, although it "
                         "describes the canonical mesh only.")
        lines.append(text)
    return "\n\n".join(lines)


def typical_case(per_sample: pd.DataFrame, metric: str = "PVE") -> int:
    """Index of the valid sample (any sample when none is valid) with the median ``metric``: an
    image chosen by a rule, neither the best nor the worst."""
    valid = per_sample[per_sample["valid"].astype(bool)]
    pool = valid if len(valid) else per_sample
    ordered = pool.sort_values(metric, kind="stable")
    return int(ordered["index"].iloc[(len(ordered) - 1) // 2])
