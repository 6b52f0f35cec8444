"""One training loop for every model (Mesh-VQ-VAE, VQ-HPS, baselines).

Batches are a pure function of the step (``batch_fn(step)``), so a run interrupted at any checkpoint
resumes to exactly the weights of an uninterrupted run, and N processes under torchrun each take
their slice of the same global batch. Checkpoints are atomic; a non-finite loss stops training
with a clear message and leaves the last good checkpoint in place.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import current, mean_across_ranks


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    checkpoint: Path
    log: Path
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    wall_s: float = 0.0


def device_of(runtime) -> torch.device:
    """The runtime's device; "auto" picks the process's GPU when there is one."""
    if runtime.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", current().local_rank)
        return torch.device("cpu")
    return torch.device(runtime.device)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPU (no loss scaling needed); a no-op on the CPU or when disabled."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def step_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Global-batch indices of ``step``: epochs are seeded permutations, the last partial batch dropped."""
    per_epoch = max(n // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch_size:(pos + 1) * batch_size]


def rank_slice(indices: np.ndarray) -> np.ndarray:
    """This rank's share of a global batch (contiguous equal parts)."""
    info = current()
    per = len(indices) // info.world
    return indices[info.rank * per:(info.rank + 1) * per]


def train(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None, batch_fn: Callable[[int], dict],
          loss_fn: Callable[[torch.nn.Module, dict, int], dict[str, torch.Tensor]], total_steps: int,
          out_dir: Path, runtime, meta: dict | None = None, stop_after: int | None = None,
          eval_fn: Callable[[torch.nn.Module, int], dict[str, float]] | None = None, eval_every: int = 0,
          grad_clip: float | None = 1.0) -> TrainResult:
    """Train ``model`` for ``total_steps`` steps, resuming from ``out_dir/name.pt`` when present.

    ``loss_fn(model, batch, step)`` returns a dict with "loss" (what is minimised) and any other
    scalars to log. ``stop_after`` ends the run early after that many steps (an interruption)."""
    info = current()
    device = next(model.parameters()).device
    out_dir = Path(out_dir)
    ckpt_path, log_path = out_dir / f"{name}.pt", out_dir / f"{name}.csv"
    meta = dict(meta or {})
    start, history = 0, []
    wrapped = model
    if info.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect={k: v for k, v in meta.items() if k in ("body_id", "hierarchy_hash", "architecture")})
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start, history = state["step"], state.get("history", [])
    result = TrainResult(checkpoint=ckpt_path, log=log_path, history=history, resumed_from=start)
    if start >= total_steps:
        return result

    def save(step: int) -> None:
        if info.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "step": step, "history": history, "meta": meta})
            _write_log(log_path, history)

    t0 = time.perf_counter()
    end = total_steps if stop_after is None else min(total_steps, start + stop_after)
    running: dict[str, torch.Tensor] = {}
    accumulated = 0
    bar = tqdm(range(start, end), desc=name, initial=start, total=total_steps,
               disable=not (runtime.progress and info.is_main), leave=False)
    model.train()
    for step in bar:
        batch = batch_fn(step)
        with autocast(device, runtime.amp):
            losses = loss_fn(wrapped, batch, step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + v.detach().float()
        accumulated += 1
        done = step + 1
        if done % runtime.log_every == 0 or done == end or done % runtime.ckpt_every == 0:
            row = {k: float(mean_across_ranks(v / accumulated)) for k, v in running.items()}
            running, accumulated = {}, 0
            if not all(math.isfinite(v) for v in row.values()):
                raise TrainingDiverged(
                    f"{name}: non-finite loss at step {done} ({row}); the last good checkpoint is kept at "
                    f"{ckpt_path}. Lower the learning rate or check the data.")
            row.update(step=done, lr=optimizer.param_groups[0]["lr"], wall_s=round(time.perf_counter() - t0, 2))
            if eval_fn is not None and eval_every and (done % eval_every == 0 or done == total_steps):
                model.eval()
                row.update(eval_fn(model, done))
                model.train()
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
        if done % runtime.ckpt_every == 0 or done == end:
            save(done)
    bar.close()
    result.history, result.wall_s = history, time.perf_counter() - t0
    return result


def _write_log(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)
