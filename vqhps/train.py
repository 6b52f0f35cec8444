"""One training loop for every model (Mesh-VQ-VAE, VQ-HPS, baselines), on 1 or N processes.

Batches are a pure function of the step (``batch_fn(step)``) and the torch RNG (dropout, augmentation)
is re-seeded every step from (seed, rank, step), so a run interrupted at any checkpoint resumes to
exactly the weights of an uninterrupted run. Under torchrun the model is wrapped in
DistributedDataParallel and each rank takes an equal slice of the same global batch
(:func:`rank_slice`); checkpoints hold the unwrapped model, so a run can resume on another number of
processes. (The scaling benchmark, ``python -m vqhps bench-ddp``, instead keeps the per-process batch
fixed, so its global batch grows with the number of processes.) Rank 0 alone writes checkpoints
(atomic), the CSV log and the progress bar; logged metrics are averaged over ranks. A non-finite loss
stops training on every rank with a clear message and leaves the last good checkpoint in place.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .distributed import (barrier, broadcast_int, current, int_range_across_ranks, mean_across_ranks,
                          per_rank_batch)

#: checkpoint meta fields a resumed run must share with the model being trained
_COMPATIBILITY = ("body_id", "hierarchy_hash", "architecture")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    checkpoint: Path
    log: Path
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    #: seconds spent training in this call (0 when the run was already complete)
    wall_s: float = 0.0
    #: seconds spent training over every session of the run (resumes included)
    total_wall_s: float = 0.0


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


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """fp32 matrix products on TF32 tensor cores (inputs rounded to 10 mantissa bits, fp32 sums and
    activations) inside the block when ``enabled``; the previous setting is restored on exit."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Inside the block, when ``enabled``: only deterministic algorithms (an op without one raises),
    cuDNN without autotuning, and cuBLAS with the fixed workspace that determinism needs (set when
    CUBLAS_WORKSPACE_CONFIG is unset). The previous settings are restored on exit."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def new_iteration() -> None:
    """Mark the start of a training step or prediction batch for compiled CUDA graphs
    (``runtime.compile_mode="reduce-overhead"``): the previous one's graph outputs are dead, so their
    memory may be reused. Without CUDA graphs it changes nothing; without CUDA it is skipped (its
    first call imports the compiler, seconds on a small CPU)."""
    if torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()


def step_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Global-batch indices of ``step``: epochs are seeded permutations, the last partial batch dropped."""
    epoch, pos = divmod(step, max(n // batch_size, 1))
    return _epoch_permutation(n, seed, epoch)[pos * batch_size:(pos + 1) * batch_size]


def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def device_step_indices(n: int, batch_size: int, seed: int, device: torch.device | str) -> Callable[[int], torch.Tensor]:
    """``indices(step)``: this rank's share of :func:`step_indices` as a tensor on ``device``, with one
    copy to the device per epoch rather than one per step (a copy from pageable host memory waits for
    the GPU's queue to drain, so a copy every step keeps the CPU from running ahead)."""
    per_epoch = max(n // batch_size, 1)
    cached: dict[int, torch.Tensor] = {}

    def indices(step: int) -> torch.Tensor:
        epoch, pos = divmod(step, per_epoch)
        if epoch not in cached:
            cached.clear()
            cached[epoch] = torch.as_tensor(_epoch_permutation(n, seed, epoch), device=device)
        return rank_slice(cached[epoch][pos * batch_size:(pos + 1) * batch_size])

    return indices


def rank_slice(indices, rank: int | None = None, world: int | None = None):
    """This rank's share of a global batch (an array or a tensor): the ``rank``-th of ``world`` equal
    contiguous parts (defaults: the running process). Raises ValueError when the batch does not split
    evenly."""
    info = current()
    rank = info.rank if rank is None else rank
    world = info.world if world is None else world
    per = per_rank_batch(len(indices), world)
    return indices[rank * per:(rank + 1) * per]


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the torch RNG for one rank at one step: independent streams, reproducible on resume."""
    words = np.random.SeedSequence([int(seed) % 2**63, rank, step]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def wrap_ddp(model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when running under torchrun (gradients averaged over ranks;
    one GPU per process, none on the CPU with gloo), else ``model`` itself."""
    if not current().enabled:
        return model
    device = next(model.parameters()).device
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)


def train_step(wrapped: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, batch: dict,
               loss_fn: Callable[[torch.nn.Module, dict, int], dict[str, torch.Tensor]], step: int, amp: bool,
               grad_clip: float | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step as :func:`train` takes it (and ``python -m vqhps bench`` times it): the
    loss of ``wrapped`` (the model or its DDP wrapper) under autocast, backward, the gradient norm of
    ``model`` (clipped only with ``grad_clip``), optimizer and scheduler steps. Returns the losses
    with ``grad_norm``."""
    device = next(model.parameters()).device
    new_iteration()
    with autocast(device, amp):
        losses = loss_fn(wrapped, batch, step)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    # the gradient norm is logged (it diagnoses a stalled run); clipping only when asked for
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    # detached: a loss kept alive with its graph would tie the next step's gradient accumulation to
    # this step's stream
    return {**{k: v.detach() for k, v in losses.items()}, "grad_norm": grad_norm}


def graph_capture_possible(runtime, device: torch.device) -> bool:
    """Whether ``runtime.cuda_graph`` can apply: CUDA, one process (DDP's gradient hooks talk to the
    other ranks) and no compiled CUDA graphs of its own (``compile_mode="reduce-overhead"``)."""
    mode = str(runtime.compile_mode or "")
    return (bool(getattr(runtime, "cuda_graph", False)) and device.type == "cuda" and not current().enabled
            and not (runtime.compile and ("reduce-overhead" in mode or "cudagraphs" in mode)))


class GraphedTrainStep:
    """:func:`train_step` captured once in a CUDA graph and replayed for every later step.

    A training step launches about two thousand kernels; a slow host launches them more slowly than
    the GPU runs them. Replaying one graph costs the GPU time alone. The first ``warmup`` calls run
    eagerly on a side stream (compilation, lazy initialisation, the loss's cached tables), the next
    is captured; each call copies its batch into the static tensors the graph reads, replays, then
    steps the scheduler on the host. Learning rates reach the graph through device tensors, refreshed
    from the (float) param-group values before a replay, so schedulers and checkpoints are unchanged.
    Every other optimizer setting is a constant of the graph: when a scheduler changes one (OneCycleLR
    cycles Adam's ``betas``), the step falls back to eager steps with a warning rather than replay
    stale values (:func:`changed_optimizer_settings`).
    The returned losses are the graph's outputs: read them before the next call. A step that cannot
    be captured (a host synchronisation, a data-dependent shape) falls back to eager steps, warning
    once. Calls take the same arguments as :func:`train_step` minus the models and optimizer.
    """

    def __init__(self, wrapped: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                 loss_fn: Callable[[torch.nn.Module, dict, int], dict[str, torch.Tensor]], amp: bool,
                 grad_clip: float | None = None, warmup: int = 3) -> None:
        self.wrapped, self.model, self.optimizer, self.scheduler = wrapped, model, optimizer, scheduler
        self.loss_fn, self.amp, self.grad_clip, self.warmup = loss_fn, amp, grad_clip, warmup
        self.device = next(model.parameters()).device
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None
        self.static_batch: dict = {}
        self.static_losses: dict[str, torch.Tensor] = {}
        self.lr_tensors: list[torch.Tensor] = []
        self.lr_values: list[float] = []
        self.captured_settings: list[dict] = []

    def _eager(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        return train_step(self.wrapped, self.model, self.optimizer, self.scheduler, batch, self.loss_fn, step,
                          self.amp, self.grad_clip)

    def __call__(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.failed is not None:
            return self._eager(batch, step)
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                losses = self._eager(batch, step)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return losses
        if self.graph is None:
            try:
                self._capture(batch, step)
            except Exception as err:  # noqa: BLE001 - any capture failure means: run this step eagerly
                self.graph, self.failed = None, f"{type(err).__name__}: {err}"
                warnings.warn(f"training step not captured in a CUDA graph ({self.failed}); running eagerly")
                return self._eager(batch, step)
        else:
            changed = changed_optimizer_settings(self.captured_settings, self.optimizer)
            if changed:
                self.graph, self.failed = None, f"optimizer settings changed after the capture: {', '.join(changed)}"
                warnings.warn(f"CUDA-graph training step left for eager steps ({self.failed}); the graph holds "
                              "every setting but the learning rate fixed")
                return self._eager(batch, step)
            self._load(batch)
        self._refresh_lr()
        self.graph.replay()
        if self.scheduler is not None:
            self.scheduler.step()
        return self.static_losses

    def _load(self, batch: dict) -> None:
        missing = sorted(set(self.static_batch) - set(batch))
        if missing or any(batch[k].shape != v.shape for k, v in self.static_batch.items() if k in batch):
            raise ValueError("a CUDA-graph training step needs every batch with the same keys and shapes as "
                             f"the captured one (missing {missing}); drop the last partial batch")
        for k, v in batch.items():
            if k in self.static_batch:
                self.static_batch[k].copy_(v, non_blocking=True)

    def _refresh_lr(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            lr = float(group["lr"])
            if lr != self.lr_values[i]:
                self.lr_tensors[i].fill_(lr)
                self.lr_values[i] = lr

    def _capture(self, batch: dict, step: int) -> None:
        self.static_batch = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        groups = self.optimizer.param_groups
        self.lr_values = [float(g["lr"]) for g in groups]
        self.lr_tensors = [torch.tensor(v, dtype=torch.float32, device=self.device) for v in self.lr_values]
        self.captured_settings = optimizer_settings(self.optimizer)
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        graph = torch.cuda.CUDAGraph()
        try:
            for g, lr in zip(groups, self.lr_tensors):
                g["lr"], g["capturable"] = lr, True
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                losses = train_step(self.wrapped, self.model, self.optimizer, None, self.static_batch,
                                    self.loss_fn, step, self.amp, self.grad_clip)
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, capturable
        self.graph, self.static_losses = graph, losses


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings but its parameters and learning rate: what a captured optimizer step
    holds as constants."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]


def changed_optimizer_settings(captured: list[dict], optimizer: torch.optim.Optimizer) -> list[str]:
    """Names (``group i: key``) of the settings of :func:`optimizer_settings` that differ from ``captured``."""
    def same(a, b) -> bool:
        return a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b

    now = optimizer_settings(optimizer)
    return [f"group {i}: {key}" for i, (old, new) in enumerate(zip(captured, now))
            for key in sorted(old.keys() | new.keys()) if key not in old or key not in new or not same(old[key], new[key])]


def make_train_step(wrapped: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    loss_fn: Callable[[torch.nn.Module, dict, int], dict[str, torch.Tensor]], runtime,
                    grad_clip: float | None = None, cuda_graph: bool = False) -> Callable[[dict, int], dict]:
    """``step_fn(batch, step) -> losses``: :class:`GraphedTrainStep` where ``cuda_graph`` is asked
    for and :func:`graph_capture_possible`, else plain :func:`train_step`."""
    device = next(model.parameters()).device
    if cuda_graph and graph_capture_possible(runtime, device):
        return GraphedTrainStep(wrapped, model, optimizer, scheduler, loss_fn, runtime.amp, grad_clip)
    return lambda batch, step: train_step(wrapped, model, optimizer, scheduler, batch, loss_fn, step,
                                          runtime.amp, grad_clip)


def replays_graph(step_fn: Callable[[dict, int], dict]) -> bool:
    """Whether a step function of :func:`make_train_step` now replays a captured CUDA graph (False
    before its capture, after a fallback to eager steps, or for plain steps)."""
    return isinstance(step_fn, GraphedTrainStep) and step_fn.graph is not None


def train(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None, batch_fn: Callable[[int], dict],
          loss_fn: Callable[[torch.nn.Module, dict, int], dict[str, torch.Tensor]], total_steps: int,
          out_dir: Path, runtime, meta: dict | None = None, stop_after: int | None = None,
          eval_fn: Callable[[torch.nn.Module, int], dict[str, float]] | None = None, eval_every: int = 0,
          grad_clip: float | None = None, global_batch: int | None = None, seed: int | None = None,
          find_unused_parameters: bool = False, cuda_graph: bool = False) -> TrainResult:
    """Train ``model`` for ``total_steps`` steps, resuming from ``out_dir/name.pt`` when present.

    ``batch_fn(step)`` returns this rank's share of the step's global batch (use :func:`rank_slice`);
    ``loss_fn(model, batch, step)`` calls ``model(...)`` (the DDP wrapper under torchrun; reach other
    attributes through ``getattr(model, "module", model)``) and returns a dict with "loss" (what is
    minimised, a mean over this rank's samples) and other scalars to log. ``stop_after`` ends the run
    early after that many steps (an interruption). ``global_batch`` (the configured batch size) is
    checked to split evenly over the processes. ``seed`` (default: the seed torch was last seeded
    with; a resumed run keeps its checkpoint's) drives the per-rank, per-step torch RNG.
    ``eval_fn(model, step)`` runs on every rank with the unwrapped model; it may shard its work and
    average with :func:`vqhps.distributed.mean_across_ranks`. ``find_unused_parameters`` is passed to
    DDP for models whose forward skips some parameters. ``cuda_graph``: the step may be captured in a
    CUDA graph (:class:`GraphedTrainStep`, where ``runtime.cuda_graph`` allows it); only for steps free
    of host synchronisations and with batches of one shape. ``runtime.deterministic`` runs the steps
    with deterministic algorithms only (:func:`deterministic_algorithms`)."""
    info = current()
    if global_batch is not None:
        per_rank_batch(global_batch, info.world)
    device = next(model.parameters()).device
    out_dir = Path(out_dir)
    ckpt_path, log_path = out_dir / f"{name}.pt", out_dir / f"{name}.csv"
    meta = dict(meta or {})
    seed = torch.initial_seed() if seed is None else seed
    start, history, wall_before = 0, [], 0.0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect={k: v for k, v in meta.items() if k in _COMPATIBILITY})
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], state.get("history", [])
        seed, wall_before = state.get("seed", seed), state.get("wall_s", 0.0)
    lo, hi = int_range_across_ranks(start)
    if lo != hi:
        raise RuntimeError(f"{name}: the processes see different checkpoints at {ckpt_path} (steps {lo} to {hi}); "
                           "multi-machine runs need the results folder on a shared filesystem (VQHPS_RESULTS_DIR)")
    seed = broadcast_int(int(seed) % 2**63)
    result = TrainResult(checkpoint=ckpt_path, log=log_path, history=history, resumed_from=start,
                         total_wall_s=wall_before)
    if start >= total_steps:
        return result

    with deterministic_algorithms(runtime.deterministic):
        wrapped = wrap_ddp(model, find_unused_parameters)
        step_fn = make_train_step(wrapped, model, optimizer, scheduler, loss_fn, runtime, grad_clip, cuda_graph)
        t0 = time.perf_counter()
        last_saved = start if ckpt_path.exists() else None
        elapsed = 0.0

        def save(step: int) -> None:
            nonlocal elapsed
            elapsed = time.perf_counter() - t0
            if info.is_main:
                save_checkpoint(ckpt_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "step": step, "seed": seed, "history": history, "meta": meta, "world": info.world,
                    "wall_s": wall_before + elapsed})
                _write_log(log_path, history)
            barrier()

        end = total_steps if stop_after is None else min(total_steps, start + stop_after)
        running: dict[str, torch.Tensor] = {}
        accumulated = 0
        bar = tqdm(range(start, end), desc=name, initial=start, total=total_steps,
                   disable=not (runtime.progress and info.is_main), leave=False)
        model.train()
        for step in bar:
            torch.manual_seed(rank_seed(seed, info.rank, step))
            batch = batch_fn(step)
            losses = step_fn(batch, step)
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v.detach().float()
            accumulated += 1
            done = step + 1
            if done % runtime.log_every == 0 or done == end or done % runtime.ckpt_every == 0:
                keys = list(running)
                means = mean_across_ranks(torch.stack([running[k].to(device) for k in keys]) / accumulated).tolist()
                row = dict(zip(keys, means))
                running, accumulated = {}, 0
                bad = [k for k, v in row.items() if not math.isfinite(v)]
                if bad:
                    kept = (f"the last good checkpoint (step {last_saved}) is kept at {ckpt_path}" if last_saved is not None
                            else f"no checkpoint was written yet ({ckpt_path})")
                    raise TrainingDiverged(
                        f"{name}: non-finite {', '.join(bad)} by step {done} ({row}); {kept}. "
                        "Lower the learning rate or check the data.")
                row.update(step=done, lr=optimizer.param_groups[0]["lr"],
                           wall_s=round(wall_before + time.perf_counter() - t0, 2))
                if eval_fn is not None and eval_every and (done % eval_every == 0 or done == total_steps):
                    model.eval()
                    row.update(eval_fn(model, done))
                    model.train()
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}")
            if done % runtime.ckpt_every == 0 or done == end:
                save(done)
                last_saved = done
        bar.close()
    result.history, result.wall_s = history, elapsed  # as recorded by the final checkpoint
    result.total_wall_s = wall_before + elapsed
    return result


def read_log(path: Path) -> list[dict]:
    """The rows of a training CSV log (numbers as floats)."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _write_log(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
