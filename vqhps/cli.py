"""Command line: ``python -m vqhps <command>``. Each command is a thin call into the library.

The training commands run unchanged under torchrun (``torchrun --nproc_per_node=N -m vqhps train ...``):
each joins the process group first; caches on disk are filled by rank 0 before the others read them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: parts of `python -m vqhps bench` (vqhps.bench.PARTS; repeated here so --help needs no torch)
_BENCH_PARTS = ("rendering", "ceiling", "vqhps", "data", "mesh_vqvae")


def _config(args):
    from .config import load_config, parse_overrides

    return load_config(args.profile, **parse_overrides(getattr(args, "set", None)))


def _join(cfg):
    """Join torchrun's process group (no-op for one process): NCCL when the config trains on CUDA,
    gloo when it trains on the CPU (the smoke profile, even on a GPU machine)."""
    import torch

    from .distributed import setup_distributed

    device = cfg.runtime.device
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return setup_distributed("nccl" if on_gpu else "gloo")


#: commands that read the study's data: with ``data.source=paper`` they check the paper's files first
_DATA_COMMANDS = ("setup-body", "prepare", "train-vae", "evaluate-vae", "sweep-vae", "train", "evaluate", "bench",
                  "bench-ddp", "reproduce")


def _require_paper_files(args) -> None:
    """With ``data.source=paper``, a command that reads data first checks every paper file and raises
    one error listing all problems: before torch is imported and before anything is written."""
    if args.command not in _DATA_COMMANDS:
        return
    cfg = _config(args)
    if cfg.data.source == "paper":
        from .data.paper_files import require_paper_files

        require_paper_files(cfg)


# ----------------------------------------------------------------------------- commands
def _check_data(args) -> int:
    """The paper's files (SMPL, AMASS, 3DPW) checked, whatever ``data.source`` says; exit 2 on problems."""
    from .data.paper_files import require_paper_files, summary_line

    cfg = _config(args)
    report = require_paper_files(cfg)
    print(summary_line(cfg, report))
    if cfg.data.source != "paper":
        print("note: data.source is synthetic; runs use these files with --set data.source=paper")
    return 0


def _setup_body(args) -> int:
    from .body_setup import setup_body

    cfg = _config(args)
    body = setup_body(cfg)
    print(f"body model ready: {body.identifier()} ({body.n_vertices} vertices)")
    return 0


def _prepare(args) -> int:
    from .body_setup import setup_body
    from .data import source
    from .distributed import barrier, current

    cfg = _config(args)
    _join(cfg)
    if current().is_main:  # rendering / cropping is not split over ranks: the others wait
        setup_body(cfg)  # the renderers load the body model with its fitted joint regressors
        paths = source.prepare(cfg, progress=cfg.runtime.progress)
        print(f"{cfg.data.source} data ready under {cfg.data_dir} ({', '.join(paths)})")
    barrier()
    return 0


def _train_vae(args) -> int:
    from .body_setup import setup_body
    from .data import source
    from .distributed import rank0_first
    from .vqvae_training import build_mesh_vqvae, train_stage

    cfg = _config(args)
    _join(cfg)
    with rank0_first():  # fills the body-model and hierarchy caches once
        body = setup_body(cfg)
        build_mesh_vqvae(cfg, body)
    stages = ("pretrain", "finetune") if args.stage == "both" else (args.stage,)
    for stage in stages:
        meshes = None
        if stage == "finetune":
            meshes = source.split_meshes(cfg, "train")  # poses and shapes; no rendering needed
        _, result = train_stage(cfg, body, stage, stop_after=args.stop_after, train_meshes=meshes)
        _report(result)
    return 0


def _evaluate_vae(args) -> int:
    """Reconstruction error (mm) of the trained Mesh-VQ-VAE stages, from the nearest codes and from the
    continuous latent, on the test and validation splits (and corpus training meshes)."""
    import pandas as pd

    from .body_setup import setup_body
    from .figures import save_table
    from .train import device_of
    from .vqvae_training import checkpoint_dir, evaluation_meshes, load_mesh_vqvae, reconstruction_summary

    cfg = _config(args)
    if args.corpus_meshes < 0:
        raise ValueError(f"--corpus-meshes must be 0 (the splits only) or a number of meshes, got {args.corpus_meshes}")
    for stage in args.stages:
        path = checkpoint_dir(cfg) / f"mesh_vqvae_{stage}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}; train it with "
                                    f"`python -m vqhps train-vae --profile {cfg.profile} --stage {stage}`")
    device = device_of(cfg.runtime)
    body = setup_body(cfg).to(device)
    sets = evaluation_meshes(cfg, body, args.corpus_meshes, splits=("test", "val"))
    rows = []
    for stage in args.stages:
        model = load_mesh_vqvae(cfg, body, stage, device)
        for name, meshes in sets.items():
            summary = reconstruction_summary(model, meshes, body.regressor17).summary
            rows.append({"stage": stage, "meshes": name, "n_meshes": len(meshes), **summary})
    table = pd.DataFrame(rows)
    save_table(table, cfg.results_dir, "vae_reconstruction")
    print(table.round(2).to_string(index=False))
    print(f"written: {cfg.results_dir / 'tables' / 'vae_reconstruction.csv'}")
    return 0


def _with_compile(args) -> None:
    """``--compile/--no-compile`` as a ``--set runtime.compile=...`` override (passed on to workers)."""
    if getattr(args, "compile", None) is not None:
        args.set = [*args.set, f"runtime.compile={str(args.compile).lower()}"]


def _bench(args) -> int:
    from .bench import BenchSettings, format_rows, run_bench, write_bench
    from .body_setup import setup_body
    from .train import device_of

    _with_compile(args)
    cfg = _config(args)
    device = device_of(cfg.runtime)
    settings = BenchSettings.for_device(device, parts=tuple(args.only) if args.only else None,
                                        inference_batch=args.batch, warmup=args.warmup, iters=args.iters)
    body = setup_body(cfg)
    rows, summary = run_bench(cfg, body, device, settings)
    path = write_bench(rows, cfg.results_dir / "bench", "bench", extra=summary)
    print(format_rows(rows))
    for key in ("inference_ratio_to_ceiling", "training_ratio_to_ceiling"):
        if summary[key] is not None:
            print(f"{key}: {summary[key]:.3f}")
    print(f"written: {path}")
    return 0


def _write_report(args) -> int:
    from .config import PROJECT_ROOT
    from .report import refresh_readme, write_report

    cfg = _config(args)
    has_tables = (cfg.results_dir / "tables").is_dir()
    if not has_tables and not args.readme:
        raise FileNotFoundError(f"{cfg.results_dir / 'tables'}: no tables to report; run `make reproduce "
                                f"PROFILE={cfg.profile}` first")
    if has_tables:
        print(f"written: {write_report(cfg.results_dir)}")
    if args.readme:  # without tables the block says that no run is committed yet
        changed = refresh_readme(PROJECT_ROOT / "README.md", cfg.results_dir)
        print(f"README.md results block {'rewritten' if changed else 'already current'}")
    return 0


def _bench_ddp(args) -> int:
    from .bench import format_rows, write_bench
    from .bench_ddp import run_scaling, scaling_worker

    _with_compile(args)
    cfg = _config(args)
    cuda = cfg.runtime.device.startswith("cuda") or (cfg.runtime.device == "auto" and _cuda_available())
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    iters = args.iters if args.iters is not None else (10 if cuda else 2)
    batch = args.batch or cfg.vqhps.batch_size
    if args.worker_out is not None:  # one process of the torchrun job that run_scaling launches
        _join(cfg)
        scaling_worker(cfg, batch, warmup, iters, args.worker_out)
        return 0
    rows, summary = run_scaling(args.profile, args.set, args.nproc, batch, warmup, iters)
    path = write_bench(rows, cfg.results_dir / "bench", "bench_ddp", extra=summary)
    print(format_rows(rows))
    print(f"speed-up on {args.nproc} processes: {summary['speedup']:.2f}x (global batch "
          f"{batch} -> {batch * args.nproc}); written: {path}")
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


#: --name values of `train` that train a Table 1 baseline (vqhps.baseline_training.BASELINES)
BASELINE_RUNS = ("hmr", "cliff", "fastmetro")


def _train_baseline(args) -> int:
    from .baseline_training import train_baseline
    from .body_setup import setup_body
    from .distributed import rank0_first
    from .models.fastmetro import hierarchy_of

    cfg = _config(args)
    _join(cfg)
    with rank0_first():  # fills the body-model (and FastMETRO's hierarchy) caches once
        body = setup_body(cfg)
        if args.name == "fastmetro":
            hierarchy_of(cfg, body)
    _, result = train_baseline(cfg, body, args.name, stop_after=args.stop_after, checkpoint_name=args.checkpoint_name)
    _report(result)
    return 0


def _train(args) -> int:
    if args.name in BASELINE_RUNS:  # HMR, CLIFF or FastMETRO with VQ-HPS's data and optimiser
        return _train_baseline(args)
    try:  # first: the ablations import it too
        from .hps_training import train_vqhps
    except ModuleNotFoundError as err:
        if err.name != "vqhps.hps_training":
            raise
        raise RuntimeError("VQ-HPS training (vqhps/hps_training.py, train_vqhps) is not available in this "
                           "checkout; train the Mesh-VQ-VAE with `python -m vqhps train-vae` meanwhile") from None
    from .ablations import RUNS

    if args.name in RUNS:  # a Table 2 ablation (or its reference): own overrides and Mesh-VQ-VAE stage
        return _train_ablation(args)
    from .body_setup import setup_body
    from .distributed import rank0_first
    from .train import device_of
    from .vqvae_training import load_mesh_vqvae

    cfg = _config(args)
    _join(cfg)
    with rank0_first():
        body = setup_body(cfg)
        vqvae = load_mesh_vqvae(cfg, body, "finetune", device_of(cfg.runtime))
    _, result = train_vqhps(cfg, body, vqvae, name=args.name, stop_after=args.stop_after)
    _report(result)
    return 0


def _train_ablation(args) -> int:
    from .ablations import ablation, train_ablation
    from .body_setup import setup_body
    from .distributed import rank0_first
    from .train import device_of
    from .vqvae_training import load_mesh_vqvae

    cfg = _config(args)
    _join(cfg)
    stage = ablation(args.name).vqvae_stage
    with rank0_first():
        body = setup_body(cfg)
        vqvae = load_mesh_vqvae(cfg, body, stage, device_of(cfg.runtime))
    _, result = train_ablation(cfg, body, args.name, stop_after=args.stop_after, vqvaes={stage: vqvae})
    _report(result)
    return 0


def _report(result) -> None:
    """One line per finished training stage, from rank 0."""
    from .distributed import current

    if not current().is_main or result is None:
        return
    last = result.history[-1] if getattr(result, "history", None) else {}
    loss = f", loss {last['loss']:.4g}" if "loss" in last else ""
    wall = getattr(result, "total_wall_s", result.wall_s)
    print(f"{result.checkpoint.stem}: step {last.get('step', result.resumed_from):.0f}{loss}, {wall:.0f} s of "
          f"training; checkpoint {result.checkpoint}, log {result.log}", flush=True)


def _evaluate(args) -> int:
    """Metrics of a trained checkpoint on a split: a VQ-HPS (with the Mesh-VQ-VAE stage it was trained
    with) or a Table 1 baseline, as its notebook evaluates it."""
    from .baseline_training import baseline_predictor, load_baseline
    from .body_setup import setup_body
    from .checkpoint import read_meta
    from .data import source
    from .figures import save_table
    from .hps_training import evaluate_split, load_vqhps, vqhps_predictor
    from .train import device_of
    from .vqvae_training import checkpoint_dir, load_mesh_vqvae

    cfg = _config(args)
    path = checkpoint_dir(cfg) / f"{args.name}.pt"  # VQ-HPS runs and baselines share the folder
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; train it with "
                                f"`python -m vqhps train --profile {cfg.profile} --name {args.name}`")
    device = device_of(cfg.runtime)
    body = setup_body(cfg).to(device)
    meta = read_meta(path) or {}
    if meta.get("kind") == "baseline":
        model_fn = baseline_predictor()(load_baseline(path, cfg, body, device))
    else:
        vqvae = load_mesh_vqvae(cfg, body, meta.get("vqvae_stage", "finetune"), device)
        model_fn = vqhps_predictor(vqvae, body)(load_vqhps(path, cfg, body, vqvae, device))
    arrays = source.load_split(cfg, args.split)
    _, summary = evaluate_split(model_fn, arrays, body, cfg, device, progress=cfg.runtime.progress)
    precision = "bf16" if cfg.runtime.amp and device.type == "cuda" else "fp32"
    table = summary.assign(checkpoint=path.name, split=args.split, precision=precision)
    stem = f"eval_{args.name}_{args.split}_{precision}"
    save_table(table, cfg.results_dir, stem)
    print(table.round(2).to_string())
    print(f"written: {cfg.results_dir / 'tables' / (stem + '.csv')}")
    return 0


def _demo(args) -> int:
    from .demo import expand_inputs, load_predictor, run_demo

    cfg = _config(args)
    if args.samples < 0:
        raise ValueError(f"--samples must be 0 (off) or a positive number of token samples, got {args.samples}")
    files = expand_inputs(args.inputs)  # an input without images fails here, before anything is written
    predictor = load_predictor(args.checkpoint, cfg)
    if args.bbox is None:
        print("no --bbox: using the whole image (a square around its centre, the shorter side padded)")
    report = run_demo(files, predictor, args.out, bbox=args.bbox, samples=args.samples)
    if report["failed"] and not report["ok"]:
        raise ValueError("; ".join(reason for _, reason in report["failed"]))
    for path, reason in report["failed"]:
        print(f"skipped {path}: {reason}")
    print(f"{len(report['ok'])} image(s) done, {len(report['failed'])} skipped; outputs in {args.out}")
    return 0


def _sweep_vae(args) -> int:
    """Mesh-VQ-VAE trainings over a grid of settings, repeated; per-run and per-setting tables."""
    from .sweep import plan, run_sweep, write_tables

    cfg = _config(args)
    runs = plan(args.grid, args.repeats)
    if args.per_gpu < 1:
        raise ValueError(f"--per-gpu must be at least 1, got {args.per_gpu}")
    gpus = args.gpus
    if gpus is None:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    devices = [g for g in gpus for _ in range(args.per_gpu)] or [None] * args.per_gpu
    out = Path(args.out) if args.out else cfg.results_dir / "sweeps" / "mesh_vqvae"
    print(f"{len(runs)} runs ({len(runs) // args.repeats} settings x {args.repeats} repeats), "
          f"{len(devices)} at a time, under {out}")
    status = run_sweep(runs, out, cfg.profile, cfg.seed, args.set, devices, progress=cfg.runtime.progress,
                       pretrained=args.pretrained)
    per_run, summary = write_tables(runs, out, cfg.profile, cfg.seed)
    if len(summary):
        cols = ["setting", "runs", "finetune_val_PVE_mm_mean", "finetune_PVE_mm_mean", "finetune_PVE_mm_std",
                "finetune_train_s_mean"]
        print(summary[cols].round(2).to_string(index=False))
    print(f"written: {out / 'sweep_runs.csv'}, {out / 'sweep_summary.csv'}")
    failed = {r.name: s for r, s in status.items() if s.startswith("failed")}
    for name, s in failed.items():
        print(f"error: run {name} {s}", file=sys.stderr)
    return 1 if failed else 0


def _reproduce(args) -> int:
    from .reproduce import reproduce

    return reproduce(args.profile, nproc=args.nproc, only=args.only, overlap=args.overlap, runner=args.runner,
                     overrides=args.set, check_files=False)  # main() checked the paper's files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqhps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--profile", default="smoke", help="smoke (2-core CPU) or full (GPU)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                       help="override a config field, e.g. --set vqvae.lr=1e-3 (repeatable)")
        p.set_defaults(func=func)
        return p

    command("check-data", _check_data, "check the paper's data files (SMPL, AMASS, 3DPW; README, 'Run on the "
            "paper's data'): prints 'all paper files present' or every problem with its fix (exit 2)")
    command("setup-body", _setup_body, "build the body-model cache and fit its joint regressors")
    command("prepare", _prepare, "render the synthetic benchmark or crop 3DPW and read AMASS (data.source; cached)")

    p = command("train-vae", _train_vae, "train the Mesh-VQ-VAE (pre-train on the corpus, fine-tune on the benchmark)")
    p.add_argument("--stage", choices=("pretrain", "finetune", "both"), default="both")
    p.add_argument("--stop-after", type=int, default=None, help="stop each stage after this many steps (resumable)")

    p = command("evaluate-vae", _evaluate_vae, "reconstruction error (mm) of the trained Mesh-VQ-VAE stages on the "
                "test and validation splits, from the nearest codes and from the continuous latent; table under "
                "results/<profile>/tables/vae_reconstruction.csv")
    p.add_argument("--stages", nargs="+", choices=("pretrain", "finetune"), default=["pretrain", "finetune"])
    p.add_argument("--corpus-meshes", type=int, default=0, metavar="N",
                   help="also measure the first N corpus training meshes (default 0: the two splits only)")

    p = command("sweep-vae", _sweep_vae, "train and evaluate the Mesh-VQ-VAE for every combination of --grid values, "
                "--repeats times each (seeds cfg.seed + repeat), spread over GPUs; tables sweep_runs.csv and "
                "sweep_summary.csv (mean and spread per setting); --set applies to every run")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values, e.g. --grid vqvae.readout_hidden=1024,2048 (repeatable: "
                        "the product of all; none: the defaults alone)")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting (default 2)")
    p.add_argument("--gpus", nargs="*", default=None, metavar="ID",
                   help="CUDA device ids to spread the runs over (default: every visible GPU; none: the CPU)")
    p.add_argument("--per-gpu", type=int, default=1, help="runs sharing one GPU at a time (default 1)")
    p.add_argument("--out", default=None, help="sweep folder (default results/<profile>/sweeps/mesh_vqvae); "
                   "runs already evaluated there are skipped")
    p.add_argument("--pretrained", type=Path, default=None, metavar="PT",
                   help="a finished mesh_vqvae_pretrain.pt that every run fine-tunes instead of pre-training its "
                        "own (for grids over fine-tuning settings; the architecture must match)")

    p = command("train", _train, "train VQ-HPS on the benchmark with the fine-tuned Mesh-VQ-VAE")
    p.add_argument("--name", default="vqhps", help="run name: checkpoint and log file stem (a Table 2 ablation's "
                   "name, e.g. vqhps_3d_loss, vqhps_no_reprojection, vqhps_pretrain_vqvae, trains that ablation; "
                   "hmr, cliff or fastmetro trains that Table 1 baseline with VQ-HPS's recipe)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resumable)")
    p.add_argument("--checkpoint-name", default=None, metavar="STEM",
                   help="for a baseline: write STEM.pt instead of <name>.pt (e.g. a second run of fastmetro with "
                        "--set runtime.amp=false, to compare precisions)")

    p = command("evaluate", _evaluate, "metrics (mm) of a trained VQ-HPS or baseline checkpoint on the test split, "
                "in the precision of runtime.amp; table under results/<profile>/tables/eval_<name>_<split>_<precision>.csv")
    p.add_argument("--name", default="vqhps", help="checkpoint stem under results/<profile>/checkpoints/ "
                   "(vqhps, vqhps_rot, a Table 2 run, hmr, cliff, fastmetro, or any run trained with `train`)")
    p.add_argument("--split", choices=("val", "test"), default="test")

    p = command("bench", _bench, "throughput of VQ-HPS against its two-backbone ceiling, of its input pipeline, "
                "the Mesh-VQ-VAE and rendering; JSON + CSV under results/<profile>/bench/")
    p.add_argument("--only", nargs="+", metavar="PART", choices=_BENCH_PARTS,
                   help=f"parts to run (default all): {' '.join(_BENCH_PARTS)}")
    p.add_argument("--batch", type=int, default=None, help="inference batch (default 256 on a GPU, 8 on the CPU); "
                   "training uses vqhps.batch_size")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before each measurement")
    p.add_argument("--iters", type=int, default=None, help="timed calls per measurement (the median is kept)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="override runtime.compile (compiled backbones on CUDA)")

    p = command("bench-ddp", _bench_ddp, "VQ-HPS training images/s on 1 and N processes (DDP) with the same "
                "per-process batch; JSON + CSV under results/<profile>/bench/")
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs) to compare with one")
    p.add_argument("--batch", type=int, default=None, help="images per process and step (default vqhps.batch_size)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 on a GPU, 1 on the CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 10 on a GPU, 2 on the CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="override runtime.compile (compiled backbones on CUDA)")
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)

    p = command("demo", _demo, "run a trained VQ-HPS on images: files, folders and globs; for each, the mesh "
                "(OBJ, GLB), its overlay on the whole photo, a side view and a JSON record")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders of images, or quoted glob patterns such as 'photos/*.jpg' (each image "
                        "once; an input that matches no image is an error and nothing is written)")
    p.add_argument("--checkpoint", required=True, type=Path, help="VQ-HPS checkpoint (python -m vqhps train)")
    p.add_argument("--bbox", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), default=None,
                   help="person box in pixels, for every input (default: the whole image)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--samples", type=int, default=0, metavar="K",
                   help="also sample K token sequences from the logits and write their per-vertex spread (mm) "
                        "to the JSON and a spread-coloured overlay and mesh (default 0: off; temperature and "
                        "top-k: --set uncertainty.temperature=T --set uncertainty.top_k=N)")

    p = command("report", _write_report, "write results/<profile>/REPORT.md from the run's tables and manifest; "
                "--readme also refreshes README.md's results block")
    p.add_argument("--readme", action="store_true", help="rewrite the results block of README.md too")

    p = command("reproduce", _reproduce, "run notebooks/0*.ipynb in order with papermill")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for the training notebooks")
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 00 01")
    p.add_argument("--overlap", action="store_true",
                   help="one GPU: run the trainings (Mesh-VQ-VAE, baselines, VQ-HPS, Table 2) as background jobs "
                        "beside the notebooks, each started as soon as its inputs exist")
    p.add_argument("--runner", choices=("papermill", "inline"), default="papermill",
                   help="papermill, or inline: the code cells in this process (no Jupyter kernel needed); "
                        "executed copies go to results/<profile>/notebooks/ either way")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _require_paper_files(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .distributed import teardown_distributed  # after parsing: --help needs no torch

    ok = False
    try:
        code = args.func(args)
        ok = True
        return code
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        try:
            teardown_distributed(wait=ok)
        except Exception:  # noqa: BLE001 - a peer that already failed must not hide the real error
            pass
