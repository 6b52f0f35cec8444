"""Mesh-VQ-VAE sweeps (vqhps.sweep, ``python -m vqhps sweep-vae``): the grid, the per-run and
per-setting tables, and a whole sweep of two smoke settings run as subprocesses."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from vqhps.sweep import SweepRun, collect, commands, expand_grid, plan, run_dir, split_values, summarise


def test_grid_is_the_product_of_its_keys_first_key_slowest():
    assert expand_grid(["vqvae.a=1,2", "vqvae.b=(3,4),5"]) == [
        ("vqvae.a=1", "vqvae.b=(3,4)"), ("vqvae.a=1", "vqvae.b=5"),
        ("vqvae.a=2", "vqvae.b=(3,4)"), ("vqvae.a=2", "vqvae.b=5")]
    assert expand_grid([]) == [()]
    assert split_values("(1,2),[3,4],5") == ["(1,2)", "[3,4]", "5"]
    for bad in ("vqvae.a", "=1,2", "vqvae.a=1,,2"):
        with pytest.raises(ValueError):
            expand_grid([bad])


def test_plan_runs_every_setting_once_before_any_second_repeat():
    runs = plan(["vqvae.a=1,2"], repeats=2)
    assert [(r.setting, r.repeat) for r in runs] == [
        (("vqvae.a=1",), 0), (("vqvae.a=2",), 0), (("vqvae.a=1",), 1), (("vqvae.a=2",), 1)]
    assert [r.name for r in runs] == ["vqvae.a=1_r0", "vqvae.a=2_r0", "vqvae.a=1_r1", "vqvae.a=2_r1"]
    run = SweepRun(("vqvae.channels=(8,16,32)", "vqvae.lr=-1e-3"), 0)
    assert run.name == "vqvae.channels=8-16-32_vqvae.lr=-1e-3_r0"
    assert SweepRun((), 1).name == "defaults_r1"
    with pytest.raises(ValueError, match="folder name"):
        plan(["vqvae.channels=(8,16),[8,16]"], repeats=1)
    with pytest.raises(ValueError, match="repeats"):
        plan([], repeats=0)


def test_each_repeat_trains_and_evaluates_at_its_own_seed_after_the_shared_settings():
    train, evaluate = commands(SweepRun(("vqvae.lr=1e-3",), 2), "full", base_seed=10, shared=["vqvae.lr=5e-4"])
    assert train[train.index("-m") + 1:train.index("-m") + 7] == ["vqhps", "train-vae", "--profile", "full",
                                                                   "--stage", "both"]
    assert evaluate[evaluate.index("-m") + 2] == "evaluate-vae"
    for cmd in (train, evaluate):
        sets = [cmd[i + 1] for i, x in enumerate(cmd) if x == "--set"]
        assert sets == ["vqvae.lr=5e-4", "vqvae.lr=1e-3", "seed=12"]  # later --set wins


def _fake_run(out: Path, run: SweepRun, pve: float, wall: float) -> None:
    """What ``evaluate-vae`` and the training logs leave in a run's folder, with chosen numbers."""
    folder = run_dir(out, run) / "full"
    (folder / "tables").mkdir(parents=True)
    (folder / "checkpoints").mkdir(parents=True)
    rows = [{"stage": st, "meshes": m, "n_meshes": 5,
             "PVE_mm": pve + (st == "pretrain") + {"test": 0, "val": 0.25, "corpus_train": 10}[m],
             "PVE_continuous_mm": pve - 1, "MPJPE_mm": pve + 0.5}
            for st in ("pretrain", "finetune") for m in ("test", "val", "corpus_train")]
    pd.DataFrame(rows).to_csv(folder / "tables" / "vae_reconstruction.csv", index=False)
    for stage, w in (("pretrain", wall), ("finetune", wall / 4)):
        pd.DataFrame({"step": [50, 100], "wall_s": [w / 2, w]}).to_csv(folder / "checkpoints" /
                                                                       f"mesh_vqvae_{stage}.csv", index=False)


def test_a_run_seeded_with_a_pretrained_model_gets_its_checkpoint_and_log_once(tmp_path):
    from vqhps.sweep import seed_pretrained

    source = tmp_path / "src" / "mesh_vqvae_pretrain.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    source.with_suffix(".csv").write_text("step,wall_s\n100,4.0\n")
    seed_pretrained(tmp_path / "run", "full", source)
    checkpoints = tmp_path / "run" / "full" / "checkpoints"
    assert (checkpoints / "mesh_vqvae_pretrain.pt").read_bytes() == b"weights"
    assert (checkpoints / "mesh_vqvae_pretrain.csv").read_text().endswith("4.0\n")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["mesh_vqvae_pretrain.csv", "mesh_vqvae_pretrain.pt"]
    (checkpoints / "mesh_vqvae_pretrain.csv").write_text("resumed")
    seed_pretrained(tmp_path / "run", "full", source)  # a run's own files are never replaced
    assert (checkpoints / "mesh_vqvae_pretrain.csv").read_text() == "resumed"


def test_tables_give_each_runs_test_error_and_each_settings_mean_and_spread(tmp_path):
    runs = plan(["vqvae.a=1,2"], repeats=2)
    for run, pve in zip(runs[:3], (5.0, 7.0, 6.0)):  # setting a=2 has one run: its spread is unknown
        _fake_run(tmp_path, run, pve, wall=400.0)
    per_run = collect(runs, tmp_path, "full", base_seed=3)
    assert len(per_run) == 3 and list(per_run["seed"]) == [3, 3, 4]
    first = per_run.iloc[0]
    assert (first["finetune_PVE_mm"], first["pretrain_PVE_mm"], first["finetune_PVE_continuous_mm"],
            first["finetune_MPJPE_mm"]) == (5.0, 6.0, 4.0, 5.5)  # test rows, not corpus rows
    assert (first["finetune_val_PVE_mm"], first["pretrain_val_PVE_mm"]) == (5.25, 6.25)  # and validation rows
    assert (first["pretrain_train_s"], first["finetune_train_s"]) == (400.0, 100.0)
    summary = summarise(per_run).set_index("setting")
    a1, a2 = summary.loc["vqvae.a=1"], summary.loc["vqvae.a=2"]
    assert a1["runs"] == 2 and a1["finetune_PVE_mm_mean"] == pytest.approx(5.5)
    assert a1["finetune_PVE_mm_std"] == pytest.approx(math.sqrt(0.5))  # sample std of 5 and 6
    assert a1["finetune_val_PVE_mm_mean"] == pytest.approx(5.75)
    assert a2["runs"] == 1 and a2["finetune_PVE_mm_mean"] == 7.0 and math.isnan(a2["finetune_PVE_mm_std"])
    assert list(summary.index) == ["vqvae.a=1", "vqvae.a=2"]


def test_sweep_command_trains_two_smoke_settings_skips_them_when_rerun_and_reports_a_failure(
        smoke_artifacts, tmp_path, capsys):
    from vqhps.cli import main

    quick = ["--set", "vqvae.pretrain_steps=1", "--set", "vqvae.finetune_steps=1", "--set", "runtime.progress=false"]
    argv = ["sweep-vae", "--profile", "smoke", "--grid", "vqvae.readout_hidden=0,16", "--repeats", "1",
            "--gpus", "--out", str(tmp_path), *quick]
    assert main(argv) == 0
    per_run = pd.read_csv(tmp_path / "sweep_runs.csv")
    assert list(per_run["setting"]) == ["vqvae.readout_hidden=0", "vqvae.readout_hidden=16"]
    assert per_run["finetune_PVE_mm"].between(0.1, 1000).all() and (per_run["pretrain_train_s"] > 0).all()
    assert per_run["finetune_val_PVE_mm"].between(0.1, 1000).all()
    assert len(pd.read_csv(tmp_path / "sweep_summary.csv")) == 2
    logs = sorted((tmp_path / "runs").glob("*/log.txt"))
    sizes = [p.stat().st_size for p in logs]
    assert len(logs) == 2 and all("evaluate-vae" in p.read_text() for p in logs)

    assert main(argv) == 0  # both runs already evaluated: nothing runs again
    assert [p.stat().st_size for p in logs] == sizes

    # fine-tuning settings over one pre-trained model: every run starts from it
    pretrained = tmp_path / "runs" / "vqvae.readout_hidden=0_r0" / "smoke" / "checkpoints" / "mesh_vqvae_pretrain.pt"
    ft = ["sweep-vae", "--profile", "smoke", "--grid", "vqvae.finetune_lr=1e-4,5e-4", "--repeats", "1", "--gpus",
          "--out", str(tmp_path / "ft"), "--pretrained", str(pretrained), "--set", "vqvae.readout_hidden=0", *quick]
    assert main(ft) == 0
    ft_runs, source = pd.read_csv(tmp_path / "ft" / "sweep_runs.csv"), per_run.iloc[0]
    assert ft_runs["pretrain_PVE_mm"].tolist() == pytest.approx([source["pretrain_PVE_mm"]] * 2, rel=1e-5)
    assert ft_runs["pretrain_train_s"].tolist() == [source["pretrain_train_s"]] * 2
    assert ft_runs["finetune_PVE_mm"].nunique() == 2
    missing = ["sweep-vae", "--profile", "smoke", "--gpus", "--out", str(tmp_path / "none"),
               "--pretrained", str(tmp_path / "missing.pt")]
    assert main(missing) == 2
    assert "missing.pt" in capsys.readouterr().err

    bad = ["sweep-vae", "--profile", "smoke", "--grid", "vqvae.no_such_field=1", "--repeats", "1", "--gpus",
           "--out", str(tmp_path / "bad"), *quick]
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert "vqvae.no_such_field=1_r0 failed (exit 2" in err and "log.txt" in err
    assert "no_such_field" in (tmp_path / "bad" / "runs" / "vqvae.no_such_field=1_r0" / "log.txt").read_text()
