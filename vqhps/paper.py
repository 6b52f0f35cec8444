"""The paper's published numbers, to print beside ours.

Fiche et al., *VQ-HPS: Human Pose and Shape Estimation in a Vector-Quantized Latent Space*, on the
3DPW test set, in millimetres (PVE, MPJPE, PA-MPJPE), with the paper's row names:

* Table 1 ("Quantitative results on 3DPW"): HMR, Cliff, FastMetro, VQ-HPS (ours), VQ-HPS-rot
  (ours) on the *valid* test subset (the standard practice, footnotes 1-2), plus the full-test-set
  numbers the footnotes give for the two VQ-HPS rows.
* Table 2 ("Ablation study"): VQ-HPS, 3D loss, No reprojection, Mesh-VQ-VAE (pre-trained on AMASS
  only) on the *full* test set (its VQ-HPS row equals footnote 1's full-set numbers).

Frames are indexed by (method, subset) like ``hps_training.metrics_table``; ``with_paper_columns``
puts a paper column beside each measured one.
"""
from __future__ import annotations

from typing import Literal

import pandas as pd

#: metric columns of the paper's tables (mm)
PAPER_METRICS = ("PVE", "MPJPE", "PA-MPJPE")
#: suffix of the paper's columns in ``with_paper_columns``
PAPER_SUFFIX = " paper"
UNITS = "mm"

_TABLE1 = [  # (method, subset, PVE, MPJPE, PA-MPJPE)
    ("HMR", "valid", 209.34, 177.57, 89.31),
    ("Cliff", "valid", 223.90, 188.82, 89.20),
    ("FastMetro", "valid", 176.34, 156.99, 104.64),
    ("VQ-HPS (ours)", "valid", 163.88, 139.80, 84.92),
    ("VQ-HPS-rot (ours)", "valid", 160.68, 136.58, 84.92),
    ("VQ-HPS (ours)", "full", 184.08, 157.49, 87.12),  # Table 1, footnote 1
    ("VQ-HPS-rot (ours)", "full", 180.31, 153.20, 87.12),  # Table 1, footnote 2
]
_TABLE2 = [
    ("VQ-HPS", "full", 184.08, 157.49, 87.12),
    ("3D loss", "full", 233.81, 210.41, 148.08),
    ("No reprojection", "full", 193.34, 167.00, 90.46),
    ("Mesh-VQ-VAE", "full", 192.32, 165.50, 91.90),
]


def _frame(rows: list[tuple], caption: str) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["method", "subset", *PAPER_METRICS]).set_index(["method", "subset"])
    df.attrs.update(units=UNITS, dataset="3DPW test", source=caption)
    return df


def paper_table(table: Literal["table1", "table2"]) -> pd.DataFrame:
    """A fresh copy of the paper's Table 1 or Table 2 (module docstring), indexed by (method, subset)
    with columns PVE, MPJPE, PA-MPJPE in mm."""
    if table == "table1":
        return _frame(_TABLE1, "VQ-HPS paper, Table 1 (+ footnotes 1-2 for the full test set)")
    if table == "table2":
        return _frame(_TABLE2, "VQ-HPS paper, Table 2 (full test set)")
    raise ValueError(f"unknown paper table {table!r}; choose 'table1' or 'table2'")


#: the paper's Table 1 and Table 2 (mm); ``paper_table`` returns copies safe to modify
TABLE1 = paper_table("table1")
TABLE2 = paper_table("table2")


def with_paper_columns(ours: pd.DataFrame, table: Literal["table1", "table2"],
                       mapping: dict[str, str]) -> pd.DataFrame:
    """``ours`` (indexed by (method, subset), metric columns in mm) with ``<metric> paper`` placed right
    after each metric the paper reports; ``mapping`` names the paper row of each of our methods
    (methods left out, or subsets the paper lacks, get NaN). ValueError when ``mapping`` names a row
    the paper's table does not have."""
    paper = paper_table(table)
    rows = set(paper.index.get_level_values("method"))
    unknown = sorted(set(mapping.values()) - rows)
    if unknown:
        raise ValueError(f"{unknown} are not rows of the paper's {table}; its rows are {sorted(rows)}")
    if list(ours.index.names) != ["method", "subset"]:
        raise ValueError(f"expected a frame indexed by (method, subset) as metrics_table makes, got "
                         f"{list(ours.index.names)}")
    out = pd.DataFrame(index=ours.index)
    for col in ours.columns:
        out[col] = ours[col]
        if col in PAPER_METRICS:
            out[f"{col}{PAPER_SUFFIX}"] = [paper[col].get((mapping.get(method), subset), float("nan"))
                                           for method, subset in ours.index]
    out.attrs.update(units=UNITS, paper=paper.attrs["source"])
    return out
