"""Run the study's notebooks in order with papermill and record what ran where (the manifest)."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

from .config import PROJECT_ROOT, load_config


def device_name(device=None) -> str:
    """The name of ``device`` (default: the first GPU when there is one, else the CPU)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def environment_facts() -> dict:
    """Git hash, device and library versions: what a result needs to be traced back."""
    import torch

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


def reproduce(profile: str, nproc: int = 1, only: list[str] | None = None) -> int:
    """Execute every notebook for ``profile``; stop at the first failure and name it. Returns an exit code.

    ``nproc`` reaches every notebook as a papermill parameter: with more than one, the training
    notebooks run their training through :func:`vqhps.distributed.launch` (torchrun, DDP), then load
    the finished checkpoints in-process, so both paths share the same code."""
    import papermill
    import torch

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} (make reproduce NPROC={nproc}) but only {torch.cuda.device_count()} "
                         f"GPU(s) are visible; use at most one process per GPU")
    cfg = load_config(profile)
    out_dir = cfg.results_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = cfg.results_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(environment_facts())
    manifest["profile"] = profile
    manifest["nproc"] = nproc
    manifest["config"] = cfg.to_dict()
    manifest.setdefault("notebooks", {})
    for nb in notebooks():
        if only and not any(nb.name.startswith(o) for o in only):
            continue
        print(f"[{profile}] {nb.name} ...", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(nb), str(out_dir / nb.name), parameters={"profile": profile, "nproc": nproc},
                                       kernel_name="python3", cwd=str(nb.parent), progress_bar=False)
        except Exception as err:  # papermill raises PapermillExecutionError with the failing cell
            print(f"FAILED: notebooks/{nb.name} (executed copy: {out_dir / nb.name})\n{err}", flush=True)
            manifest["notebooks"][nb.name] = {"status": "failed", "wall_s": round(time.perf_counter() - start, 1)}
            write_manifest(manifest_path, manifest)
            return 1
        wall = time.perf_counter() - start
        manifest["notebooks"][nb.name] = {"status": "ok", "wall_s": round(wall, 1)}
        write_manifest(manifest_path, manifest)
        print(f"[{profile}] {nb.name} done in {wall:.0f} s", flush=True)
    manifest["total_wall_s"] = round(sum(v["wall_s"] for v in manifest["notebooks"].values()), 1)
    write_manifest(manifest_path, manifest)
    return 0
