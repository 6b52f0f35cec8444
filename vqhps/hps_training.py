"""Training and evaluation of image -> mesh models on the benchmark: VQ-HPS, VQ-HPS-rot (paper
Sec. 4.3) and, through the same generic pieces, the baselines.

Generic pieces (any model): ``benchmark_batches`` (a batch is a pure function of the step, so runs
resume exactly), ``Schedule`` + ``fit`` (AdamW, step decay, validation once per epoch, on top of
``vqhps.train.train``), ``iterate_split`` / ``predict_split`` / ``evaluate_split`` (a model is a
``model_fn(batch) -> dict(vertices (B, V, 3)[, rotmat (B, 3, 3)])`` over prepared, un-augmented
batches), ``metrics_table``, ``history_frame`` and ``learning_curves_figure``.
VQ-HPS specifics live in small functions: ``build_vqhps``, ``vqhps_loss_fn``, ``vqhps_predictor``,
``vqvae_floor_predictor``, ``train_vqhps``, ``train_vqhps_rot`` and ``load_vqhps``; the
"learned nothing" references: ``mean_body_predictor`` (Table 1's mean body) and
``marginal_token_entropy`` (the token cross-entropy of a model that ignores the image).
"""
from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import token_cache
from .checkpoint import CheckpointMismatch, check_meta, load_checkpoint, read_meta, state_fingerprint
from .config import VQHPSConfig
from .data import source
from .data.datasets import Augmentation, BenchmarkDataset, canonical_targets, prepare_batch, rotation_target
from .distributed import current
from .geometry import chordal_mean_rotation, crop_camera_rotation, rotation_angle_deg, rotation_angle_up_to_turn_deg
from .losses import rotation_mse
from .metrics import METRIC_COLUMNS, ROT_FLIP_DEG, evaluate_meshes, summarise
from .models.layers import REGRESSION_MLP
from .models.vqhps import VQHPS, vqhps_losses
from .train import TrainResult, autocast, device_of, new_iteration, rank_slice, step_indices, train
from .vqvae_training import checkpoint_dir

#: what a model needs from the benchmark arrays (images, 2D joints, camera, mesh parameters, labels)
BATCH_KEYS = tuple(k for k in BenchmarkDataset.KEYS if k != "subject")
#: per-sample labels copied next to the metrics (failure analysis by light, occlusion, yaw ...)
LABEL_COLUMNS = ("valid", "light", "occlusion", "in_frame", "yaw", "subject")
#: VQHPSConfig fields that fix the shapes and meaning of the weights
ARCHITECTURE_FIELDS = ("backbone", "d_model", "n_heads", "enc_layers", "dec_layers", "mlp_hidden", "rot_hidden",
                       "condition_on_camera", "refine_rotation", "heading_bins")

ModelFn = Callable[[dict], dict]


# ---------------------------------------------------------------------------------------- batches
def _augmentation_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, 0xA06]).generate_state(1, np.uint64)[0] >> 1)


def benchmark_batches(cfg, arrays: dict[str, np.ndarray], body, device: torch.device, augment: bool = True,
                      batch_size: int | None = None, prefetch: bool = True, meshes: bool = True) -> Callable[[int], dict]:
    """``batch_fn(step)`` over an in-memory split: the step's seeded global batch
    (``step_indices``), this rank's share of it, moved to ``device`` and augmented with the paper's
    augmentation drawn from a generator seeded by (cfg.seed, step, rank), with ground-truth canonical
    meshes attached (``prepare_batch``; ``meshes=False`` leaves them out for losses that do not need
    them). A pure function of ``step``; a background thread gathers the next step's CPU arrays
    meanwhile. ``batch_fn.steps_per_epoch`` = len // batch size."""
    n = len(arrays["image"])
    bs = int(batch_size or cfg.vqhps.batch_size)
    if n < bs:
        raise ValueError(f"the split has {n} images, fewer than one batch of {bs}; lower the batch size "
                         f"or build more data (cfg.data.n_train)")
    keys = [k for k in BATCH_KEYS if k in arrays]
    pin = device.type == "cuda"
    aug = Augmentation() if augment else None
    rank = current().rank
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch") if prefetch else None
    pending: dict[int, Future] = {}

    def cpu_batch(step: int) -> dict[str, torch.Tensor]:
        idx = rank_slice(step_indices(n, bs, step, cfg.seed))
        batch = {k: torch.from_numpy(np.ascontiguousarray(arrays[k][idx])) for k in keys}
        batch["index"] = torch.from_numpy(idx.astype(np.int64))
        return {k: v.pin_memory() for k, v in batch.items()} if pin else batch

    def batch_fn(step: int) -> dict:
        future = pending.pop(step, None)
        cpu = future.result() if future is not None else cpu_batch(step)
        for stale in list(pending):
            pending.pop(stale).cancel()
        if executor is not None:
            pending[step + 1] = executor.submit(cpu_batch, step + 1)
        gen = torch.Generator().manual_seed(_augmentation_seed(cfg.seed, step, rank))
        return prepare_batch(cpu, body if meshes else None, device, aug, gen, body.joint_flip24, body.joint_flip17,
                             channels_last=cfg.runtime.channels_last)

    batch_fn.steps_per_epoch = max(n // bs, 1)
    return batch_fn


# ---------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Schedule:
    """The authors' optimisation, AdamW with a step decay by ``lr_gamma`` every ``lr_step_epochs``
    epochs, plus the fine-tuning of pretrained backbones: their parameters at ``backbone_lr_scale``
    times the rate of the rest, and a linear warm-up over the first ``warmup_steps`` steps."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_step_epochs: int
    lr_gamma: float
    backbone_lr_scale: float = 1.0
    warmup_steps: int = 0

    @classmethod
    def of(cls, c) -> "Schedule":
        """From any config with these fields (VQHPSConfig, a baseline's config)."""
        return cls(c.epochs, c.batch_size, c.lr, c.weight_decay, c.lr_step_epochs, c.lr_gamma,
                   c.backbone_lr_scale, c.warmup_steps)


def _epoch_ended(done: int, log_every: int, steps_per_epoch: int) -> bool:
    """Whether an epoch ended in the ``log_every`` steps up to ``done`` (pure: resumes identically)."""
    return done // steps_per_epoch > max(done - log_every, 0) // steps_per_epoch


def is_backbone_parameter(name: str) -> bool:
    """Whether a parameter name belongs to an image backbone (``backbone``, ``rot_backbone``,
    ``mesh_backbone``, also under a DDP or compile wrapper)."""
    return any(part.endswith("backbone") for part in name.split(".")[:-1])


def parameter_groups(named_params, schedule: Schedule) -> list[dict]:
    """The trainable parameters split into AdamW groups: backbones at ``backbone_lr_scale`` x the
    rate, everything else at the rate (empty groups left out)."""
    backbone, heads = [], []
    for name, p in named_params:
        if p.requires_grad:
            (backbone if is_backbone_parameter(name) else heads).append(p)
    groups = [{"params": heads, "lr": schedule.lr},
              {"params": backbone, "lr": schedule.lr * schedule.backbone_lr_scale}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, schedule: Schedule, steps_per_epoch: int) -> float:
    """Multiplier of each group's rate after ``step`` optimizer steps: linear warm-up to 1 over
    ``warmup_steps``, times ``lr_gamma`` per ``lr_step_epochs`` epochs completed."""
    warm = min(1.0, (step + 1) / schedule.warmup_steps) if schedule.warmup_steps > 0 else 1.0
    return warm * schedule.lr_gamma ** (step // max(schedule.lr_step_epochs * steps_per_epoch, 1))


def schedule_optimizer(named_params, schedule: Schedule, steps_per_epoch: int, device: torch.device
                       ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused on CUDA) over the trainable ``named_params`` ((name, parameter) pairs, as
    ``model.named_parameters()`` yields), grouped by ``parameter_groups``, and its ``lr_factor``
    schedule, as ``fit`` trains with."""
    optimizer = torch.optim.AdamW(parameter_groups(named_params, schedule), lr=schedule.lr,
                                  weight_decay=schedule.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, schedule=schedule, steps_per_epoch=steps_per_epoch))
    return optimizer, scheduler


def fit(cfg, name: str, model: torch.nn.Module, loss_fn, schedule: Schedule, train_arrays: dict, body,
        meta: dict, *, params: list[tuple[str, torch.nn.Parameter]] | None = None, augment: bool = True,
        stop_after: int | None = None, predictor: Callable[[torch.nn.Module], ModelFn] | None = None,
        val_arrays: dict | None = None, meshes: bool = True,
        val_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None) -> TrainResult:
    """Train ``model`` (already on its device) on ``train_arrays`` for ``schedule.epochs`` epochs with
    AdamW over ``params`` ((name, parameter) pairs; default: every named parameter) on ``schedule``, checkpointing to
    ``results/<profile>/checkpoints/<name>.pt`` and resuming from it. With ``predictor`` (model ->
    model_fn) and ``val_arrays``, the validation metrics (val_PVE, val_MPJPE, val_PA-MPJPE,
    val_rot_err_deg, val_rot_err_median_deg, val_rot_flip_share) are logged at the first log row after
    each epoch; ``val_fn`` (model -> {name: value}), when given, replaces that evaluation (VQ-HPS's,
    ``vqhps_validation``, adds val_token_ce). ``meshes=False``: training batches come without
    ground-truth canonical meshes (``loss_fn`` does not read them)."""
    device = next(model.parameters()).device
    batch_fn = benchmark_batches(cfg, train_arrays, body, device, augment, schedule.batch_size, meshes=meshes)
    spe = batch_fn.steps_per_epoch
    total = schedule.epochs * spe
    optimizer, scheduler = schedule_optimizer(params if params is not None else model.named_parameters(), schedule,
                                              spe, device)
    log_every = cfg.runtime.log_every
    validate = val_fn is not None or (predictor is not None and val_arrays is not None)

    def eval_fn(m: torch.nn.Module, done: int) -> dict[str, float]:
        if not (_epoch_ended(done, log_every, spe) or done == total):
            return {}
        if val_fn is not None:
            return val_fn(m)
        _, summary = evaluate_split(predictor(m), val_arrays, body, cfg, device, schedule.batch_size,
                                    progress=False)
        return validation_row(summary)

    meta = {**meta, "schedule": asdict(schedule), "steps_per_epoch": spe}
    return train(name, model, optimizer, scheduler, batch_fn, loss_fn, total, checkpoint_dir(cfg), cfg.runtime,
                 meta=meta, stop_after=stop_after, eval_fn=eval_fn if validate else None,
                 eval_every=log_every if validate else 0, cuda_graph=True)


# ---------------------------------------------------------------------------------------- VQ-HPS
def vqhps_config(cfg, **overrides) -> VQHPSConfig:
    """``cfg.vqhps`` with field overrides (e.g. loss="3d", use_reprojection=False, epochs=1)."""
    fields = {f.name for f in dataclasses.fields(VQHPSConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown VQHPSConfig field(s) {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(cfg.vqhps, **overrides)


def vqvae_fingerprint(vqvae) -> str:
    """Hash of the codebook and decoder: what the predicted token ids mean."""
    return state_fingerprint(vqvae.state_dict(), lambda k: k.startswith("decoder.") or k == "quantizer.embed")


def build_vqhps(hcfg: VQHPSConfig, body, vqvae) -> VQHPS:
    """A fresh VQ-HPS for this body and Mesh-VQ-VAE (its token count and codebook size)."""
    return VQHPS(hcfg, body.tpose_joints17().cpu(), n_tokens=vqvae.n_tokens, codebook_size=vqvae.codebook_size,
                 rot_hidden=hcfg.rot_hidden)


#: VQHPSConfig fields that do not change what VQ-HPS's weights are after a given step
_NOT_RECIPE = ("epochs", "refine_epochs", "refine_lr")


def vqhps_meta(hcfg: VQHPSConfig, body, vqvae, vqvae_stage: str) -> dict:
    """What a VQ-HPS checkpoint records. To be loaded it must match the body, hierarchy and
    Mesh-VQ-VAE; to be resumed, also the architecture and the ``recipe`` (every setting but the
    number of epochs, which may be raised to train longer)."""
    config = asdict(hcfg)
    return {"kind": "vqhps", "config": config, "body_id": body.identifier(), "hierarchy_hash": vqvae.hierarchy_hash,
            "vqvae_stage": vqvae_stage, "vqvae_fingerprint": vqvae_fingerprint(vqvae),
            "backbone": hcfg.backbone,
            "backbone_weights": "scratch" if hcfg.backbone_weights is None else str(hcfg.backbone_weights),
            "architecture": {**{k: config[k] for k in ARCHITECTURE_FIELDS}, "mlp": REGRESSION_MLP, "n_tokens": vqvae.n_tokens,
                             "codebook_size": vqvae.codebook_size},
            "recipe": {k: v for k, v in config.items() if k not in _NOT_RECIPE}}


#: VQ-HPS submodules compiled on CUDA: the two ResNet-50s (compiling the heads and the mesh branch
#: as well measured slower on one H100: 80 vs 75 ms per training step at batch 64)
BACKBONES = ("rot_backbone", "mesh_backbone")


def prepare_model(model: torch.nn.Module, cfg, device: torch.device,
                  compiled: tuple[str, ...] = BACKBONES) -> torch.nn.Module:
    """Move to ``device``; per cfg.runtime, channels_last and (on CUDA) the submodules named in
    ``compiled`` compiled in place (their state-dict keys unchanged, so checkpoints stay portable)."""
    model = model.to(device)
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.runtime.compile and device.type == "cuda":
        for name in compiled:
            getattr(model, name).compile(mode=cfg.runtime.compile_mode)
    return model


@torch.no_grad()
def token_table(vqvae, body, arrays: dict[str, np.ndarray], device: torch.device, batch_size: int = 256,
                progress: bool = False) -> torch.Tensor:
    """(N, 2, n_tokens) long: the frozen Mesh-VQ-VAE's token ids (fp32) of every image's ground-truth
    canonical mesh, as stored ([:, 0]) and mirrored by the flip augmentation ([:, 1]). Encoded once
    before training, so a training step neither poses nor encodes meshes."""
    pose, shape = torch.as_tensor(arrays["pose"]), torch.as_tensor(arrays["shape"])
    body, rows = body.to(device), []
    for start in tqdm(range(0, len(pose), batch_size), desc="token targets", leave=False, disable=not progress):
        p, b = pose[start:start + batch_size].to(device), shape[start:start + batch_size].to(device)
        ids = []
        for mirrored in (False, True):
            flipped = torch.full((len(p),), mirrored, dtype=torch.bool, device=device)
            with torch.autocast(device.type, enabled=False):
                ids.append(vqvae.encode(canonical_targets(body, p, b, flipped).float()))
        rows.append(torch.stack(ids, dim=1))
    return torch.cat(rows)


#: meshes per Mesh-VQ-VAE call when ``train_vqhps`` encodes its token table
TOKEN_BATCH = 256


def token_cache_dir(cfg) -> Path:
    """Where ``cached_token_table`` keeps token tables: beside the profile's checkpoints."""
    return checkpoint_dir(cfg) / "token_tables"


def cached_token_table(cfg, vqvae, body, arrays: dict[str, np.ndarray], device: torch.device) -> torch.Tensor:
    """``token_table`` of ``arrays`` read from the cache under ``token_cache_dir(cfg)`` when these
    exact inputs were encoded before (``token_cache.table_key``), else encoded and stored there."""
    key = token_cache.table_key(vqvae, body, arrays, device, TOKEN_BATCH)
    build = lambda: token_table(vqvae, body, arrays, device, TOKEN_BATCH, progress=cfg.runtime.progress)  # noqa: E731
    return token_cache.load_or_build(token_cache_dir(cfg), key, build, device,
                                     (len(arrays["pose"]), 2, vqvae.n_tokens))


def vqhps_loss_fn(vqvae, body, hcfg: VQHPSConfig, tokens: Callable[[], torch.Tensor] | None = None):
    """``loss_fn(model, batch, step)`` of VQ-HPS: ground-truth token ids looked up by the batch's
    sample index and flip in the table ``tokens()`` returns (``token_table``; called once, at the
    first step), or without ``tokens`` encoded from the batch's canonical meshes by the frozen
    Mesh-VQ-VAE (fp32); the paper's losses (``vqhps_losses``), plus rotation error (deg, against
    ``crop_rot``, the crop camera's rotation it learns) and token accuracy."""
    table = functools.cache(tokens) if tokens is not None else None

    def loss_fn(model, batch: dict, step: int) -> dict[str, torch.Tensor]:
        # the targets go into a copy: a caller's batch (a CUDA graph's static inputs) keeps its keys
        if table is not None:
            ids = table()
            token_ids = ids[batch["index"].to(ids.device), batch["flipped"].long().to(ids.device)]
        else:
            with torch.no_grad(), torch.autocast(batch["canonical"].device.type, enabled=False):
                token_ids = vqvae.encode(batch["canonical"].float())
        batch = {**batch, "token_ids": token_ids}
        out = model(batch["image"], vqvae, body)
        losses = vqhps_losses(out, batch, vqvae, body, hcfg)
        result = {"loss": losses.pop("total"), **{k: v.detach() for k, v in losses.items()}}
        with torch.no_grad():
            R_pred, R_gt = out["rotmat"].float(), rotation_target(batch, "crop")
            result["rot_err_deg"] = rotation_angle_deg(R_pred, R_gt).mean()
            result["rot_err_up_to_turn_deg"] = rotation_angle_up_to_turn_deg(R_pred, R_gt).mean()
            result["token_acc"] = (out["ids"] == batch["token_ids"]).float().mean()
        return result

    return loss_fn


def camera_frame_prediction(pred: dict, batch: dict) -> dict:
    """A crop-only model's prediction (rotation and meshes in the crop's own camera) in the full frame's
    camera, as ``evaluate_split`` compares: ``rotmat`` (and ``rotmat_initial``) -> Rc @ R, ``vertices``,
    ``joints24``, ``joints17`` -> @ Rc^T, with Rc = ``crop_camera_rotation(bbox, K)``; the crop-frame
    ones stay as ``rotmat_crop`` and ``vertices_crop`` (what the predicted weak-perspective ``cam``
    projects). A batch without bbox and K is its own crop camera: ``pred`` is returned as it is."""
    if "bbox" not in batch or "K" not in batch:
        return pred
    rc = crop_camera_rotation(batch["bbox"], batch["K"]).float()
    out = {**pred, "vertices_crop": pred["vertices"]}
    for key in ("vertices", "joints24", "joints17"):
        if key in pred:
            out[key] = pred[key].float() @ rc.transpose(-1, -2)
    if "rotmat" in pred:
        out["rotmat_crop"] = pred["rotmat"]
    for key in ("rotmat", "rotmat_initial"):
        if key in pred:
            out[key] = rc @ pred[key].float()
    return out


def vqhps_predictor(vqvae, body) -> Callable[[torch.nn.Module], ModelFn]:
    """model -> model_fn: VQ-HPS inference (final rotation: the refined one when there is a refiner),
    turned from the crop's camera into the full frame's (``camera_frame_prediction``)."""
    return lambda model: (lambda batch: camera_frame_prediction(model.predict(batch["image"], vqvae, body), batch))


def vqvae_floor_predictor(vqvae) -> ModelFn:
    """The best VQ-HPS could do: the ground-truth canonical mesh encoded and decoded by the
    Mesh-VQ-VAE, rotated by the TRUE rotation."""

    def model_fn(batch: dict) -> dict[str, torch.Tensor]:
        with torch.autocast(batch["canonical"].device.type, enabled=False):
            recon = vqvae.decode(vqvae.encode(batch["canonical"].float())).float()
        R = batch["root_rot"].float()
        return {"vertices": recon @ R.transpose(-1, -2), "rotmat": R, "canonical": recon}

    return model_fn


@torch.no_grad()
def mean_canonical_mesh(body, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu",
                        batch_size: int = TOKEN_BATCH) -> torch.Tensor:
    """(V, 3) float64: the mean over a split of its ground-truth canonical meshes (as stored, not
    mirrored), posed from ``arrays["pose"]``/``["shape"]`` by ``canonical_targets`` ``batch_size``
    at a time."""
    pose, shape = torch.as_tensor(arrays["pose"]), torch.as_tensor(arrays["shape"])
    body, total = body.to(device), None
    for start in range(0, len(pose), batch_size):
        verts = canonical_targets(body, pose[start:start + batch_size], shape[start:start + batch_size])
        part = verts.double().sum(dim=0)
        total = part if total is None else total + part
    return total / len(pose)


def mean_root_rotation(arrays: dict[str, np.ndarray]) -> torch.Tensor:
    """(3, 3) float64: the chordal L2 mean of a split's ``root_rot`` (``geometry.chordal_mean_rotation``:
    the matrices' mean projected back to SO(3) through an SVD)."""
    return chordal_mean_rotation(torch.as_tensor(np.asarray(arrays["root_rot"])).double())


def mean_body_predictor(body, train_arrays: dict[str, np.ndarray], device: torch.device | str = "cpu",
                        batch_size: int = TOKEN_BATCH) -> ModelFn:
    """Table 1's "learned nothing" reference, a ``model_fn`` that ignores the image: the training
    split's mean canonical mesh (``mean_canonical_mesh``) oriented by its mean rotation
    (``mean_root_rotation``), the same for every sample. ``train_arrays`` needs pose, shape and
    root_rot only. Every trained model must beat it."""
    canonical = mean_canonical_mesh(body, train_arrays, device, batch_size).float()
    R = mean_root_rotation(train_arrays).float().to(canonical.device)
    vertices = canonical @ R.T

    def model_fn(batch: dict) -> dict[str, torch.Tensor]:
        b, dev = batch["image"].shape[0], batch["image"].device
        return {"vertices": vertices.to(dev).expand(b, -1, -1), "rotmat": R.to(dev).expand(b, 3, 3),
                "canonical": canonical.to(dev).expand(b, -1, -1)}

    return model_fn


def vqhps_validation(vqvae, body, arrays: dict[str, np.ndarray], tokens: Callable[[], torch.Tensor], cfg,
                     device: torch.device, batch_size: int | None = None) -> Callable[[torch.nn.Module], dict]:
    """``val_fn`` of ``fit`` for VQ-HPS: in one pass over ``arrays`` (the validation split), the
    ``evaluate_split`` metrics of ``vqhps_predictor`` (``validation_row``: val_PVE, ...) and
    ``val_token_ce``, the mean token cross-entropy (nats per token) of the model's logits against
    ``tokens()[:, 0]`` (``token_table`` of ``arrays``: the ids of the stored, un-mirrored meshes,
    as the un-augmented evaluation batches show them; called once, at the first validation)."""
    table = functools.cache(tokens)
    predictor = vqhps_predictor(vqvae, body)

    def val_fn(model: torch.nn.Module) -> dict[str, float]:
        logits: list[torch.Tensor] = []
        total: list[torch.Tensor] = []
        count = 0
        predict = predictor(model)

        def model_fn(batch: dict) -> dict[str, torch.Tensor]:
            nonlocal count
            logits.clear()
            out = predict(batch)
            ids = table()[batch["index"].to(table().device), 0].to(logits[-1].device)
            with torch.autocast(logits[-1].device.type, enabled=False):
                lg = logits[-1].float()
                total.append(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids.reshape(-1), reduction="sum"))
            count += ids.numel()
            return out

        # the token head's output: the logits ``predict`` argmaxes (a hook keeps predict's own code path)
        handle = model.mesh.register_forward_hook(lambda module, args, output: logits.append(output))
        try:
            _, summary = evaluate_split(model_fn, arrays, body, cfg, device, batch_size, progress=False)
        finally:
            handle.remove()
        return {**validation_row(summary), "val_token_ce": float(torch.stack(total).sum()) / max(count, 1)}

    return val_fn


def _arrays(cfg, split: str, given: dict | None) -> dict:
    return given if given is not None else source.load_split(cfg, split)


def _refuse_foreign(path: Path, meta: dict) -> None:
    """Before resuming, check an existing checkpoint's meta (read lazily) against the run's."""
    found = read_meta(path)
    if found is None:
        return
    _check_vqhps_meta(found, meta, path)
    try:
        check_meta(found, {k: meta[k] for k in ("architecture", "recipe")}, path)
    except CheckpointMismatch as err:
        raise CheckpointMismatch(f"{err}: this run would resume a checkpoint trained with other settings; "
                                 f"delete {path} (and its .csv log) to retrain, or use another run name") from None


def _check_vqhps_meta(found: dict, meta: dict, path: Path) -> None:
    expect = {k: meta[k] for k in ("kind", "body_id", "hierarchy_hash", "vqvae_fingerprint")}
    try:
        check_meta(found, expect, path)
    except CheckpointMismatch as err:
        raise CheckpointMismatch(
            f"{err}. A VQ-HPS checkpoint predicts token ids of the Mesh-VQ-VAE it was trained with (its "
            f"'{found.get('vqvae_stage', '?')}' stage, on body {found.get('body_id', '?')}): load that "
            f"Mesh-VQ-VAE with load_mesh_vqvae(cfg, body, stage), or delete {path} to retrain") from None


def check_backbone(stored: dict, hcfg: VQHPSConfig, path: Path) -> None:
    """Refuse (CheckpointMismatch) a checkpoint whose backbone or backbone weights differ from the
    configuration's: every model of a study shares one backbone and initialisation."""
    for key in ("backbone", "backbone_weights"):
        found, expected = stored.get(key, "resnet50" if key == "backbone" else None), getattr(hcfg, key)
        if found != expected:
            raise CheckpointMismatch(
                f"checkpoint {path}: trained with {key}={found!r}, but this configuration has {key}={expected!r}; "
                f"every model of a study shares one backbone: load it with --set vqhps.{key}={found} "
                f"(cfg.vqhps.{key}), or retrain it with this configuration")


def train_vqhps(cfg, body, vqvae, name: str = "vqhps", stop_after: int | None = None, *,
                vqvae_stage: str = "finetune", train_arrays: dict | None = None, val_arrays: dict | None = None,
                augment: bool = True, validate: bool = True, **overrides) -> tuple[VQHPS, TrainResult]:
    """Train VQ-HPS (paper Sec. 4.3) and return (model in eval mode, TrainResult).

    Token targets come from the frozen ``vqvae``, encoded once for the whole split at the first
    step (``token_table``; read back by ``cached_token_table`` when an earlier run encoded the same
    split with the same Mesh-VQ-VAE and body; not at all when the checkpoint is already complete;
    pass the stage the Mesh-VQ-VAE was loaded from as ``vqvae_stage``: it is recorded).
    ``overrides`` are VQHPSConfig fields, so the Table 2 ablations run here under their own
    ``name``: ``loss="3d"``, ``use_reprojection=False``, or a pre-train-only Mesh-VQ-VAE
    (``vqvae=load_mesh_vqvae(cfg, body, "pretrain")``, ``vqvae_stage="pretrain"``).
    ``train_arrays``/``val_arrays`` default to the profile's train/val splits; ``validate=False``
    skips the per-epoch validation (``vqhps_validation``: the val_* metrics and val_token_ce)."""
    hcfg = vqhps_config(cfg, **overrides)
    device = device_of(cfg.runtime)
    body, vqvae = body.to(device), vqvae.to(device).eval()
    meta = vqhps_meta(hcfg, body, vqvae, vqvae_stage)
    _refuse_foreign(checkpoint_dir(cfg) / f"{name}.pt", meta)
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_vqhps(hcfg, body, vqvae), cfg, device)
    train_arrays = _arrays(cfg, "train", train_arrays)
    tokens = lambda: cached_token_table(cfg, vqvae, body, train_arrays, device)  # noqa: E731
    val_fn = None
    if validate:
        val_arrays = _arrays(cfg, "val", val_arrays)
        val_tokens = lambda: cached_token_table(cfg, vqvae, body, val_arrays, device)  # noqa: E731
        val_fn = vqhps_validation(vqvae, body, val_arrays, val_tokens, cfg, device, hcfg.batch_size)
    result = fit(cfg, name, model, vqhps_loss_fn(vqvae, body, hcfg, tokens), Schedule.of(hcfg),
                 train_arrays, body, meta, augment=augment, stop_after=stop_after, meshes=hcfg.loss == "3d",
                 val_fn=val_fn)
    return model.eval(), result


class _RefinerStage(VQHPS):
    """VQ-HPS whose base network stays in eval mode while the refiner trains (batch-norm statistics
    and dropout of the frozen base are exactly those of the trained VQ-HPS)."""

    def train(self, mode: bool = True) -> "_RefinerStage":
        super().train(False)
        if self.refiner is not None:
            self.refiner.train(mode)
        self.training = mode
        return self


def vqhps_rot_loss_fn(body, vqvae, hcfg: VQHPSConfig):
    """``loss_fn`` of the refiner stage: the rotation loss of the refined rotation only (against
    ``crop_rot``, as VQ-HPS's)."""

    def loss_fn(model, batch: dict, step: int) -> dict[str, torch.Tensor]:
        out = model(batch["image"], vqvae, body)
        R = rotation_target(batch, "crop")
        with torch.autocast(R.device.type, enabled=False):
            rot_refined = rotation_mse(out["rotmat_refined"].float(), R)
        with torch.no_grad():
            err = rotation_angle_deg(out["rotmat_refined"].float(), R).mean()
            err0 = rotation_angle_deg(out["rotmat"].float(), R).mean()
        return {"loss": hcfg.rot_weight * rot_refined, "rot_refined": rot_refined.detach(),
                "rot_err_deg": err, "rot_err_initial_deg": err0}

    return loss_fn


def train_vqhps_rot(cfg, body, vqvae, base_model: VQHPS, name: str = "vqhps_rot", stop_after: int | None = None, *,
                    vqvae_stage: str = "finetune", train_arrays: dict | None = None, val_arrays: dict | None = None,
                    augment: bool = True, validate: bool = True, **overrides) -> tuple[VQHPS, TrainResult]:
    """VQ-HPS-rot: the refiner of Sec. 4.3 trained ON TOP OF a trained VQ-HPS.

    The base network's weights are copied and frozen (kept in eval mode); only the refiner (pooled
    rotation feature, R, camera and the 17-joint skeleton of the decoded mesh -> R_f) trains, with
    its rotation loss, for ``refine_epochs`` at ``refine_lr`` (VQHPSConfig; ``overrides`` apply).
    The canonical mesh is therefore exactly VQ-HPS's, which is why Table 1 reports the same
    PA-MPJPE for both; only the orientation (PVE, MPJPE) changes."""
    hcfg = vqhps_config(cfg, **overrides)
    arch = {k: getattr(base_model.cfg, k) for k in ARCHITECTURE_FIELDS if k != "refine_rotation"}
    rcfg = dataclasses.replace(hcfg, **arch, backbone_weights=base_model.cfg.backbone_weights, refine_rotation=True)
    device = device_of(cfg.runtime)
    body, vqvae = body.to(device), vqvae.to(device).eval()
    meta = {**vqhps_meta(rcfg, body, vqvae, vqvae_stage), "stage": "refiner"}
    meta["recipe"] = {"base": state_fingerprint(base_model.state_dict()),
                      **{k: getattr(rcfg, k) for k in ("refine_lr", "batch_size", "weight_decay", "rot_weight",
                                                       "dropout")}}
    _refuse_foreign(checkpoint_dir(cfg) / f"{name}.pt", meta)
    torch.manual_seed(cfg.seed)
    model = _RefinerStage(rcfg, body.tpose_joints17().cpu(), n_tokens=vqvae.n_tokens,
                          codebook_size=vqvae.codebook_size, rot_hidden=rcfg.rot_hidden)
    missing, unexpected = model.load_state_dict(base_model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("refiner.") for k in missing):
        raise ValueError(f"base model does not match VQ-HPS-rot's base: missing {missing}, unexpected {unexpected}")
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.startswith("refiner."))
    model = prepare_model(model, cfg, device)
    schedule = Schedule(epochs=rcfg.refine_epochs, batch_size=rcfg.batch_size, lr=rcfg.refine_lr,
                        weight_decay=rcfg.weight_decay, lr_step_epochs=max(rcfg.refine_epochs, 1), lr_gamma=1.0,
                        warmup_steps=rcfg.warmup_steps)
    result = fit(cfg, name, model, vqhps_rot_loss_fn(body, vqvae, rcfg), schedule, _arrays(cfg, "train", train_arrays),
                 body, meta, params=list(model.refiner.named_parameters(prefix="refiner")), augment=augment, stop_after=stop_after,
                 predictor=vqhps_predictor(vqvae, body) if validate else None,
                 val_arrays=_arrays(cfg, "val", val_arrays) if validate else None, meshes=False)
    return model.eval(), result


def load_vqhps(path: str | Path, cfg, body, vqvae, device: torch.device | str = "cpu") -> VQHPS:
    """A trained VQ-HPS (or VQ-HPS-rot) in eval mode, built from the architecture its checkpoint
    records. Refuses (CheckpointMismatch) a checkpoint made for another body model, hierarchy or
    Mesh-VQ-VAE (its token ids would decode to other meshes), or with another backbone than
    ``cfg.vqhps``'s."""
    path = Path(path)
    state = load_checkpoint(path)
    found = state.get("meta", {})
    stored = found.get("config")
    if found.get("kind") != "vqhps" or not isinstance(stored, dict):
        raise CheckpointMismatch(f"checkpoint {path}: kind is {found.get('kind', '<missing>')!r}, not a VQ-HPS "
                                 f"checkpoint (written by train_vqhps / train_vqhps_rot)")
    check_backbone(stored, cfg.vqhps, path)
    known = {f.name for f in dataclasses.fields(VQHPSConfig)}
    hcfg = dataclasses.replace(cfg.vqhps, **{k: v for k, v in stored.items() if k in known})
    _check_vqhps_meta(found, vqhps_meta(hcfg, body, vqvae, found.get("vqvae_stage", "?")), path)
    model = build_vqhps(hcfg, body, vqvae)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def vqhps_checkpoint(cfg, name: str = "vqhps") -> Path:
    """Where ``train_vqhps(cfg, ..., name=name)`` writes its checkpoint."""
    return checkpoint_dir(cfg) / f"{name}.pt"


# ---------------------------------------------------------------------------------------- evaluation
def iterate_split(arrays: dict[str, np.ndarray], body, cfg, device: torch.device,
                  batch_size: int | None = None, progress: bool = True, desc: str = "eval") -> Iterator[dict]:
    """Prepared, un-augmented batches of a whole split in order (ground-truth canonical meshes attached;
    ``index`` holds the sample indices). Each batch starts a new iteration for compiled CUDA graphs
    (``new_iteration``), so the graphs may reuse the memory of the previous batch's outputs."""
    n = len(arrays["image"])
    bs = int(batch_size or cfg.vqhps.batch_size)
    keys = [k for k in BATCH_KEYS if k in arrays]
    for start in tqdm(range(0, n, bs), desc=desc, leave=False, disable=not (progress and cfg.runtime.progress)):
        idx = np.arange(start, min(start + bs, n))
        batch = {k: torch.from_numpy(np.ascontiguousarray(arrays[k][idx])) for k in keys}
        batch["index"] = torch.from_numpy(idx)
        prepared = prepare_batch(batch, body, device, None, channels_last=cfg.runtime.channels_last)
        new_iteration()
        yield prepared


@torch.no_grad()
def predict_split(model_fn: ModelFn, arrays: dict[str, np.ndarray], body, cfg, device: torch.device,
                  batch_size: int | None = None, keys: tuple[str, ...] | None = None,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Run ``model_fn`` over a split without augmentation; its tensor outputs (``keys``: default all)
    concatenated on the CPU in split order, plus ``index``. Full meshes of a large split take
    memory (V x 3 floats each): ``evaluate_split`` streams instead."""
    body = body.to(device)
    out: dict[str, list[torch.Tensor]] = {"index": []}
    for batch in iterate_split(arrays, body, cfg, device, batch_size, progress, desc="predict"):
        with autocast(device, cfg.runtime.amp):
            pred = model_fn(batch)
        out["index"].append(batch["index"].cpu())
        for k, v in pred.items():
            if isinstance(v, torch.Tensor) and (keys is None or k in keys):
                out.setdefault(k, []).append(v.detach().float().cpu() if v.is_floating_point() else v.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def evaluate_split(model_fn: ModelFn, arrays: dict[str, np.ndarray], body, cfg, device: torch.device,
                   batch_size: int | None = None, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-sample metrics of ``model_fn`` on a split and their summary.

    Ground truth: the oriented mesh canonical @ root_rot^T, in the full frame's camera (predictors of
    crop-only models turn their output into it: ``camera_frame_prediction``); prediction:
    ``model_fn(batch)["vertices"]``
    (both centred on their vertex mean by the metrics, as VQ-HPS's R̂·V̂c is). Returns (per_sample:
    index, PVE, MPJPE, PA-MPJPE (mm), rot_err_deg (NaN without a predicted ``rotmat``) and the labels
    valid, light, occlusion, in_frame, yaw, subject; summary: ``metrics.summarise`` rows full/valid
    plus the mean rotation error)."""
    body = body.to(device)
    rows = []
    for batch in iterate_split(arrays, body, cfg, device, batch_size, progress):
        with autocast(device, cfg.runtime.amp):
            pred = model_fn(batch)
        R = batch["root_rot"].float()
        gt = batch["canonical"].float() @ R.transpose(-1, -2)
        metrics = evaluate_meshes(pred["vertices"].float(), gt, body.regressor17, batch["valid"])
        if "rotmat" in pred:
            metrics["rot_err_deg"] = rotation_angle_deg(pred["rotmat"].double(), R.double()).cpu().numpy()
        else:
            metrics["rot_err_deg"] = np.full(len(R), np.nan)
        metrics["index"] = batch["index"].cpu().numpy()
        rows.append(pd.DataFrame(metrics))
    per_sample = pd.concat(rows, ignore_index=True)
    for col in LABEL_COLUMNS:
        if col in arrays and col != "valid":
            per_sample[col] = np.asarray(arrays[col])[per_sample["index"].to_numpy()]
    per_sample = per_sample[["index", *METRIC_COLUMNS, "rot_err_deg",
                             *[c for c in LABEL_COLUMNS if c in per_sample.columns]]]
    return per_sample, summarise_with_rotation(per_sample)


#: the summaries' rotation columns: mean and median global-rotation error (deg) and the share of
#: samples whose error exceeds ``ROT_FLIP_DEG`` (a fraction in [0, 1]); NaN for a method without a rotation
ROTATION_COLUMNS = ("rot_err_deg", "rot_err_median_deg", "rot_flip_share")


def rotation_summary(errors) -> dict[str, float]:
    """Per-sample rotation errors (deg; NaN: no predicted rotation, left out) -> {``ROTATION_COLUMNS``:
    mean, median, share above ``ROT_FLIP_DEG``}, all NaN when no error is given."""
    e = np.asarray(errors, dtype=np.float64)
    e = e[~np.isnan(e)]
    if e.size == 0:
        return dict.fromkeys(ROTATION_COLUMNS, float("nan"))
    return {"rot_err_deg": float(e.mean()), "rot_err_median_deg": float(np.median(e)),
            "rot_flip_share": float((e > ROT_FLIP_DEG).mean())}


def summarise_with_rotation(per_sample: pd.DataFrame) -> pd.DataFrame:
    """``metrics.summarise`` (rows full/valid, PVE/MPJPE/PA-MPJPE in mm) plus the rotation columns
    (``ROTATION_COLUMNS``, ``rotation_summary`` of each subset's ``rot_err_deg``)."""
    summary = summarise(per_sample)
    valid = per_sample["valid"].astype(bool).to_numpy()
    err = per_sample["rot_err_deg"].to_numpy(dtype=np.float64)
    rows = [rotation_summary(err), rotation_summary(err[valid])]
    for col in ROTATION_COLUMNS:
        summary[col] = [r[col] for r in rows]
    return summary


def validation_row(summary: pd.DataFrame) -> dict[str, float]:
    """The full-split row of an ``evaluate_split`` summary as the ``val_<column>`` metrics ``fit`` logs."""
    return {f"val_{k}": float(v) for k, v in summary.loc["full"].items()}


def metrics_table(summaries: dict[str, pd.DataFrame], columns: tuple[str, ...] = METRIC_COLUMNS) -> pd.DataFrame:
    """{method: summary} -> one table indexed by (method, subset) with the chosen metric columns,
    rounded to 0.01 (``rot_flip_share``, a fraction: to 0.001)."""
    table = pd.concat({name: s[list(columns)] for name, s in summaries.items()}, names=["method", "subset"])
    return table.round({c: 3 if c == "rot_flip_share" else 2 for c in table.columns})


# ---------------------------------------------------------------------------------------- token entropy
def marginal_token_entropy(ids: torch.Tensor | np.ndarray) -> float:
    """(N, T) token ids -> the mean over the T positions of the entropy (nats) of each position's
    empirical code distribution over the N rows. On the training split's token table it is the token
    cross-entropy of a model that learned nothing from the image (it predicts each position's
    training frequencies): a trained VQ-HPS's validation cross-entropy should end well below it."""
    a = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, T) table of token ids, got shape {a.shape}")
    entropies = []
    for column in a.T:
        _, counts = np.unique(column, return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def train_token_entropy(cfg, vqvae, body, device: torch.device, arrays: dict | None = None) -> float:
    """``marginal_token_entropy`` of the training split's token table (``cached_token_table``, the one
    VQ-HPS trained on; its stored, un-mirrored column, as validation images are). ``arrays`` default:
    the profile's train split (pose and shape only)."""
    arrays = arrays if arrays is not None else source.load_split(cfg, "train", keys=("pose", "shape"))
    return marginal_token_entropy(cached_token_table(cfg, vqvae.to(device).eval(), body.to(device), arrays,
                                                     device)[:, 0])


def token_ce_summary(curves: pd.DataFrame, entropy: float, run: str = "VQ-HPS") -> pd.DataFrame:
    """One row (indexed by ``run``): the last logged validation token cross-entropy of ``run`` in
    ``curves`` (``history_frame`` rows; NaN if none), the training tokens' marginal entropy, their
    difference (nats per token) and whether the cross-entropy ends at least 1 nat below the entropy."""
    rows = curves[curves["run"] == run] if "run" in curves.columns else curves
    ce = rows["val_token_ce"].dropna() if "val_token_ce" in rows.columns else pd.Series(dtype=float)
    last = float(ce.iloc[-1]) if len(ce) else float("nan")
    return pd.DataFrame({"val_token_ce_nats": [last], "train_marginal_entropy_nats": [float(entropy)],
                         "margin_nats": [float(entropy) - last], "margin_ge_1_nat": [bool(entropy - last >= 1.0)]},
                        index=pd.Index([run], name="run"))


# ---------------------------------------------------------------------------------------- curves
def history_frame(result: TrainResult, run: str, step_offset: int = 0) -> pd.DataFrame:
    """A run's logged rows as a DataFrame with a ``run`` column (``step_offset`` places a
    continuation, e.g. VQ-HPS-rot after VQ-HPS, on the same step axis)."""
    df = pd.DataFrame(result.history)
    if df.empty:
        return df
    return df.assign(run=run, step=df["step"] + step_offset)


#: (column or tuple of columns, axis label) of the learning-curve panels
CURVE_PANELS = ((("ce", "val_token_ce"), "token cross-entropy (nats)"), ("rot_err_deg", "rotation error (deg)"),
                ("rot_err_up_to_turn_deg", "rotation error up to a turn (deg)"),
                ("reproj", "reprojection L1"), ("val_PVE", "validation PVE (mm)"))


def learning_curves_figure(curves: pd.DataFrame, panels=CURVE_PANELS,
                           references: Mapping[str, Mapping[str, float]] | None = None):
    """One panel per entry of ``panels`` (a logged column, or a tuple of columns drawn together),
    one line per run and column, against step. ``references`` {column: {label: value}} adds a
    dashed horizontal line to each panel showing that column (e.g. the training tokens' marginal
    entropy beside ``val_token_ce``)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (cols, label) in zip(axes[0], panels):
        cols = (cols,) if isinstance(cols, str) else tuple(cols)
        for run, df in curves.groupby("run", sort=False):
            for col in cols:
                if col in df.columns and df[col].notna().any():
                    d = df[["step", col]].dropna()
                    ax.plot(d["step"], d[col], marker="o" if len(d) < 12 else None, ms=3,
                            label=run if len(cols) == 1 else f"{run} {col}")
        for col in cols:
            for ref_label, value in (references or {}).get(col, {}).items():
                ax.axhline(value, color="0.3", ls="--", lw=1, label=f"{ref_label} ({value:.2f})")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
