"""The generated report and README block: numbers come from the CSVs, and an edited CSV is caught."""
import json
from pathlib import Path

import pandas as pd
import pytest

from vqhps import report

ROOT = Path(__file__).resolve().parents[1]


def _results(tmp_path: Path) -> Path:
    """A results folder with the tables a reproduction writes (values chosen by hand)."""
    res = tmp_path / "full"
    (res / "tables").mkdir(parents=True)
    cols = ["method", "subset", "PVE", "PVE paper", "MPJPE", "MPJPE paper", "PA-MPJPE", "PA-MPJPE paper",
            "rot_err_deg", "rot_err_median_deg", "rot_flip_share"]
    rows = [["VQ-HPS", "full", 150.25, 184.08, 120.0, 157.49, 70.0, 87.12, 15.0, 11.0, 0.02],
            ["VQ-HPS", "valid", 140.0, 163.88, 110.0, 139.8, 66.6, 84.92, 12.5, 10.0, 0.015],
            ["mean body", "full", 300.0, None, 250.0, None, 120.0, None, 60.0, 50.0, 0.25],
            ["mean body", "valid", 290.0, None, 240.0, None, 118.0, None, 58.0, 49.0, 0.2],
            ["HMR", "full", 160.0, None, 130.0, None, 75.0, None, 14.0, 10.0, 0.01],
            ["HMR", "valid", 150.0, 209.34, 125.0, 177.57, 71.0, 89.31, 13.0, 9.5, 0.0]]
    pd.DataFrame(rows, columns=cols).to_csv(res / "tables" / "table1.csv", index=False)
    pd.DataFrame([["VQ-HPS", "full", 150.25, 184.08, 120.0, 157.49, 70.0, 87.12]],
                 columns=cols[:8]).to_csv(res / "tables" / "table2.csv", index=False)
    pd.DataFrame({"run": ["VQ-HPS"], "val_token_ce_nats": [2.5], "train_marginal_entropy_nats": [4.25],
                  "margin_nats": [1.75], "margin_ge_1_nat": [True]}).to_csv(res / "tables" / "vqhps_token_ce.csv",
                                                                           index=False)
    (res / "manifest.json").write_text(json.dumps({"profile": "full", "git_commit": "abc1234",
                                                   "device": "NVIDIA H100", "elapsed_s": 1200.0,
                                                   "overrides": ["vqhps.epochs=7"]}))
    return res


def test_block_quotes_the_csv_numbers_in_the_papers_order(tmp_path):
    block = report.results_block(_results(tmp_path))
    assert block.startswith(report.BLOCK_BEGIN) and block.endswith(report.BLOCK_END)
    vq = next(line for line in block.splitlines() if line.startswith("| VQ-HPS |"))
    assert "140.0 (150.2)" in vq and "66.6 (70.0)" in vq and "163.9 / 139.8 / 84.9" in vq
    assert "12.5 / 10.0" in vq and "1.5%" in vq
    table1_rows = [line.split(" | ")[0] for line in block.splitlines() if line.startswith("| ")][2:5]
    assert table1_rows == ["| HMR", "| VQ-HPS", "| mean body"]
    assert "abc1234" in block and "20.0 min" in block and "`vqhps.epochs=7`" in block
    assert "2.50 nats" in block and "1.75 nats below" in block


def test_readme_check_fails_when_a_csv_value_changes(tmp_path):
    res = _results(tmp_path)
    readme = f"# x\n\nintro\n\n{report.BLOCK_BEGIN}\nold\n{report.BLOCK_END}\n\nrest\n"
    path = tmp_path / "README.md"
    path.write_text(readme)
    assert not report.readme_block_is_current(readme, res)
    assert report.refresh_readme(path, res) and not report.refresh_readme(path, res)
    fresh = path.read_text()
    assert fresh.startswith("# x\n\nintro\n\n") and fresh.endswith("\n\nrest\n")
    assert report.readme_block_is_current(fresh, res)
    table = pd.read_csv(res / "tables" / "table1.csv")
    table.loc[1, "PVE"] = 141.0  # VQ-HPS, valid
    table.to_csv(res / "tables" / "table1.csv", index=False)
    assert not report.readme_block_is_current(fresh, res)


def test_readme_without_markers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="results block"):
        report.replace_block("# no block\n", "x")


def test_report_file_lists_tables_and_existing_figures(tmp_path):
    res = _results(tmp_path)
    (res / "figures").mkdir()
    (res / "figures" / "03_learning_curves.png").write_bytes(b"png")
    text = report.write_report(res).read_text()
    assert text.startswith("# Results: profile full") and "| VQ-HPS |" in text
    assert "figures/03_learning_curves.png" in text and "04_qualitative.png" not in text


def test_committed_readme_block_matches_the_committed_full_run():
    readme = (ROOT / "README.md").read_text()
    assert report.readme_block_is_current(readme, ROOT / "results" / "full"), \
        "README.md's results block differs from results/full: run `python -m vqhps report --profile full --readme`"
