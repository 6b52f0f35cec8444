"""Multi-GPU scaling of VQ-HPS training (``python -m vqhps bench-ddp --nproc N``): the training step
with its input, timed under torchrun on 1 process and then on N, in one command.

Batch rule of this benchmark: every process keeps the same per-process batch (default
cfg.vqhps.batch_size), so the global batch is N times larger on N processes (weak scaling; training
itself keeps the configured global batch and splits it, see ``vqhps.train``). The global rate is
world x per-process batch / the slowest rank's median step time, and speed-up = rate_N / rate_1.
"""
from __future__ import annotations

import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

#: what one scaling row measures (the same step as ``bench``'s vqhps_train_step_with_input)
WHAT = "vqhps_train_step_with_input"


def _slowest(sec: float, device: torch.device) -> float:
    """The largest of the ranks' values (this rank's own without a process group)."""
    import torch.distributed as dist

    from .distributed import current

    if not current().enabled:
        return sec
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([sec], dtype=torch.float64, device=where)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def scaling_worker(cfg, per_process_batch: int, warmup: int, iters: int, out: Path) -> dict:
    """One process of a scaling run (already joined to torchrun's group, or alone): VQ-HPS training
    steps with input at ``per_process_batch`` per process, timed; rank 0 writes the row to ``out``."""
    from .bench import _peak_mb, run_facts, timed, vqhps_training_rig
    from .body_setup import setup_body
    from .distributed import current, rank0_first
    from .train import device_of
    from .vqvae_training import build_mesh_vqvae

    info = current()
    device = device_of(cfg.runtime)
    with rank0_first():  # fills the body-model and hierarchy caches once
        body = setup_body(cfg)
        vqvae = build_mesh_vqvae(cfg, body)
    body, vqvae = body.to(device), vqvae.to(device).eval()
    global_batch = per_process_batch * info.world
    rig = vqhps_training_rig(cfg, body, vqvae, device, global_batch, n_images=2 * global_batch)
    steps = itertools.count()

    def step():
        k = next(steps)
        return rig.step(rig.batch_fn(k), k)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = _slowest(timed(step, device, warmup=warmup, iters=iters), device)
    row = {"what": WHAT, "kind": "training", "world": info.world, "items_per_s": global_batch / sec,
           "speedup": None, "ms_per_batch": 1000 * sec, "peak_mb": _peak_mb(device), "batch": global_batch,
           "per_process_batch": per_process_batch, **run_facts(cfg, device),
           "backend": torch.distributed.get_backend() if info.enabled else "-"}
    if info.is_main:
        Path(out).write_text(json.dumps(row))
    return row


def run_scaling(profile: str, overrides: list[str], nproc: int, per_process_batch: int, warmup: int, iters: int,
                timeout_s: float = 3600.0) -> tuple[list[dict], dict]:
    """Launch the scaling worker (``python -m vqhps bench-ddp``) under torchrun on 1 process, then on
    ``nproc``; returns (one row per world size with its speed-up over 1, summary)."""
    from .distributed import launch

    if nproc < 2:
        raise ValueError(f"--nproc must be at least 2 to measure a speed-up over one process, got {nproc}")
    common = ["bench-ddp", "--profile", profile, *[a for kv in overrides for a in ("--set", kv)],
              "--batch", str(per_process_batch), "--warmup", str(warmup), "--iters", str(iters)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vqhps-bench-ddp-") as tmp:
        for world in (1, nproc):
            out = Path(tmp) / f"world{world}.json"
            print(f"bench-ddp: {world} process(es), {per_process_batch} images each", file=sys.stderr, flush=True)
            launch([*common, "--worker-out", str(out)], nproc=world, timeout_s=timeout_s)
            if not out.is_file():
                raise RuntimeError(f"bench-ddp: the {world}-process run finished without writing {out}")
            rows.append(json.loads(out.read_text()))
    base = rows[0]["items_per_s"]
    for row in rows:
        row["speedup"] = row["items_per_s"] / base
    speedup = rows[-1]["speedup"]
    summary = {"nproc": nproc, "speedup": speedup, "scaling_efficiency": speedup / nproc,
               "per_process_batch": per_process_batch,
               "global_batch": {str(r["world"]): r["batch"] for r in rows},
               "batch_rule": (f"each process takes {per_process_batch} images a step, so the global batch grows "
                              f"with the processes ({per_process_batch} on 1, {per_process_batch * nproc} on "
                              f"{nproc}); speedup = items_per_s on {nproc} / items_per_s on 1")}
    return rows, summary
