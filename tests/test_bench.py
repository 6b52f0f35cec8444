"""The benchmark writes one row per measurement with a positive rate, as JSON and CSV."""
import json

import torch

from vqhps.bench import bench_mesh_vqvae, write_bench


def test_mesh_vqvae_benchmark_rows_and_files(smoke_cfg, body, tmp_path):
    rows = bench_mesh_vqvae(smoke_cfg, body, torch.device("cpu"), batch=2, iters=1)
    assert {r["what"] for r in rows} == {"mesh_vqvae_encode_decode", "mesh_vqvae_train_step", "mesh_corpus_batch"}
    assert all(r["items_per_s"] > 0 and r["ms_per_batch"] > 0 for r in rows)
    path = write_bench(rows, tmp_path, "bench")
    payload = json.loads(path.read_text())
    assert payload["environment"]["torch"] == torch.__version__ and len(payload["rows"]) == len(rows)
    assert (tmp_path / "bench.csv").read_text().count("\n") == len(rows) + 1


def test_rendering_benchmark_reports_a_rate(tiny_cfg, body):
    from vqhps.bench import bench_rendering

    (row,) = bench_rendering(tiny_cfg, body, n=4)
    assert row["items_per_s"] > 0 and row["crop_size"] == tiny_cfg.data.crop_size
