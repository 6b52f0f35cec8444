"""The benchmarks: one row per measurement with a positive rate, ratios to the ceiling measured in
the same run, the parts ``--only`` selects, JSON + CSV files, and the DDP scaling run on 2 CPU
processes. No timing is asserted beyond positivity (the CPU is shared)."""
import json
import os
import math

import pytest
import torch

from vqhps.bench import (CEILING_OF, COLUMNS, PARTS, BenchSettings, attach_ratios, bench_mesh_vqvae, run_bench,
                         write_bench)

CPU = torch.device("cpu")


def test_mesh_vqvae_benchmark_rows_and_files(smoke_cfg, body, tmp_path):
    rows = bench_mesh_vqvae(smoke_cfg, body, CPU, batch=2, iters=1, warmup=0)
    assert {r["what"] for r in rows} == {"mesh_vqvae_encode_decode", "mesh_vqvae_train_step", "mesh_corpus_batch",
                                        "mesh_vqvae_decode_fused", "mesh_vqvae_decode_gather"}
    train_rows = [r for r in rows if r["what"] == "mesh_vqvae_train_step"]
    assert [r["precision"] for r in train_rows] == ["fp32", "tf32", "bf16"]
    assert not torch.backends.cuda.matmul.allow_tf32  # the TF32 row restores the switch
    assert os.environ.get("VQHPS_FUSED_CONV") is None  # the switch is restored after the fused/gather rows
    assert all(r["items_per_s"] > 0 and r["ms_per_batch"] > 0 for r in rows)
    path = write_bench(rows, tmp_path, "bench")
    payload = json.loads(path.read_text())
    assert payload["environment"]["torch"] == torch.__version__ and len(payload["rows"]) == len(rows)
    assert (tmp_path / "bench.csv").read_text().count("\n") == len(rows) + 1


def test_rendering_benchmark_reports_a_rate(tiny_cfg, body):
    from vqhps.bench import bench_rendering

    (row,) = bench_rendering(tiny_cfg, body, n=4)
    assert row["items_per_s"] > 0 and row["crop_size"] == tiny_cfg.data.crop_size


def test_ratios_divide_by_the_ceiling_of_the_same_kind():
    def row(what, kind, rate):
        return {"what": what, "kind": kind, "items_per_s": rate}

    rows = [row("backbones_x2_inference", "inference", 100.0), row("backbones_x2_train_step", "training", 50.0),
            row("vqhps_inference", "inference", 80.0), row("vqhps_train_step", "training", 40.0),
            row("vqhps_train_step_with_input", "training", 25.0), row("data_pipeline", "input", 200.0),
            row("mesh_vqvae_encode_decode", "mesh_vqvae", 7.0)]
    summary = attach_ratios(rows)
    assert [r["ratio_to_ceiling"] for r in rows] == [1.0, 1.0, 0.8, 0.8, 0.5, 4.0, None]
    assert summary == {"inference_ratio_to_ceiling": 0.8, "training_ratio_to_ceiling": 0.5,
                       "training_step_only_ratio_to_ceiling": 0.8}
    alone = [row("vqhps_inference", "inference", 80.0)]  # no ceiling in the run: no ratio
    assert attach_ratios(alone)["inference_ratio_to_ceiling"] is None and alone[0]["ratio_to_ceiling"] is None


def test_bench_settings_refuse_unknown_parts_and_the_cli_knows_every_part():
    from vqhps.cli import _BENCH_PARTS, build_parser

    assert tuple(_BENCH_PARTS) == PARTS
    with pytest.raises(ValueError, match=r"unknown bench part\(s\) \['gpu'\]; choose from"):
        BenchSettings.for_device(CPU, parts=("gpu",))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--only", "gpu"])
    assert BenchSettings.for_device(CPU, iters=None).iters == BenchSettings.for_device(CPU).iters


def test_static_shapes_patches_the_compiler_only_inside():
    import torch._dynamo

    from vqhps.bench import static_shapes

    before = torch._dynamo.config.automatic_dynamic_shapes
    with static_shapes(True):
        assert torch._dynamo.config.automatic_dynamic_shapes is False
    with static_shapes(False):
        assert torch._dynamo.config.automatic_dynamic_shapes == before
    assert torch._dynamo.config.automatic_dynamic_shapes == before


def test_random_split_feeds_the_training_batches(tiny_cfg, body):
    from vqhps.bench import random_split_arrays
    from vqhps.hps_training import benchmark_batches

    arrays = random_split_arrays(tiny_cfg, body, 6)
    s = tiny_cfg.data.crop_size
    assert arrays["image"].shape == (6, s, s, 3) and arrays["image"].dtype.name == "uint8"
    batch = benchmark_batches(tiny_cfg, arrays, body, CPU, batch_size=3, prefetch=False)(0)
    assert batch["image"].shape == (3, 3, s, s) and batch["canonical"].shape == (3, body.n_vertices, 3)
    assert torch.allclose(batch["root_rot"] @ batch["root_rot"].transpose(1, 2), torch.eye(3).expand(3, 3, 3),
                          atol=1e-5)


@pytest.fixture(scope="module")
def full_bench(body):
    """Every part on the CPU with batches of 2, one timed call each."""
    from vqhps.config import load_config

    cfg = load_config("smoke", **{"vqhps.batch_size": 2, "vqvae.batch_size": 2, "data.crop_size": 32,
                                  "runtime.progress": False})
    settings = BenchSettings.for_device(CPU, inference_batch=2, warmup=0, iters=1, render_images=2, vqvae_batch=2)
    rows, summary = run_bench(cfg, body, CPU, settings)
    return cfg, rows, summary


def test_every_part_gives_its_rows_with_ratios_from_the_same_run(full_bench, tmp_path):
    cfg, rows, summary = full_bench
    by_what = {r["what"]: r for r in rows}
    assert set(by_what) >= {"benchmark_rendering_one_process", "backbones_x2_inference", "backbones_x2_train_step",
                            "vqhps_inference", "vqhps_train_step", "vqhps_train_step_with_input", "data_pipeline",
                            "mesh_vqvae_encode_decode", "mesh_vqvae_train_step"}
    for r in rows:
        assert r["items_per_s"] > 0 and r["ms_per_batch"] > 0
        assert r["torch"] == torch.__version__ and r["device"].startswith("CPU")
        assert set(COLUMNS) <= set(r)
        assert r["items_per_s"] == pytest.approx(1000 * r["batch"] / r["ms_per_batch"])
        base = CEILING_OF.get(r["kind"])
        if base is None:
            assert r["ratio_to_ceiling"] is None
        else:
            assert r["ratio_to_ceiling"] == pytest.approx(r["items_per_s"] / by_what[base]["items_per_s"])
    assert by_what["vqhps_inference"]["batch"] == 2 and by_what["vqhps_train_step"]["batch"] == cfg.vqhps.batch_size
    assert not any(r["compiled"] for r in rows) and by_what["vqhps_train_step"]["precision"] == "fp32"
    # on the CPU no step replays a CUDA graph; only training-step rows say so
    assert all(r["cuda_graph_train_step"] is (False if "train_step" in r["what"] else None) for r in rows)
    assert summary["inference_ratio_to_ceiling"] == by_what["vqhps_inference"]["ratio_to_ceiling"]
    assert summary["training_ratio_to_ceiling"] == by_what["vqhps_train_step_with_input"]["ratio_to_ceiling"]
    path = write_bench(rows, tmp_path, "bench", extra=summary)
    payload = json.loads(path.read_text())
    assert payload["inference_ratio_to_ceiling"] > 0 and payload["training_ratio_to_ceiling"] > 0
    assert len(payload["rows"]) == len(rows)
    header = (tmp_path / "bench.csv").read_text().splitlines()[0].split(",")
    assert header[:len(COLUMNS)] == list(COLUMNS)


def test_only_runs_the_named_parts(tmp_path, capsys):
    from vqhps.cli import main

    code = main(["bench", "--profile", "smoke", "--only", "data", "ceiling", "--batch", "2", "--warmup", "0",
                 "--iters", "1", "--compile", "--set", "vqhps.batch_size=2", "--set", "runtime.progress=false",
                 "--set", f"paths.results={tmp_path}"])
    assert code == 0, capsys.readouterr().err
    payload = json.loads((tmp_path / "smoke" / "bench" / "bench.json").read_text())
    rows = {r["what"]: r for r in payload["rows"]}
    assert set(rows) == {"backbones_x2_inference", "backbones_x2_train_step", "data_pipeline"}
    assert payload["settings"]["parts"] == ["data", "ceiling"] and payload["inference_ratio_to_ceiling"] is None
    assert rows["data_pipeline"]["ratio_to_ceiling"] == pytest.approx(
        rows["data_pipeline"]["items_per_s"] / rows["backbones_x2_train_step"]["items_per_s"])
    assert not rows["backbones_x2_train_step"]["compiled"]  # compilation applies on CUDA only
    assert "written:" in capsys.readouterr().out


def test_ddp_scaling_on_two_cpu_processes(tmp_path, monkeypatch):
    from vqhps.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code = main(["bench-ddp", "--profile", "smoke", "--nproc", "2", "--batch", "2", "--warmup", "0", "--iters", "1",
                 "--set", "data.crop_size=32", "--set", "runtime.progress=false", "--set", f"paths.results={tmp_path}"])
    assert code == 0
    payload = json.loads((tmp_path / "smoke" / "bench" / "bench_ddp.json").read_text())
    one, two = payload["rows"]
    assert (one["world"], one["batch"], two["world"], two["batch"]) == (1, 2, 2, 4)  # same batch per process
    assert one["items_per_s"] > 0 and two["items_per_s"] > 0 and two["backend"] == "gloo"
    assert one["speedup"] == 1.0 and payload["speedup"] == pytest.approx(two["items_per_s"] / one["items_per_s"])
    assert payload["speedup"] > 0 and math.isclose(payload["scaling_efficiency"], payload["speedup"] / 2)
    assert (tmp_path / "smoke" / "bench" / "bench_ddp.csv").is_file()
