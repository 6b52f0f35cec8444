"""Training and evaluation of Table 1's baselines (HMR, CLIFF, FastMETRO-style) with exactly VQ-HPS's
recipe: the same benchmark splits, backbone settings, augmentation, batch size, AdamW with its step decay and
validation (``hps_training.fit`` over ``cfg.vqhps``); only the number of epochs may be set apart
(``cfg.baselines.epochs``, default: VQ-HPS's). Checkpoints are named after the baseline and resume.

``baseline_predictor`` turns a trained baseline into a ``model_fn`` for ``hps_training.evaluate_split``:
its vertices are oriented in the full frame's camera (HMR and FastMETRO, which see the crop only,
predict in the crop's own camera and are turned by ``hps_training.camera_frame_prediction``) and
centred on their vertex mean, the frame of VQ-HPS's ``R̂ V̂c``. ``table1_predictors`` gathers every
method of Table 1 (the baselines, VQ-HPS and VQ-HPS-rot from notebook 03's checkpoints, and two
references: the Mesh-VQ-VAE floor and the mean body, the "learned nothing" line every trained model
must beat) and ``table1`` puts the paper's numbers beside the measured ones, with the rotation
columns (mean, median, flip share).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from . import hps_training as hps
from .checkpoint import CheckpointMismatch, check_meta, load_checkpoint, read_meta
from .config import VQHPSConfig
from .data import source
from .data.datasets import rotation_target
from .geometry import rotation_angle_deg
from .metrics import METRIC_COLUMNS
from .models.body_params import oriented_targets
from .models.cliff import CLIFF, batch_bbox_info
from .models.fastmetro import FastMETRO
from .models.hmr import HMR
from .paper import with_paper_columns
from .train import TrainResult, device_of
from .vqvae_training import checkpoint_dir

#: checkpoint / CLI name -> model class
BASELINES: dict[str, type[torch.nn.Module]] = {"hmr": HMR, "cliff": CLIFF, "fastmetro": FastMETRO}
#: checkpoint name -> the method's name in our tables
DISPLAY_NAMES = {"hmr": "HMR", "cliff": "CLIFF", "fastmetro": "FastMETRO"}
#: Table 1's reference rows (no paper value): the best VQ-HPS could do, and a model that ignores the image
FLOOR, MEAN_BODY = "Mesh-VQ-VAE floor", "mean body"
REFERENCE_METHODS = (FLOOR, MEAN_BODY)
#: our method names -> the rows of the paper's Table 1 (the references have no paper row)
TABLE1_PAPER_ROWS = {"HMR": "HMR", "CLIFF": "Cliff", "FastMETRO": "FastMetro", "VQ-HPS": "VQ-HPS (ours)",
                     "VQ-HPS-rot": "VQ-HPS-rot (ours)"}
#: VQHPSConfig fields whose change makes a baseline checkpoint another run (the epochs may be raised)
RECIPE_FIELDS = ("batch_size", "lr", "weight_decay", "lr_step_epochs", "lr_gamma", "dropout", "backbone",
                 "backbone_weights", "backbone_lr_scale", "warmup_steps")


def _check_name(name: str) -> None:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")


def baseline_config(cfg, **overrides) -> VQHPSConfig:
    """The baselines' training settings: ``cfg.vqhps`` with ``cfg.baselines.epochs`` (when set) and
    field ``overrides`` applied (ValueError naming unknown fields)."""
    if cfg.baselines.epochs is not None:
        overrides = {"epochs": int(cfg.baselines.epochs), **overrides}
    return hps.vqhps_config(cfg, **overrides)


def build_baseline(name: str, cfg, body, hcfg: VQHPSConfig | None = None) -> torch.nn.Module:
    """A fresh baseline ``name`` (hmr, cliff, fastmetro) for this body; its backbone, dropout and (for
    FastMETRO) transformer sizes come from ``hcfg`` (default ``cfg.vqhps``)."""
    _check_name(name)
    if hcfg is not None:
        cfg = dataclasses.replace(cfg, vqhps=hcfg)
    return BASELINES[name](cfg, body)


def _forward(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Every baseline takes (images, bbox_info); HMR and FastMETRO ignore the box."""
    return model(batch["image"], batch_bbox_info(batch))


def model_frame(model: torch.nn.Module) -> str:
    """The camera frame a (possibly DDP-wrapped) baseline predicts in: its ``frame`` ("crop" for HMR
    and FastMETRO, "camera" for CLIFF); "camera" for a model without one."""
    return getattr(getattr(model, "module", model), "frame", "camera")


def baseline_loss_fn() -> Callable[[torch.nn.Module, dict, int], dict[str, torch.Tensor]]:
    """``loss_fn(model, batch, step)`` of any baseline: its own ``loss`` (the model's terms, logged
    detached) plus the training PVE in mm (``pve_mm``, oriented meshes, same for every method) and,
    for the parametric ones, the rotation error in degrees, both in the model's own ``frame`` (the
    crop's camera for HMR and FastMETRO, the full frame's for CLIFF). ``model`` may be DDP-wrapped."""

    def loss_fn(model, batch: dict, step: int) -> dict[str, torch.Tensor]:
        net, frame = getattr(model, "module", model), model_frame(model)
        out = _forward(model, batch)
        losses = net.loss(out, batch)
        result = {"loss": losses.pop("loss"), **{k: v.detach() for k, v in losses.items()}}
        with torch.no_grad(), torch.autocast(out["vertices"].device.type, enabled=False):
            gt = oriented_targets(batch, frame)
            result["pve_mm"] = 1000.0 * (out["vertices"].float() - gt).norm(dim=-1).mean()
            if "rotmat" in out:
                R_gt = rotation_target(batch, frame)
                result["rot_err_deg"] = rotation_angle_deg(out["rotmat"].float(), R_gt).mean()
        return result

    return loss_fn


def baseline_predictor() -> Callable[[torch.nn.Module], hps.ModelFn]:
    """model -> model_fn for ``evaluate_split``: dict(vertices (B, V, 3) oriented in the full frame's
    camera and centred, as VQ-HPS's, cam (B, 3) the crop's weak-perspective camera [s, tx, ty], and for
    HMR and CLIFF rotmat and canonical), fp32; crop-frame models add ``vertices_crop`` (what ``cam``
    projects) and ``rotmat_crop`` (``hps_training.camera_frame_prediction``)."""

    def wrap(model: torch.nn.Module) -> hps.ModelFn:
        frame = model_frame(model)

        def model_fn(batch: dict) -> dict[str, torch.Tensor]:
            out = _forward(model, batch)
            keep = ("vertices", "cam", "rotmat", "canonical")
            pred = {k: out[k].float() for k in keep if k in out}
            return hps.camera_frame_prediction(pred, batch) if frame == "crop" else pred

        return model_fn

    return wrap


def baseline_meta(name: str, hcfg: VQHPSConfig, model: torch.nn.Module, body, augment: bool) -> dict:
    """What a baseline checkpoint records. To be loaded it must match the body and the model's
    architecture (FastMETRO's also names the hierarchy); to be resumed, also the ``recipe``."""
    config = asdict(hcfg)
    return {"kind": "baseline", "baseline": name, "config": config, "body_id": body.identifier(),
            "architecture": model.architecture(),
            "recipe": {**{k: config[k] for k in RECIPE_FIELDS}, "augment": bool(augment)}}


def _refuse_foreign(path: Path, meta: dict) -> None:
    """Before resuming, check an existing checkpoint against the run (read lazily, as VQ-HPS's)."""
    found = read_meta(path)
    if found is None:
        return
    try:
        check_meta(found, {k: meta[k] for k in ("kind", "baseline", "body_id", "architecture", "recipe")}, path)
    except CheckpointMismatch as err:
        raise CheckpointMismatch(f"{err}: this run would resume a checkpoint trained with other settings; "
                                 f"delete {path} (and its .csv log) to retrain, or pass another checkpoint_name"
                                 ) from None


def baseline_checkpoint(cfg, name: str) -> Path:
    """Where ``train_baseline(cfg, body, name)`` writes its checkpoint."""
    return checkpoint_dir(cfg) / f"{name}.pt"


def train_baseline(cfg, body, name: str, stop_after: int | None = None, *, checkpoint_name: str | None = None,
                   train_arrays: dict | None = None, val_arrays: dict | None = None, augment: bool = True,
                   validate: bool = True, **overrides) -> tuple[torch.nn.Module, TrainResult]:
    """Train baseline ``name`` (hmr, cliff, fastmetro) and return (model in eval mode, TrainResult).

    The recipe is VQ-HPS's (``train_vqhps``): the profile's train/val splits (or the given arrays),
    the paper's augmentation, ``cfg.vqhps``'s backbone settings, batch size and AdamW schedule,
    validation once per epoch, seeded from ``cfg.seed``; ``baseline_config`` sets the epochs and
    applies ``overrides``. The checkpoint ``<checkpoint_name or name>.pt`` resumes when present (a
    finished run returns at once with its weights); one made with other settings is refused."""
    _check_name(name)
    hcfg = baseline_config(cfg, **overrides)
    device = device_of(cfg.runtime)
    body = body.to(device)
    torch.manual_seed(cfg.seed)
    model = build_baseline(name, cfg, body, hcfg)
    run = checkpoint_name or name
    meta = baseline_meta(name, hcfg, model, body, augment)
    _refuse_foreign(baseline_checkpoint(cfg, run), meta)
    model = hps.prepare_model(model, cfg, device, compiled=("backbone",))
    train_arrays = source.load_split(cfg, "train") if train_arrays is None else train_arrays
    if validate and val_arrays is None:
        val_arrays = source.load_split(cfg, "val")
    result = hps.fit(cfg, run, model, baseline_loss_fn(), hps.Schedule.of(hcfg), train_arrays, body, meta,
                     augment=augment, stop_after=stop_after, predictor=baseline_predictor() if validate else None,
                     val_arrays=val_arrays if validate else None)
    return model.eval(), result


def load_baseline(path: str | Path, cfg, body, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A trained baseline in eval mode, rebuilt from the settings its checkpoint records. Refuses
    (CheckpointMismatch, naming the field) a file that is not a baseline checkpoint or was made for
    another body model, hierarchy, architecture or backbone than ``cfg.vqhps``'s."""
    path = Path(path)
    state = load_checkpoint(path)
    found = state.get("meta", {})
    name, stored = found.get("baseline"), found.get("config")
    if found.get("kind") != "baseline" or name not in BASELINES or not isinstance(stored, dict):
        raise CheckpointMismatch(f"checkpoint {path}: kind is {found.get('kind', '<missing>')!r} (baseline "
                                 f"{name!r}), not a baseline checkpoint (written by train_baseline for one of "
                                 f"{sorted(BASELINES)})")
    hps.check_backbone(stored, cfg.vqhps, path)
    known = {f.name for f in dataclasses.fields(VQHPSConfig)}
    hcfg = dataclasses.replace(cfg.vqhps, **{k: v for k, v in stored.items() if k in known})
    if found.get("body_id") != body.identifier():
        raise CheckpointMismatch(f"checkpoint {path}: body_id is {found.get('body_id')!r} but "
                                 f"{body.identifier()!r} was expected; this {name} was trained on another body "
                                 f"model: retrain it with `python -m vqhps train --name {name}` or load it with "
                                 f"that body")
    model = build_baseline(name, cfg, body, hcfg)
    try:
        check_meta(found, {"architecture": model.architecture()}, path)
    except CheckpointMismatch as err:
        raise CheckpointMismatch(f"{err} (the {name} this configuration builds differs from the checkpoint's; "
                                 f"retrain it or use the matching configuration)") from None
    model.load_state_dict(state["model"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------- Table 1
def table1_predictors(cfg, body, vqvae, baselines: dict[str, torch.nn.Module],
                      device: torch.device | str = "cpu", train_arrays: dict | None = None) -> dict[str, hps.ModelFn]:
    """Table 1's methods as {name: model_fn}, in the paper's order: the trained ``baselines``
    ({checkpoint name: model}), VQ-HPS and VQ-HPS-rot loaded from notebook 03's checkpoints, then the
    references ``REFERENCE_METHODS``: the Mesh-VQ-VAE floor and the mean body (``hps.mean_body_predictor``
    of ``train_arrays``, default the profile's train split: pose, shape and root_rot only).
    FileNotFoundError naming the command that writes a missing checkpoint."""
    predict_baseline = baseline_predictor()
    methods = {DISPLAY_NAMES[n]: predict_baseline(m.eval()) for n, m in baselines.items()}
    predict_vqhps = hps.vqhps_predictor(vqvae, body)
    for label, run in (("VQ-HPS", "vqhps"), ("VQ-HPS-rot", "vqhps_rot")):
        path = hps.vqhps_checkpoint(cfg, run)
        if not path.is_file():
            raise FileNotFoundError(f"{label} checkpoint not found: {path}; run notebooks/03_vqhps_training.ipynb "
                                    f"(or `python -m vqhps reproduce --profile {cfg.profile} --only 03`) first")
        methods[label] = predict_vqhps(hps.load_vqhps(path, cfg, body, vqvae, device))
    methods[FLOOR] = hps.vqvae_floor_predictor(vqvae)
    if train_arrays is None:
        train_arrays = source.load_split(cfg, "train", keys=("pose", "shape", "root_rot"))
    methods[MEAN_BODY] = hps.mean_body_predictor(body, train_arrays, device)
    return methods


def evaluate_methods(methods: dict[str, hps.ModelFn], arrays: dict, body, cfg, device: torch.device,
                     batch_size: int | None = None) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """``evaluate_split`` for each method: (per-sample metrics of all methods with a ``method``
    column, {method: summary})."""
    per_sample, summaries = {}, {}
    for name, model_fn in methods.items():
        per_sample[name], summaries[name] = hps.evaluate_split(model_fn, arrays, body, cfg, device, batch_size)
    frame = pd.concat(per_sample, names=["method", "row"]).reset_index(level="row", drop=True).reset_index()
    return frame, summaries


def table1(summaries: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Measured PVE, MPJPE and PA-MPJPE (mm) by (method, subset), each beside the paper's value
    (``<metric> paper``; NaN where the paper reports none: the references, and the full test split of
    the baselines), then the rotation columns ``hps.ROTATION_COLUMNS`` (rot_err_deg, rot_err_median_deg,
    rot_flip_share: mean and median global-rotation error in degrees, share of errors above
    ``metrics.ROT_FLIP_DEG``; NaN for a method without a rotation, e.g. FastMETRO)."""
    columns = (*METRIC_COLUMNS, *hps.ROTATION_COLUMNS)
    return with_paper_columns(hps.metrics_table(summaries, columns), "table1", TABLE1_PAPER_ROWS)
