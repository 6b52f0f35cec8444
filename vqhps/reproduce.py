"""Run the study's notebooks in order with papermill and record what ran where (the manifest)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import PROJECT_ROOT, STUDY_OVERRIDES_ENV, environment, load_config, parse_overrides


def device_name(device=None) -> str:
    """The name of ``device`` (default: the first GPU when there is one, else the CPU)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def environment_facts() -> dict:
    """Git hash, device and library versions: what a result needs to be traced back. ``VQHPS_GIT_COMMIT``
    names the commit where the checkout has no usable git metadata (a copied working tree)."""
    import torch

    commit = os.environ.get("VQHPS_GIT_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.TimeoutExpired):
            commit = "unknown"
    return {"git_commit": commit, "device": device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}


def notebooks(directory: Path = PROJECT_ROOT / "notebooks") -> list[Path]:
    """The study's notebooks, in their numbered order."""
    return sorted(directory.glob("[0-9][0-9]_*.ipynb"))


def write_manifest(path: Path, entries: dict) -> None:
    from .checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(entries, indent=2, sort_keys=True).encode()))


@dataclass(frozen=True)
class BackgroundJob:
    """A training that ``reproduce --overlap`` runs beside the notebooks, as ``python -m vqhps`` commands
    (one after another): started once the notebooks and jobs in ``after`` are done, waited for before
    the first notebook in ``needed_by`` runs, which then finds the finished checkpoints and only
    evaluates and draws."""

    name: str
    commands: tuple[tuple[str, ...], ...]
    after: tuple[str, ...]
    needed_by: str


def overlap_jobs() -> tuple[BackgroundJob, ...]:
    """The trainings of the study and what each needs: the Mesh-VQ-VAE needs no images (its corpus and
    the training split's poses are sampled, not rendered), so it trains while notebook 00 renders; the
    baselines need images only (one job each); VQ-HPS and the Table 2 runs need both. On one GPU a
    single training leaves it partly idle (kernel launches, input), so these run side by side."""
    from .ablations import RUNS
    from .baseline_training import BASELINES

    return (
        BackgroundJob("mesh_vqvae", (("train-vae", "--stage", "both"),), after=(), needed_by="01"),
        *(BackgroundJob(n, (("train", "--name", n),), after=("00",), needed_by="04") for n in BASELINES),
        BackgroundJob("vqhps", (("train", "--name", "vqhps"),), after=("00", "mesh_vqvae"), needed_by="03"),
        BackgroundJob("ablations", tuple(("train", "--name", n) for n in RUNS), after=("00", "mesh_vqvae"),
                      needed_by="05"),
    )


def threads_per_process(n_processes: int) -> int:
    """CPU threads for each of ``n_processes`` trainings sharing this host: an equal share of the cores,
    at least 2 (several trainings each at every core's width thrash: four at 64 threads each on a
    64-core host stepped 4x slower than at 8)."""
    return max(2, (os.cpu_count() or 4) // max(n_processes, 1))


class JobRunner:
    """Starts ``BackgroundJob``s as child processes (logs under ``log_dir``) and tracks what is done."""

    def __init__(self, jobs: tuple[BackgroundJob, ...], profile: str, log_dir: Path, threads: int,
                 origin: float | None = None) -> None:
        self.jobs, self.profile, self.log_dir, self.threads = jobs, profile, log_dir, threads
        #: time.perf_counter() of the run's start: jobs' ``start_s`` count from it
        self.origin = time.perf_counter() if origin is None else origin
        self.done: set[str] = set()
        self.procs: dict[str, tuple[BackgroundJob, subprocess.Popen, float]] = {}
        self.walls: dict[str, dict] = {}

    def _script(self, job: BackgroundJob) -> str:
        exe = shlex.quote(sys.executable)
        return " && ".join(f"{exe} -m vqhps {' '.join(map(shlex.quote, c))} --profile {shlex.quote(self.profile)} "
                           f"--set runtime.progress=false" for c in job.commands)

    def start_ready(self) -> None:
        """Start every job whose ``after`` items are all done (each in its own process group)."""
        for job in self.jobs:
            if job.name not in self.procs and all(a in self.done for a in job.after):
                self.log_dir.mkdir(parents=True, exist_ok=True)
                path = self.log_dir / f"{job.name}.log"
                with open(path, "wb") as log:  # the child keeps its own handle
                    proc = subprocess.Popen(["bash", "-c", self._script(job)], stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": str(self.threads)},
                                            cwd=PROJECT_ROOT, start_new_session=True)
                self.procs[job.name] = (job, proc, time.perf_counter())
                print(f"  started {job.name} in the background (log: {path})", flush=True)

    def poll(self) -> None:
        """Record finished jobs; a failed job raises with its log's path."""
        for name, (job, proc, start) in list(self.procs.items()):
            if name in self.done or proc.poll() is None:
                continue
            wall = round(time.perf_counter() - start, 1)
            self.walls[name] = {"status": "ok" if proc.returncode == 0 else "failed", "wall_s": wall,
                                "start_s": round(start - self.origin, 1), "commands": self._script(job)}
            if proc.returncode != 0:
                raise RuntimeError(f"background job {name!r} failed (exit {proc.returncode}); "
                                   f"see {self.log_dir / (name + '.log')}")
            self.done.add(name)
            print(f"  {name} done in {wall:.0f} s", flush=True)
            self.start_ready()

    def wait_for(self, notebook: str) -> None:
        """Block (starting jobs as they become ready) until every job needed by ``notebook`` is done."""
        needed = {j.name for j in self.jobs if notebook.startswith(j.needed_by)}
        self.start_ready()
        self.poll()
        while needed - self.done:
            missing = needed - self.done - set(self.procs)
            if missing:
                raise RuntimeError(f"notebook {notebook} needs job(s) {sorted(missing)}, which cannot start: "
                                   f"their prerequisites are not done")
            time.sleep(2.0)
            self.poll()

    def stop(self) -> None:
        """Terminate the jobs still running, with the trainings they started (their process groups)."""
        for _, proc, _ in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)


def _execute(nb: Path, out_dir: Path, parameters: dict, runner: str) -> None:
    if runner == "inline":  # no Jupyter kernel: the code cells in this process (vqhps.notebook_exec)
        from .notebook_exec import execute_inline

        execute_inline(nb, parameters, output=out_dir / nb.name)
        return
    import papermill

    papermill.execute_notebook(str(nb), str(out_dir / nb.name), parameters=parameters, kernel_name="python3",
                               cwd=str(nb.parent), progress_bar=False)


def reproduce(profile: str, nproc: int = 1, only: list[str] | None = None, overlap: bool = False,
              runner: str = "papermill", overrides: list[str] | None = None, check_files: bool = True) -> int:
    """Execute every notebook for ``profile``; stop at the first failure and name it. Returns an exit code.

    ``nproc`` reaches every notebook as a papermill parameter: with more than one, the training
    notebooks run their training through :func:`vqhps.distributed.launch` (torchrun, DDP), then load
    the finished checkpoints in-process, so both paths share the same code. ``overlap`` (one process)
    runs the trainings of ``overlap_jobs`` beside the notebooks instead; the manifest then records each
    job's wall time and the elapsed time of the whole run. ``runner="inline"`` executes the code cells
    in this process (no Jupyter kernel needed); either runner writes the executed copies. ``overrides``
    (``key=value`` pairs, e.g. ``vqhps.backbone=resnet50``) apply to every notebook and training job
    of the run (through ``$VQHPS_SET``) and are recorded in the manifest. A run of every notebook
    starts a new manifest; ``only`` adds to the existing one. With ``data.source=paper`` the paper's
    files are checked first (``check_files``; the CLI checks before calling): PaperFilesError lists
    every problem and nothing is written."""
    pairs = [*os.environ.get(STUDY_OVERRIDES_ENV, "").split(), *(overrides or [])]
    parse_overrides(pairs)  # a bad key or value fails here, before any work
    with environment({STUDY_OVERRIDES_ENV: " ".join(pairs)}):
        cfg = load_config(profile)
        if check_files and cfg.data.source == "paper":
            from .data.paper_files import require_paper_files

            require_paper_files(cfg)
        return _reproduce(profile, nproc, only, overlap, runner, pairs)


def _reproduce(profile: str, nproc: int, only: list[str] | None, overlap: bool, runner: str,
               overrides: list[str]) -> int:
    import torch

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} (make reproduce NPROC={nproc}) but only {torch.cuda.device_count()} "
                         f"GPU(s) are visible; use at most one process per GPU")
    if overlap and nproc > 1:
        raise ValueError("--overlap runs the trainings side by side on one GPU; with --nproc > 1 each training "
                         "uses every GPU in turn instead: choose one of them")
    if runner not in ("papermill", "inline"):
        raise ValueError(f"unknown notebook runner {runner!r}; choose papermill or inline")
    cfg = load_config(profile)
    out_dir = cfg.results_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = cfg.results_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if only and manifest_path.exists() else {}
    manifest.update(environment_facts())
    manifest.update(profile=profile, nproc=nproc, overlap=overlap, runner=runner, overrides=overrides,
                    config=cfg.to_dict())
    manifest.setdefault("notebooks", {})
    selected = [nb for nb in notebooks() if not only or any(nb.name.startswith(o) for o in only)]
    jobs = None
    started = time.perf_counter()
    if overlap:
        needed = tuple(j for j in overlap_jobs() if any(nb.name.startswith(j.needed_by) for nb in selected))
        threads = threads_per_process(len(needed))
        jobs = JobRunner(needed, profile, cfg.results_dir / "logs" / "jobs", threads, origin=started)
        # notebooks not selected and jobs no selected notebook needs: done by an earlier run
        jobs.done.update([nb.name[:2] for nb in notebooks() if nb not in selected]
                         + [j.name for j in overlap_jobs() if j not in needed])
    try:
        for nb in selected:
            if jobs is not None:
                jobs.wait_for(nb.name)
            print(f"[{cfg.run_name}] {nb.name} ...", flush=True)
            start = time.perf_counter()
            try:
                _execute(nb, out_dir, {"profile": profile, "nproc": nproc}, runner)
            except Exception as err:  # papermill raises PapermillExecutionError with the failing cell
                print(f"FAILED: notebooks/{nb.name} (executed copy: {out_dir / nb.name})\n{err}", flush=True)
                manifest["notebooks"][nb.name] = {"status": "failed", "wall_s": round(time.perf_counter() - start, 1)}
                write_manifest(manifest_path, manifest)
                return 1
            wall = time.perf_counter() - start
            manifest["notebooks"][nb.name] = {"status": "ok", "wall_s": round(wall, 1),
                                              "start_s": round(start - started, 1)}
            if jobs is not None:
                jobs.done.add(nb.name[:2])
                jobs.start_ready()
                manifest["background_jobs"] = jobs.walls
            write_manifest(manifest_path, manifest)
            print(f"[{cfg.run_name}] {nb.name} done in {wall:.0f} s", flush=True)
    finally:
        if jobs is not None:
            jobs.stop()
    manifest["total_wall_s"] = round(sum(v["wall_s"] for v in manifest["notebooks"].values()), 1)
    manifest["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_manifest(manifest_path, manifest)
    import matplotlib.pyplot as plt

    from .figures import save_figure, timeline_figure

    fig = timeline_figure(manifest)
    save_figure(fig, cfg.results_dir, "reproduce_timeline")
    plt.close(fig)
    from .report import write_report

    print(f"[{cfg.run_name}] report: {write_report(cfg.results_dir)}", flush=True)
    return 0
