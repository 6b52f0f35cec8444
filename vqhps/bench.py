"""Throughput benchmarks (``python -m vqhps bench``): each figure is measured in the same run as its
baseline and written as JSON + CSV under results/<profile>/bench/."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch


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


def bench_mesh_vqvae(cfg, body, device: torch.device, batch: int = 256, iters: int = 10) -> list[dict]:
    """Mesh-VQ-VAE encode+decode meshes/s in fp32 and bf16, and its training step."""
    from vqhps.data.corpus import corpus_batch
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

        sec = timed(roundtrip, device, iters=iters)
        rows.append({"what": "mesh_vqvae_encode_decode", "precision": precision, "batch": batch,
                     "items_per_s": batch / sec, "ms_per_batch": 1000 * sec, "peak_mb": _peak_mb(device)})
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    train_batch = cfg.vqvae.batch_size
    x = meshes[:train_batch]
    for precision in ("fp32", "bf16"):
        amp = precision == "bf16" and device.type == "cuda"

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model(x)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = timed(step, device, iters=iters)
        rows.append({"what": "mesh_vqvae_train_step", "precision": precision, "batch": train_batch,
                     "items_per_s": train_batch / sec, "ms_per_batch": 1000 * sec, "peak_mb": _peak_mb(device)})
    sec = timed(lambda: corpus_batch(body, "train", 1, train_batch, cfg.seed, device), device, iters=iters)
    rows.append({"what": "mesh_corpus_batch", "precision": "fp32", "batch": train_batch,
                 "items_per_s": train_batch / sec, "ms_per_batch": 1000 * sec, "peak_mb": float("nan")})
    return rows


def write_bench(rows: list[dict], out_dir: Path, name: str, extra: dict | None = None) -> Path:
    """JSON (rows + environment) and CSV copies of a benchmark."""
    from vqhps.reproduce import environment_facts

    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment_facts(), **(extra or {}), "rows": rows}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    pd.DataFrame(rows).to_csv(out_dir / f"{name}.csv", index=False)
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
