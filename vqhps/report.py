"""The run's report, written from its tables and manifest alone: ``results/<profile>/REPORT.md`` and the
README's results block (between ``BLOCK_BEGIN`` and ``BLOCK_END``). Nothing in either is typed by hand,
so a number in the README is always the number in the CSV beside it; ``readme_block_is_current`` is
what the test suite checks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .checkpoint import atomic_write
from .metrics import METRIC_COLUMNS, ROT_FLIP_DEG

BLOCK_BEGIN = "<!-- results:begin (python -m vqhps report --profile full --readme) -->"
BLOCK_END = "<!-- results:end -->"
#: Table 1's rows in the paper's order, then the references
TABLE1_ORDER = ("HMR", "CLIFF", "FastMETRO", "VQ-HPS", "VQ-HPS-rot", "mean body", "Mesh-VQ-VAE floor")
#: the figures the report shows, in reading order: (file under figures/, caption)
REPORT_FIGURES = (
    ("00_samples.png", "benchmark samples with their labels"),
    ("00_front_back.png", "one pose from the front and from the back"),
    ("01_mesh_vqvae_curves.png", "Mesh-VQ-VAE training"),
    ("02_reconstruction_heatmaps.png", "Mesh-VQ-VAE reconstruction error per vertex"),
    ("03_learning_curves.png", "VQ-HPS training and validation curves"),
    ("04_baseline_curves.png", "baselines' training curves"),
    ("04_qualitative.png", "predictions on test images"),
    ("05_3d_loss_vs_ce.png", "ablation: 3D loss against cross-entropy"),
    ("06_rotation_error.png", "global-rotation errors and front/back flips"),
    ("06_error_by_condition.png", "errors by lighting, truncation and occlusion"),
    ("06_uncertainty.png", "token spread against error"),
    ("06_worst_cases.png", "worst test images"),
    ("reproduce_timeline.png", "the reproduction's notebooks and background trainings over time"),
)


def _num(value, digits: int = 1) -> str:
    """A table cell: the value with ``digits`` decimals, '–' for a missing one."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(value) else f"{value:,.{digits}f}"


def _read(tables: Path, name: str) -> pd.DataFrame | None:
    path = tables / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def _by_subset(frame: pd.DataFrame, subset: str) -> pd.DataFrame:
    return frame[frame["subset"] == subset].set_index("method")


def _ordered(methods, order: tuple[str, ...]) -> list[str]:
    known = [m for m in order if m in methods]
    return known + [m for m in methods if m not in known]


def table1_markdown(table1: pd.DataFrame) -> str:
    """Table 1 as markdown: valid subset (full test split in brackets), the paper's valid-subset
    numbers, and the rotation columns (mean, median, share of flips)."""
    valid, full = _by_subset(table1, "valid"), _by_subset(table1, "full")
    head = ("| method | PVE | MPJPE | PA-MPJPE | paper PVE / MPJPE / PA-MPJPE | rotation error mean / median (°) "
            f"| flips > {ROT_FLIP_DEG:.0f}° |\n| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for m in _ordered(list(valid.index), TABLE1_ORDER):
        v, f = valid.loc[m], full.loc[m] if m in full.index else None
        cells = [f"{_num(v[c])} ({_num(f[c]) if f is not None else '–'})" for c in METRIC_COLUMNS]
        paper = " / ".join(_num(v.get(f"{c} paper")) for c in METRIC_COLUMNS)
        paper = "–" if set(paper.split(" / ")) == {"–"} else paper
        rot = f"{_num(v.get('rot_err_deg'))} / {_num(v.get('rot_err_median_deg'))}"
        flips = v.get("rot_flip_share")
        flips = "–" if flips is None or pd.isna(flips) else f"{100 * float(flips):.1f}%"
        rows.append(f"| {m} | " + " | ".join(cells) + f" | {paper} | {rot} | {flips} |")
    return "\n".join([head, *rows])


def table2_markdown(table2: pd.DataFrame) -> str:
    """Table 2 (ablations) as markdown: full test split, the paper's full-split numbers beside them."""
    full = _by_subset(table2, "full")
    head = "| run | PVE | MPJPE | PA-MPJPE | paper PVE / MPJPE / PA-MPJPE |\n| --- | --- | --- | --- | --- |"
    rows = []
    for m in full.index:
        r = full.loc[m]
        paper = " / ".join(_num(r.get(f"{c} paper")) for c in METRIC_COLUMNS)
        paper = "–" if set(paper.split(" / ")) == {"–"} else paper
        rows.append(f"| {m} | " + " | ".join(_num(r[c]) for c in METRIC_COLUMNS) + f" | {paper} |")
    return "\n".join([head, *rows])


def _manifest(results_dir: Path) -> dict:
    path = results_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_line(manifest: dict) -> str:
    """One sentence naming the run: commit, device, wall time, profile and overrides."""
    if not manifest:
        return "No manifest: these tables were not written by `python -m vqhps reproduce`."
    elapsed = manifest.get("elapsed_s")
    wall = f", {elapsed / 60:.1f} min from notebook 00 to 06" if elapsed else ""
    overrides = manifest.get("overrides") or []  # "key=value" strings, as given to --set
    extra = (", overrides " + ", ".join(f"`{o}`" for o in overrides)) if overrides else ""
    return (f"Profile `{manifest.get('profile', '?')}` at commit `{manifest.get('git_commit', '?')}` on "
            f"{manifest.get('device', '?')}{wall}{extra} (`manifest.json`).")


def data_line(tables: Path) -> str | None:
    """One sentence naming the data and body behind the tables (``data_source.csv``, written by notebook
    00) and whether the paper's columns compare like with like; None for a run without that table."""
    src = _read(tables, "data_source")
    if src is None or not len(src):
        return None
    r = src.iloc[0]
    if str(r["source"]) == "paper":
        return (f"Data: {r['images']} and {r['pretraining']} on the {str(r['body']).upper()} body, as in the paper: "
                f"the paper's columns are measured on the same test split with the same body (like for like).")
    return (f"Data: the {r['images']} and the {r['pretraining']} on the {r['body']} body: the paper's columns are its "
            f"3DPW / SMPL numbers, shown for scale, not measured on the same data.")


def findings(tables: Path) -> list[str]:
    """Short statements computed from the tables: the Mesh-VQ-VAE's reconstruction, VQ-HPS's token
    cross-entropy against the marginal entropy, the uncertainty correlation."""
    out = []
    recon = _read(tables, "reconstruction")
    if recon is not None:
        recon = recon.set_index(recon.columns[0])
        if "finetune" in recon.index:
            r = recon.loc["finetune"]
            out.append(f"Mesh-VQ-VAE (fine-tuned) reconstructs the test meshes at PVE {_num(r['PVE_mm'], 2)} mm, "
                       f"MPJPE {_num(r['MPJPE_mm'], 2)} mm (paper: 4.7 mm PVE on 3DPW).")
    ce = _read(tables, "vqhps_token_ce")
    if ce is not None and len(ce):
        r = ce.iloc[0]
        margin = float(r["margin_nats"])
        out.append(f"VQ-HPS's validation token cross-entropy is {_num(r['val_token_ce_nats'], 2)} nats against a "
                   f"per-position marginal entropy of {_num(r['train_marginal_entropy_nats'], 2)} nats: "
                   f"{_num(abs(margin), 2)} nats {'below' if margin > 0 else 'above'} it (a model that reads the "
                   f"image ends below).")
    rho = _read(tables, "uncertainty_spearman")
    if rho is not None and len(rho):
        rho = rho.set_index("subset")
        parts = [f"{_num(rho.loc[s, 'PVE'], 2)} ({s})" for s in ("full", "valid") if s in rho.index]
        out.append("Spearman ρ between VQ-HPS's token spread and its PVE: " + ", ".join(parts) + ".")
    return out


def results_block(results_dir: Path) -> str:
    """The README's results block for ``results_dir`` (links relative to the repository root)."""
    results_dir = Path(results_dir)
    tables, rel = results_dir / "tables", f"results/{results_dir.name}"
    table1, table2 = _read(tables, "table1"), _read(tables, "table2")
    if table1 is None:
        body = f"No run is committed under `{rel}/` yet: `make reproduce PROFILE={results_dir.name}` writes it."
        return "\n".join([BLOCK_BEGIN, body, BLOCK_END])
    source = data_line(tables)
    parts = [run_line(_manifest(results_dir)), *([source] if source else []), "",
             f"**Table 1** (`{rel}/tables/table1.csv`; mm, valid subset with the full test split in brackets):", "",
             table1_markdown(table1)]
    if table2 is not None:
        parts += ["", f"**Table 2** (`{rel}/tables/table2.csv`; mm, full test split):", "", table2_markdown(table2)]
    facts = findings(tables)
    if facts:
        parts += [""] + [f"- {f}" for f in facts]
    parts += ["", f"Every figure and table, with the run's wall times: [`{rel}/REPORT.md`]({rel}/REPORT.md)."]
    return "\n".join([BLOCK_BEGIN, *parts, BLOCK_END])


def report_markdown(results_dir: Path) -> str:
    """REPORT.md: the results block's tables and findings, the data summary, wall times and figures."""
    results_dir = Path(results_dir)
    tables, manifest = results_dir / "tables", _manifest(results_dir)
    block = results_block(results_dir).split("\n")[1:-1]
    lines = [f"# Results: profile {results_dir.name}", "", *[b.replace(f"results/{results_dir.name}/", "")
                                                            for b in block if "REPORT.md" not in b]]
    data = _read(tables, "data_summary")
    if data is not None:
        data = data.rename(columns={data.columns[0]: "split"})
        lines += ["", "## Benchmark", "", "| " + " | ".join(data.columns) + " |",
                  "| " + " | ".join("---" for _ in data.columns) + " |"]
        lines += ["| " + " | ".join(str(r[c]) if c == "split" else _num(r[c], 0 if float(r[c]).is_integer() else 1)
                                    for c in data.columns) + " |"
                  for _, r in data.iterrows()]
    timing = {**manifest.get("notebooks", {}), **manifest.get("background_jobs", {})}
    if timing:
        lines += ["", "## Wall times", "", "| step | start (s) | wall (s) |", "| --- | --- | --- |"]
        lines += [f"| {k} | {_num(v.get('start_s'), 0)} | {_num(v.get('wall_s'), 0)} |"
                  for k, v in sorted(timing.items(), key=lambda kv: kv[1].get("start_s", 0))]
    figures = [(f, c) for f, c in REPORT_FIGURES if (results_dir / "figures" / f).is_file()]
    if figures:
        lines += ["", "## Figures"]
        for name, caption in figures:
            lines += ["", f"**{caption}** (`figures/{name}`)", "", f"![{caption}](figures/{name})"]
    return "\n".join(lines) + "\n"


def write_report(results_dir: Path) -> Path:
    """Write ``results_dir/REPORT.md`` (atomically) and return its path."""
    path = Path(results_dir) / "REPORT.md"
    text = report_markdown(results_dir)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def replace_block(readme: str, block: str) -> str:
    """``readme`` with its results block replaced by ``block``; ValueError when the markers are missing."""
    start, end = readme.find(BLOCK_BEGIN), readme.find(BLOCK_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no results block: add the lines {BLOCK_BEGIN!r} and {BLOCK_END!r}")
    return readme[:start] + block + readme[end + len(BLOCK_END):]


def readme_block_is_current(readme: str, results_dir: Path) -> bool:
    """Whether the README's results block is exactly what ``results_block`` writes from the CSVs."""
    return replace_block(readme, results_block(results_dir)) == readme


def refresh_readme(readme_path: Path, results_dir: Path) -> bool:
    """Rewrite the README's results block from ``results_dir``; True when it changed."""
    readme_path = Path(readme_path)
    old = readme_path.read_text()
    new = replace_block(old, results_block(results_dir))
    if new != old:
        atomic_write(readme_path, lambda f: f.write(new.encode()))
    return new != old
