"""Throughput benchmarks (``python -m vqhps bench``): each figure is measured in the same run as its
baseline and written as JSON + CSV under results/<profile>/bench/.

The baseline is the *ceiling*: VQ-HPS's two image backbones alone (``cfg.vqhps.backbone``), at the batch, precision,
memory format and compilation that VQ-HPS runs with. Inference rows are divided by the ceiling's
inference rate, training (and input-pipeline) rows by its training rate, so a ratio of 0.8 says
that everything VQ-HPS adds to its backbones (heads, transformer, Mesh-VQ-VAE, losses, input)
costs 20% of their throughput.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import environment
from .reproduce import device_name
from .train import tf32_matmuls

#: parts of ``python -m vqhps bench``; they run in this order whatever order ``--only`` names them in
PARTS = ("rendering", "ceiling", "vqhps", "data", "mesh_vqvae")
#: leading columns of a benchmark table, in this order (rows may add their own after them)
COLUMNS = ("what", "kind", "items_per_s", "ratio_to_ceiling", "ms_per_batch", "peak_mb", "batch", "precision",
           "compiled", "compile_mode", "cuda_graph_train_step", "channels_last", "torch", "device")
#: row kind -> the ceiling row its ``ratio_to_ceiling`` divides by
CEILING_OF = {"inference": "backbones_x2_inference", "training": "backbones_x2_train_step",
              "input": "backbones_x2_train_step"}


def timed(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of ``fn`` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(sorted(times)[len(times) // 2])


def _peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def bench_mesh_vqvae(cfg, body, device: torch.device, batch: int = 256, iters: int = 10,
                     warmup: int = 3) -> list[dict]:
    """Mesh-VQ-VAE encode+decode meshes/s in fp32 and bf16, fp32 decoding with the fused convolution
    and with the gather it replaces, and the training step."""
    from vqhps.data.corpus import CHUNK, corpus_batch
    from vqhps.vqvae_training import build_mesh_vqvae

    model = build_mesh_vqvae(cfg, body).to(device)
    body = body.to(device)
    meshes = corpus_batch(body, "train", 0, batch, cfg.seed, device)
    rows = []
    model.eval()
    for precision in ("fp32", "bf16"):
        amp = precision == "bf16" and device.type == "cuda"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def roundtrip():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model.decode(model.encode(meshes))

        sec = timed(roundtrip, device, warmup=warmup, iters=iters)
        rows.append({"what": "mesh_vqvae_encode_decode", "precision": precision, "batch": batch,
                     "items_per_s": batch / sec, "ms_per_batch": 1000 * sec, "peak_mb": _peak_mb(device)})
    ids = model.encode(meshes)
    for path, flag in (("fused", "1"), ("gather", "0")):  # fp32 decoding with and without mesh/fused.py

        def decode():
            with torch.no_grad():
                model.decode(ids)

        with environment({"VQHPS_FUSED_CONV": flag}):
            sec = timed(decode, device, warmup=warmup, iters=iters)
        rows.append({"what": f"mesh_vqvae_decode_{path}", "precision": "fp32", "batch": batch,
                     "items_per_s": batch / sec, "ms_per_batch": 1000 * sec, "peak_mb": _peak_mb(device)})
    rows += _mesh_vqvae_train_steps(cfg, body, device, iters=iters, warmup=warmup)
    train_batch = cfg.vqvae.batch_size
    # each call starts a new chunk, so it poses CHUNK batches at once: the cost per batch is 1 / CHUNK of it
    chunks = itertools.count(1)
    sec = timed(lambda: corpus_batch(body, "train", CHUNK * next(chunks), train_batch, cfg.seed, device), device,
                warmup=warmup, iters=iters) / CHUNK
    rows.append({"what": "mesh_corpus_batch", "precision": "fp32", "batch": train_batch,
                 "items_per_s": train_batch / sec, "ms_per_batch": 1000 * sec, "peak_mb": float("nan")})
    return rows


def _mesh_vqvae_train_steps(cfg, body, device: torch.device, iters: int, warmup: int) -> list[dict]:
    """The Mesh-VQ-VAE training step as ``train_stage`` runs it (encoder and decoder compiled per
    cfg.runtime.compile, fused Adam on CUDA, the gradient norm) in fp32, with TF32 matrix products, in
    bf16, and in fp32 captured in one CUDA graph (:class:`vqhps.train.GraphedTrainStep`); where the fused
    Triton kernels run, also through them (VQHPS_FUSED_TRAIN=1, eager) with fp32 and 3xTF32 products."""
    from vqhps.data.corpus import corpus_batch
    from vqhps.mesh import fused
    from vqhps.vqvae_training import build_mesh_vqvae, compile_for

    compiled = bool(cfg.runtime.compile and device.type == "cuda")
    train_batch = cfg.vqvae.batch_size
    batch = {"verts": corpus_batch(body, "train", 2, train_batch, cfg.seed, device)}

    def fresh_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(cfg.seed)
        model = compile_for(build_mesh_vqvae(cfg, body).to(device).train(), cfg, device)
        return model, torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    rows = []
    model, opt = fresh_model()
    with static_shapes(compiled):
        for precision in ("fp32", "tf32", "bf16"):
            with tf32_matmuls(precision == "tf32"):
                sec, graphed = _timed_train_step(cfg, model, opt, batch, device, warmup, iters,
                                                 amp=precision == "bf16" and device.type == "cuda")
            rows.append(_train_step_row("mesh_vqvae_train_step", precision, train_batch, sec, device, compiled, graphed))
        if device.type == "cuda":
            model, opt = fresh_model()  # a graph captures its own optimizer state
            sec, graphed = _timed_train_step(cfg, model, opt, batch, device, warmup, iters, cuda_graph=True)
            rows.append(_train_step_row("mesh_vqvae_train_step", "fp32", train_batch, sec, device, compiled, graphed))
    if device.type != "cuda" or not fused.available(batch["verts"]):
        return rows
    with environment({"VQHPS_FUSED_TRAIN": "1"}):
        model, opt = fresh_model()  # stays eager
        for precision, dots in (("fp32", "ieee"), ("tf32x3", "tf32x3")):
            with fused.dot_precision(dots):
                sec, _ = _timed_train_step(cfg, model, opt, batch, device, warmup, iters)
            rows.append(_train_step_row("mesh_vqvae_train_step_fused", precision, train_batch, sec, device, False, False))
    return rows


def _timed_train_step(cfg, model, opt, batch: dict, device: torch.device, warmup: int, iters: int,
                      amp: bool = False, cuda_graph: bool = False) -> tuple[float, bool]:
    """Seconds per training step of ``model`` on ``batch`` (:func:`vqhps.train.make_train_step` with the
    Mesh-VQ-VAE's loss; bf16 autocast with ``amp``; captured in a CUDA graph with ``cuda_graph`` where
    cfg.runtime allows it) and whether it replayed a graph; the peak-memory counter starts here."""
    from vqhps.train import make_train_step, replays_graph
    from vqhps.vqvae_training import training_loss

    runtime = dataclasses.replace(cfg.runtime, amp=amp)
    step_fn = make_train_step(model, model, opt, None, training_loss, runtime, cuda_graph=cuda_graph)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # a graph step runs 3 eager warm-up calls, then captures on the 4th
    sec = timed(lambda: step_fn(batch, 0), device, warmup=max(warmup, 5) if cuda_graph else warmup, iters=iters)
    return sec, replays_graph(step_fn)


def _train_step_row(what: str, precision: str, batch: int, sec: float, device: torch.device, compiled: bool,
                    graphed: bool) -> dict:
    return {"what": what, "precision": precision, "batch": batch, "items_per_s": batch / sec,
            "ms_per_batch": 1000 * sec, "peak_mb": _peak_mb(device), "compiled": compiled,
            "cuda_graph_train_step": graphed}


def write_bench(rows: list[dict], out_dir: Path, name: str, extra: dict | None = None) -> Path:
    """JSON (rows + environment) and CSV copies of a benchmark."""
    from vqhps.reproduce import environment_facts

    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment_facts(), **(extra or {}), "rows": rows}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    table = pd.DataFrame(rows)
    lead = [c for c in COLUMNS if c in table.columns]
    table[lead + [c for c in table.columns if c not in lead]].to_csv(out_dir / f"{name}.csv", index=False)
    return out_dir / f"{name}.json"


def bench_rendering(cfg, body, n: int = 64, split: str = "train") -> list[dict]:
    """Benchmark images rendered per second by one process (posing, rendering, compositing, labels);
    a build with W worker processes runs about W times this on W free cores."""
    from vqhps.data.synthetic import ShardRenderer, make_spec

    spec = make_spec(cfg, split, body.identifier())
    spec = type(spec)(**{**spec.__dict__, "n": n, "shard_size": n})
    renderer = ShardRenderer(body, cfg.data.crop_size)
    try:
        renderer.render_shard(spec, 0)  # warm-up: GL context, caches
        start = time.perf_counter()
        renderer.render_shard(spec, 0)
        sec = time.perf_counter() - start
    finally:
        renderer.close()
    return [{"what": "benchmark_rendering_one_process", "precision": "-", "batch": n,
             "items_per_s": n / sec, "ms_per_batch": 1000 * sec, "peak_mb": float("nan"),
             "crop_size": cfg.data.crop_size, "render_size": cfg.data.render_size}]


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class BenchSettings:
    """What one ``bench`` run measures: the ``parts`` (of PARTS), the inference batch (training
    batches are cfg.vqhps.batch_size), warm-up and timed calls per row (the median is reported),
    benchmark images rendered and the Mesh-VQ-VAE batch."""

    parts: tuple[str, ...] = PARTS
    inference_batch: int = 256
    #: calls before timing: a CUDA-graph training step runs 3 eagerly, then is captured
    warmup: int = 5
    iters: int = 10
    render_images: int = 64
    vqvae_batch: int = 256

    @classmethod
    def for_device(cls, device: torch.device, **overrides) -> "BenchSettings":
        """GPU defaults, or a short CPU run; ``overrides`` that are None keep the default."""
        base = cls() if device.type == "cuda" else cls(inference_batch=8, warmup=1, iters=2, render_images=32,
                                                      vqvae_batch=8)
        settings = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(settings.parts) - set(PARTS))
        if unknown or not settings.parts:
            raise ValueError(f"unknown bench part(s) {unknown or '(none given)'}; choose from {list(PARTS)}")
        if min(settings.inference_batch, settings.iters, settings.render_images, settings.vqvae_batch) < 1 \
                or settings.warmup < 0:
            raise ValueError(f"bench: --batch and --iters (and the render and Mesh-VQ-VAE batches) must be at "
                             f"least 1 and --warmup at least 0; got {settings}")
        return settings


def run_facts(cfg, device: torch.device) -> dict:
    """Columns every VQ-HPS and ceiling row carries: how the models ran (as ``prepare_model`` and the
    training loop run them) and where. ``cuda_graph_train_step`` is None here: training rows set it
    to whether their step was replayed as a CUDA graph (``replays_graph``)."""
    cuda = device.type == "cuda"
    return {"precision": "bf16" if cfg.runtime.amp and cuda else "fp32",
            "compiled": bool(cfg.runtime.compile and cuda), "channels_last": bool(cfg.runtime.channels_last),
            "torch": torch.__version__, "device": device_name(device), "backbone": cfg.vqhps.backbone,
            "compile_mode": (cfg.runtime.compile_mode or "default") if cfg.runtime.compile and cuda else None,
            "cuda_graph_train_step": None}


def _row(what: str, kind: str, batch: int, sec: float, device: torch.device, facts: dict, **extra) -> dict:
    return {"what": what, "kind": kind, "items_per_s": batch / sec, "ratio_to_ceiling": None,
            "ms_per_batch": 1000 * sec, "peak_mb": _peak_mb(device), "batch": batch, **facts, **extra}


def _measure(fn: Callable[[], object], device: torch.device, s: BenchSettings) -> float:
    """Median seconds per call, the peak-memory counter reset first."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return timed(fn, device, warmup=s.warmup, iters=s.iters)


@contextlib.contextmanager
def static_shapes(compiled: bool) -> Iterator[None]:
    """For compiled parts: a fresh compile cache, and one static graph per batch shape. A training run
    sees one shape; without this, the second batch size the bench shows a compiled backbone would
    recompile it for dynamic shapes, which training never uses."""
    if not compiled:
        yield
        return
    import torch._dynamo

    torch._dynamo.reset()
    patch = {"automatic_dynamic_shapes": False}
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    if hasattr(torch._dynamo.config, limit):
        patch[limit] = max(getattr(torch._dynamo.config, limit), 32)
    with torch._dynamo.config.patch(**patch):
        yield


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_images(cfg, batch: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """A (B, 3, S, S) image batch in [0, 1] already on the device, in the configured memory format
    (random: the throughput does not depend on the content)."""
    size = cfg.data.crop_size
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(cfg.seed + offset)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.runtime.channels_last else x


def random_split_arrays(cfg, body, n: int, seed: int | None = None) -> dict[str, np.ndarray]:
    """An in-memory split of ``n`` samples shaped like the rendered benchmark's (uint8 crops of the
    profile's size, 2D joints, root rotations) with real pose-library poses and phenotypes (the
    benchmark's own draw for its first training shard), so no rendering is needed."""
    from .data import synthetic
    from .geometry import random_rotations

    seed = cfg.seed if seed is None else seed
    spec = dataclasses.replace(synthetic.make_spec(cfg, "train", body.identifier()), n=n, shard_size=n)
    _, params = synthetic.shard_parameters(spec, 0)
    rng = np.random.default_rng([seed, 0xBE7C])
    size = cfg.data.crop_size
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "joints2d_24": rng.uniform(0, size - 1, (n, 24, 2)).astype(np.float32),
        "joints2d_17": rng.uniform(0, size - 1, (n, 17, 2)).astype(np.float32),
        "root_rot": random_rotations(n, torch.Generator().manual_seed(seed)).numpy(),
        "pose": params["pose"], "shape": params["shape"], "valid": np.ones(n, dtype=bool),
    }


# ---------------------------------------------------------------------------------------- ceiling
class BackbonePair(nn.Module):
    """VQ-HPS's two backbones and nothing else: the ceiling. Same attribute names as ``VQHPS``, so
    ``prepare_model`` compiles them the same way."""

    def __init__(self, name: str) -> None:
        from .models.backbone import build_backbone

        super().__init__()
        self.rot_backbone = build_backbone(name, None)
        self.mesh_backbone = build_backbone(name, None)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, _ = self.rot_backbone(images)
        _, spatial = self.mesh_backbone(images)
        return pooled, spatial


def bench_ceiling(cfg, body, device: torch.device, s: BenchSettings) -> list[dict]:
    """Two backbone passes per image (``cfg.vqhps.backbone``): inference (eval, no grad) at the inference batch, and a
    training step (train mode, forward + backward + gradient norm + fused AdamW over both) at
    cfg.vqhps.batch_size, taken as VQ-HPS's steps are (``make_train_step``: one CUDA graph where
    ``runtime.cuda_graph`` applies)."""
    from .hps_training import prepare_model
    from .train import autocast, make_train_step, new_iteration, replays_graph

    facts = run_facts(cfg, device)
    rows = []
    with static_shapes(facts["compiled"]):
        torch.manual_seed(cfg.seed)
        pair = prepare_model(BackbonePair(cfg.vqhps.backbone), cfg, device).eval()
        images = bench_images(cfg, s.inference_batch, device)

        def infer():
            new_iteration()
            with torch.no_grad(), autocast(device, cfg.runtime.amp):
                return pair(images)

        sec = _measure(infer, device, s)
        rows.append(_row("backbones_x2_inference", "inference", s.inference_batch, sec, device, facts))
        pair.train()
        bs = cfg.vqhps.batch_size
        batch = {"image": bench_images(cfg, bs, device, offset=1)}
        opt = torch.optim.AdamW(pair.parameters(), lr=cfg.vqhps.lr, weight_decay=cfg.vqhps.weight_decay,
                                fused=device.type == "cuda")

        def loss_fn(model, batch: dict, step: int) -> dict[str, torch.Tensor]:
            pooled, spatial = model(batch["image"])
            return {"loss": pooled.float().mean() + spatial.float().mean()}

        step = make_train_step(pair, pair, opt, None, loss_fn, cfg.runtime, cuda_graph=True)
        sec = _measure(lambda: step(batch, 0), device, s)
        rows.append(_row("backbones_x2_train_step", "training", bs, sec, device, facts,
                         cuda_graph_train_step=replays_graph(step)))
    return rows


# ---------------------------------------------------------------------------------------- VQ-HPS
@dataclass
class TrainingRig:
    """Everything a VQ-HPS training step needs, built as ``train_vqhps`` builds it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch_fn: Callable[[int], dict]
    #: ``step(batch, step) -> losses``, exactly as the training loop takes it (``make_train_step``)
    step: Callable[[dict, int], dict[str, torch.Tensor]]


def vqhps_training_rig(cfg, body, vqvae, device: torch.device, global_batch: int, n_images: int) -> TrainingRig:
    """A fresh VQ-HPS (random weights) prepared as training prepares it (channels_last, compiled
    backbones, DDP under torchrun), its AdamW schedule, the VQ-HPS loss with its token table and
    ``benchmark_batches`` (no meshes, as ``train_vqhps`` with the cross-entropy) over ``n_images``
    random samples with global batch ``global_batch``."""
    from .hps_training import (Schedule, benchmark_batches, build_vqhps, prepare_model, schedule_optimizer,
                               token_table, vqhps_config, vqhps_loss_fn)
    from .train import make_train_step, wrap_ddp

    hcfg = vqhps_config(cfg, backbone_weights=None)
    arrays = random_split_arrays(cfg, body, n_images)
    batch_fn = benchmark_batches(cfg, arrays, body, device, augment=True, batch_size=global_batch,
                                 meshes=hcfg.loss == "3d")
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_vqhps(hcfg, body, vqvae), cfg, device).train()
    optimizer, scheduler = schedule_optimizer(model.named_parameters(), Schedule.of(hcfg), batch_fn.steps_per_epoch,
                                              device)
    tokens = token_table(vqvae, body, arrays, device)  # before any timed step, even without warm-up
    loss_fn = vqhps_loss_fn(vqvae, body, hcfg, lambda: tokens)
    step = make_train_step(wrap_ddp(model), model, optimizer, scheduler, loss_fn, cfg.runtime, cuda_graph=True)
    return TrainingRig(model, optimizer, batch_fn, step)


def bench_vqhps(cfg, body, device: torch.device, s: BenchSettings) -> list[dict]:
    """VQ-HPS end to end with random weights and a fresh Mesh-VQ-VAE (compiled as ``load_mesh_vqvae``
    compiles it): inference (normalised images on the device -> oriented mesh vertices, the
    ``vqhps_predictor`` path) at the inference batch, and the training step at cfg.vqhps.batch_size,
    alone (one prepared batch reused) and with its input (``benchmark_batches``: pinned copy,
    augmentation, token lookup), as training runs it."""
    from .hps_training import build_vqhps, prepare_model, vqhps_config, vqhps_predictor
    from .train import autocast, new_iteration, replays_graph
    from .vqvae_training import build_mesh_vqvae, compile_for

    facts = run_facts(cfg, device)
    body = body.to(device)
    vqvae = compile_for(build_mesh_vqvae(cfg, body).to(device).eval(), cfg, device, inference=True)
    rows = []
    with static_shapes(facts["compiled"]):
        torch.manual_seed(cfg.seed)
        model = prepare_model(build_vqhps(vqhps_config(cfg, backbone_weights=None), body, vqvae), cfg, device).eval()
        predict = vqhps_predictor(vqvae, body)(model)
        images = bench_images(cfg, s.inference_batch, device)

        def infer():
            new_iteration()
            with torch.no_grad(), autocast(device, cfg.runtime.amp):
                return predict({"image": images})["vertices"]

        sec = _measure(infer, device, s)
        rows.append(_row("vqhps_inference", "inference", s.inference_batch, sec, device, facts))

        bs = cfg.vqhps.batch_size
        rig = vqhps_training_rig(cfg, body, vqvae, device, bs, n_images=4 * bs)
        fixed = rig.batch_fn(0)
        sec = _measure(lambda: rig.step(fixed, 0), device, s)
        rows.append(_row("vqhps_train_step", "training", bs, sec, device, facts,
                         cuda_graph_train_step=replays_graph(rig.step)))
        steps = itertools.count(1)

        def step_with_input():
            k = next(steps)
            return rig.step(rig.batch_fn(k), k)

        sec = _measure(step_with_input, device, s)
        rows.append(_row("vqhps_train_step_with_input", "training", bs, sec, device, facts,
                         cuda_graph_train_step=replays_graph(rig.step)))
    return rows


def bench_data(cfg, body, device: torch.device, s: BenchSettings) -> list[dict]:
    """The input side alone: ``benchmark_batches(...)(step)`` over an in-memory split of random uint8
    crops (pinned host->device copy, augmentation, normalisation), as VQ-HPS training uses it."""
    from .hps_training import benchmark_batches

    body = body.to(device)
    bs = cfg.vqhps.batch_size
    batch_fn = benchmark_batches(cfg, random_split_arrays(cfg, body, 4 * bs), body, device, augment=True,
                                 batch_size=bs, meshes=cfg.vqhps.loss == "3d")
    steps = itertools.count()
    sec = _measure(lambda: batch_fn(next(steps))["image"], device, s)
    facts = {**run_facts(cfg, device), "precision": "fp32", "compiled": False}
    return [_row("data_pipeline", "input", bs, sec, device, facts)]


def _annotated(rows: list[dict], kind: str, device: torch.device) -> list[dict]:
    """Rows of the rendering and Mesh-VQ-VAE benchmarks with the common columns (no ceiling ratio:
    they are not VQ-HPS rows)."""
    out = []
    for r in rows:
        out.append({"what": r["what"], "kind": kind, "items_per_s": r["items_per_s"], "ratio_to_ceiling": None,
                    "compiled": False, "compile_mode": None, "cuda_graph_train_step": None, **r,
                    "channels_last": False, "torch": torch.__version__, "device": device_name(device)})
    return out


_PART_RUNNERS: dict[str, Callable[..., list[dict]]] = {
    "rendering": lambda cfg, body, device, s: _annotated(bench_rendering(cfg, body, n=s.render_images),
                                                         "rendering", device),
    "ceiling": bench_ceiling,
    "vqhps": bench_vqhps,
    "data": bench_data,
    "mesh_vqvae": lambda cfg, body, device, s: _annotated(
        bench_mesh_vqvae(cfg, body, device, batch=s.vqvae_batch, iters=s.iters, warmup=s.warmup), "mesh_vqvae",
        device),
}


def attach_ratios(rows: list[dict]) -> dict:
    """Set each row's ``ratio_to_ceiling`` (items/s over the rate of the ceiling row of its kind, see
    CEILING_OF; None without a ceiling in the same run) and return the headline ratios."""
    rates = {r["what"]: r["items_per_s"] for r in rows if r["what"] in CEILING_OF.values()}
    for r in rows:
        base = rates.get(CEILING_OF.get(r["kind"], ""))
        r["ratio_to_ceiling"] = r["items_per_s"] / base if base else None
    ratio = {r["what"]: r["ratio_to_ceiling"] for r in rows}
    return {"inference_ratio_to_ceiling": ratio.get("vqhps_inference"),
            "training_ratio_to_ceiling": ratio.get("vqhps_train_step_with_input"),
            "training_step_only_ratio_to_ceiling": ratio.get("vqhps_train_step")}


RATIO_DEFINITION = ("ratio_to_ceiling = items_per_s / the same run's ceiling rate (two passes of the backbone per image "
                    "at the same batch, precision, memory format and compilation): inference rows over "
                    "backbones_x2_inference, training rows and the input pipeline over backbones_x2_train_step. "
                    "training_ratio_to_ceiling is the training step with its input (what a training run "
                    "achieves); training_step_only_ratio_to_ceiling reuses one prepared batch.")


def run_bench(cfg, body, device: torch.device, settings: BenchSettings) -> tuple[list[dict], dict]:
    """Run the selected parts (in PARTS order) in this process; returns (rows, summary) with the
    ceiling ratios attached."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    selected = [p for p in PARTS if p in settings.parts]
    for part in tqdm(selected, desc="bench", leave=False, disable=not cfg.runtime.progress):
        rows += _PART_RUNNERS[part](cfg, body, device, settings)
        _release(device)
    summary = attach_ratios(rows)
    summary.update(ratio_definition=RATIO_DEFINITION, inference_batch=settings.inference_batch,
                   training_batch=cfg.vqhps.batch_size, settings=dataclasses.asdict(settings))
    return rows, summary


def format_rows(rows: list[dict]) -> str:
    """One line per row: what, batch, precision, rate and ratio to the ceiling."""
    lines = []
    for r in rows:
        ratio = "" if r.get("ratio_to_ceiling") is None else f"  {r['ratio_to_ceiling']:.2f}x ceiling"
        lines.append(f"{r['what']:32s} {r['precision']:5s} batch {r['batch']:4d}: {r['items_per_s']:9.1f} /s"
                     f"  {r['ms_per_batch']:8.1f} ms{ratio}")
    return "\n".join(lines)
