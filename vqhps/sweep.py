"""Repeated Mesh-VQ-VAE trainings over a grid of settings, spread over GPUs.

Every (setting, repeat) is one ``train-vae`` + ``evaluate-vae`` subprocess pair in its own results
folder, repeat ``r`` at seed ``cfg.seed + r``; the tables give each run's validation and test errors
and, per setting, the mean and spread. Two runs of one setting can differ by more than half a
millimetre (docs/experiments.md, "Mesh-VQ-VAE"), so settings are ranked on means over repeats, not
on single runs, and on the validation split, so that the test split stays a measurement.
"""
from __future__ import annotations

import itertools
import math
import os
import queue
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .checkpoint import atomic_write
from .reproduce import threads_per_process

#: columns of the per-run table taken from ``evaluate-vae``'s rows of each stage and split
_METRICS = ("PVE_mm", "PVE_continuous_mm", "MPJPE_mm")
#: the splits read, with their column prefix (test columns carry none)
_SPLITS = (("test", ""), ("val", "val_"))


@dataclass(frozen=True)
class SweepRun:
    """One training of the sweep: a setting (``key=value`` overrides) and its repeat index."""

    setting: tuple[str, ...]
    repeat: int

    @property
    def label(self) -> str:
        return " ".join(self.setting) or "defaults"

    @property
    def name(self) -> str:
        """A folder name for the setting and repeat (``vqvae.channels=(8,16)``, 0 -> ``vqvae.channels=8-16_r0``)."""
        def part(override: str) -> str:
            key, _, value = override.partition("=")
            return f"{key}={re.sub(r'[^A-Za-z0-9.+-]+', '-', value.strip('()[] '))}"

        return f"{'_'.join(part(s) for s in self.setting) or 'defaults'}_r{self.repeat}"


def split_values(raw: str) -> list[str]:
    """``"1,2,(3,4)"`` -> ``["1", "2", "(3,4)"]``: commas inside brackets belong to a tuple value."""
    values, depth, current = [], 0, ""
    for ch in raw:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    if any(not v for v in values):
        raise ValueError(f"--grid value list {raw!r} has an empty value")
    return values


def expand_grid(grid: list[str]) -> list[tuple[str, ...]]:
    """``["vqvae.a=1,2", "vqvae.b=3"]`` -> ``[("vqvae.a=1", "vqvae.b=3"), ("vqvae.a=2", "vqvae.b=3")]``:
    the Cartesian product, first key slowest. No grid: one setting, the defaults."""
    axes = []
    for item in grid:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--grid expects key=v1,v2,... with a dotted config key (e.g. "
                             f"vqvae.readout_hidden=1024,2048), got {item!r}")
        axes.append([f"{key.strip()}={v}" for v in split_values(raw)])
    return [tuple(combo) for combo in itertools.product(*axes)]


def plan(grid: list[str], repeats: int) -> list[SweepRun]:
    """Every setting's repeats, repeat 0 of all settings first (a cut-short sweep still compares them)."""
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    runs = [SweepRun(s, r) for r in range(repeats) for s in expand_grid(grid)]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        raise ValueError(f"--grid values that differ only in brackets or separators share a folder name: {names}")
    return runs


def run_dir(out: Path, run: SweepRun) -> Path:
    return out / "runs" / run.name


def commands(run: SweepRun, profile: str, base_seed: int, shared: list[str]) -> list[list[str]]:
    """The run's ``train-vae`` and ``evaluate-vae`` command lines."""
    sets = [x for s in (*shared, *run.setting, f"seed={base_seed + run.repeat}") for x in ("--set", s)]
    vqhps = [sys.executable, "-m", "vqhps"]
    return [[*vqhps, "train-vae", "--profile", profile, "--stage", "both", *sets],
            [*vqhps, "evaluate-vae", "--profile", profile, *sets]]


def _table(out: Path, run: SweepRun, profile: str) -> Path:
    return run_dir(out, run) / profile / "tables" / "vae_reconstruction.csv"


def seed_pretrained(folder: Path, profile: str, pretrained: Path) -> None:
    """Start a run from a finished pre-training: its checkpoint (hard-linked where the filesystem allows,
    else copied through :func:`atomic_write`) and its training log, so that only fine-tuning runs."""
    checkpoints = folder / profile / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for source in (pretrained, pretrained.with_suffix(".csv")):
        target = checkpoints / f"mesh_vqvae_pretrain{source.suffix}"
        if target.exists() or not source.is_file():
            continue
        try:
            os.link(source, target)
        except OSError:
            with open(source, "rb") as src:
                atomic_write(target, lambda f, src=src: shutil.copyfileobj(src, f))


def _execute(run: SweepRun, out: Path, profile: str, base_seed: int, shared: list[str],
             devices: queue.Queue, pretrained: Path | None, threads: int) -> tuple[SweepRun, str]:
    """Train and evaluate one run on a free device slot with ``threads`` CPU threads; the log goes to
    ``<run>/log.txt``."""
    device = devices.get()
    try:
        folder = run_dir(out, run)
        folder.mkdir(parents=True, exist_ok=True)
        if pretrained is not None:
            seed_pretrained(folder, profile, pretrained)
        env = dict(os.environ, VQHPS_RESULTS_DIR=str(folder), OMP_NUM_THREADS=str(threads))
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        with open(folder / "log.txt", "a") as log:
            for cmd in commands(run, profile, base_seed, shared):
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    return run, f"failed (exit {rc}, see {folder / 'log.txt'})"
        return run, "ok"
    finally:
        devices.put(device)


def run_sweep(runs: list[SweepRun], out: Path, profile: str, base_seed: int = 0, shared: list[str] | None = None,
              devices: list[str | None] | None = None, progress: bool = True,
              pretrained: Path | None = None) -> dict[SweepRun, str]:
    """Run every run not yet evaluated (its table present: skipped), at most one per entry of
    ``devices`` at a time (a GPU id, repeated to share a GPU; ``None``: whatever the run would use).
    With ``pretrained`` (a ``mesh_vqvae_pretrain.pt``), every run fine-tunes that model instead of
    pre-training its own. Returns each run's status: ``ok``, ``done before`` or ``failed (...)``."""
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pre-trained checkpoint not found: {pretrained}; pass a mesh_vqvae_pretrain.pt "
                                "(python -m vqhps train-vae --stage pretrain writes one)")
    from tqdm.auto import tqdm

    devices = devices or [None]
    slots: queue.Queue = queue.Queue()
    for d in devices:
        slots.put(d)
    status = {r: "done before" for r in runs if _table(out, r, profile).is_file()}
    todo = [r for r in runs if r not in status]
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        threads = threads_per_process(len(devices))
        futures = [pool.submit(_execute, r, out, profile, base_seed, shared or [], slots,
                               None if pretrained is None else Path(pretrained), threads) for r in todo]
        for future in tqdm(futures, desc="sweep", disable=not progress or not futures):
            run, result = future.result()
            status[run] = result
    return status


def _last_wall_s(folder: Path, profile: str, stage: str) -> float:
    log = folder / profile / "checkpoints" / f"mesh_vqvae_{stage}.csv"
    return float(pd.read_csv(log)["wall_s"].iloc[-1]) if log.is_file() else math.nan


def collect(runs: list[SweepRun], out: Path, profile: str, base_seed: int = 0) -> pd.DataFrame:
    """One row per evaluated run: setting, repeat, seed, test- and validation-split errors per stage
    (mm; ``finetune_PVE_mm``, ``finetune_val_PVE_mm``, ...) and the training wall times (s) from the
    training logs. Runs without a table are left out; a split the table lacks reads NaN."""
    rows = []
    for run in runs:
        path = _table(out, run, profile)
        if not path.is_file():
            continue
        table = pd.read_csv(path)
        row = {"setting": run.label, "repeat": run.repeat, "seed": base_seed + run.repeat}
        for stage in ("pretrain", "finetune"):
            for split, prefix in _SPLITS:
                measured = table[(table["stage"] == stage) & (table["meshes"] == split)]
                for metric in _METRICS:
                    found = len(measured) and metric in measured.columns
                    row[f"{stage}_{prefix}{metric}"] = float(measured[metric].iloc[0]) if found else math.nan
            row[f"{stage}_train_s"] = _last_wall_s(run_dir(out, run), profile, stage)
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per setting: the number of runs and the mean and sample standard deviation (NaN for one run)
    of every numeric column, in the order the settings first appear."""
    numeric = [c for c in per_run.columns if c not in ("setting", "repeat", "seed")]
    grouped = per_run.groupby("setting", sort=False)[numeric]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    summary.insert(0, "runs", per_run.groupby("setting", sort=False).size())
    order = ["runs"] + [f"{c}_{s}" for c in numeric for s in ("mean", "std")]
    return summary[order].reset_index()


def write_tables(runs: list[SweepRun], out: Path, profile: str,
                 base_seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``<out>/sweep_runs.csv`` and ``<out>/sweep_summary.csv`` (each through :func:`atomic_write`)."""
    per_run = collect(runs, out, profile, base_seed)
    summary = summarise(per_run) if len(per_run) else pd.DataFrame()
    for table, name in ((per_run, "sweep_runs.csv"), (summary, "sweep_summary.csv")):
        atomic_write(out / name, lambda f, table=table: f.write(table.to_csv(index=False).encode()))
    return per_run, summary
