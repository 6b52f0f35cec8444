"""Mesh-VQ-VAE stages: build the model for a body, pre-train on the mesh corpus (AMASS analogue),
fine-tune on the benchmark's training meshes (3DPW analogue), reload, and measure reconstruction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .checkpoint import load_checkpoint
from .data import source
from .data.datasets import canonical_targets
from .mesh.hierarchy import build_hierarchy
from .metrics import joints_from_centred
from .train import TrainResult, device_of, device_step_indices, tf32_matmuls, train
from .vqvae import MeshVQVAE

STAGES = ("pretrain", "finetune")


def checkpoint_dir(cfg) -> Path:
    return cfg.results_dir / "checkpoints"


def body_hierarchy(cfg, body):
    """The (cached) pooling hierarchy of the body's template under ``cfg.hierarchy``."""
    h = cfg.hierarchy
    return build_hierarchy(body.template.cpu().numpy(), body.faces.cpu().numpy(), h.level_sizes,
                           h.bottom_size, h.pool_neighbours, h.max_neighbours, cache_dir=cfg.paths.cache / "hierarchy")


def build_mesh_vqvae(cfg, body) -> MeshVQVAE:
    """A fresh Mesh-VQ-VAE on the body's template, with the (cached) pooling hierarchy."""
    return MeshVQVAE(body.template.cpu(), body_hierarchy(cfg, body), cfg.vqvae, body_id=body.identifier())


def compile_for(model: MeshVQVAE, cfg, device: torch.device, inference: bool = False) -> MeshVQVAE:
    """Per cfg.runtime.compile, on CUDA: compile the encoder and decoder in place (the quantiser's
    data-dependent codebook updates stay eager; state-dict keys are unchanged). A frozen model
    (``inference``) stays eager where the fused Triton convolution serves it (vqhps.mesh.fused): it
    reads neighbours in place, which the compiled gather + matmul cannot; so does training under
    VQHPS_FUSED_TRAIN=1, whose backward is fused too."""
    from .mesh import fused

    device = torch.device(device)
    if not (cfg.runtime.compile and device.type == "cuda"):
        return model
    probe = torch.empty(0, device=device)
    if (fused.available(probe) if inference else fused.training_enabled(probe)):
        return model
    model.encoder.compile(mode=cfg.runtime.compile_mode)
    model.decoder.compile(mode=cfg.runtime.compile_mode)
    return model


def compatibility(model: MeshVQVAE) -> dict:
    """What a checkpoint must share with the model to be loaded (not the training schedule)."""
    meta = model.checkpoint_meta()
    return {k: meta[k] for k in ("body_id", "hierarchy_hash", "architecture")}


def training_loss(model, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The loss :func:`train` minimises for a batch ``{"verts": canonical meshes (B, V, 3)}``, with the
    scalars it logs."""
    out = model(batch["verts"])
    return {"loss": out["loss"], "recon_mm": 1000.0 * out["recon_loss"].detach(),
            "vq": out["vq_loss"].detach(), "perplexity": out["perplexity"].detach()}


def train_stage(cfg, body, stage: str, stop_after: int | None = None,
                train_meshes: dict[str, np.ndarray] | None = None) -> tuple[MeshVQVAE, TrainResult]:
    """Train one stage (resuming its checkpoint when present) and return the model and its log.

    ``pretrain`` streams the source's pre-training meshes (``source.PretrainStream``); ``finetune`` starts from the pre-trained weights and streams
    the benchmark's training meshes (``train_meshes``: its "pose" and "shape" arrays)."""
    if stage not in STAGES:
        raise ValueError(f"unknown Mesh-VQ-VAE stage {stage!r}; choose one of {STAGES}")
    device = device_of(cfg.runtime)
    torch.manual_seed(cfg.seed)
    model = build_mesh_vqvae(cfg, body).to(device)
    body = body.to(device)
    v = cfg.vqvae
    if stage == "pretrain":
        steps, lr = v.pretrain_steps, v.lr
        stream = source.PretrainStream(cfg, body, v.batch_size, device)  # anny corpus or AMASS
        batch_fn = lambda step: {"verts": stream.batch(step)}  # noqa: E731
    else:
        pre = load_checkpoint(checkpoint_dir(cfg) / "mesh_vqvae_pretrain.pt", expect=compatibility(model))
        model.load_state_dict(pre["model"])
        model.quantizer.dead_code_threshold = v.finetune_dead_code_threshold
        if train_meshes is None:
            raise ValueError("fine-tuning needs the benchmark's training poses and shapes (train_meshes)")
        # the whole split lives on the device: no host-to-device copy inside the step
        pose = torch.as_tensor(train_meshes["pose"], device=device)
        shape = torch.as_tensor(train_meshes["shape"], device=device)
        steps, lr = v.finetune_steps, v.finetune_lr
        indices = device_step_indices(len(pose), v.batch_size, cfg.seed, device)

        def batch_fn(step: int) -> dict[str, torch.Tensor]:
            idx = indices(step)
            return {"verts": canonical_targets(body, pose[idx], shape[idx])}
    compile_for(model, cfg, device)
    optimizer = torch.optim.Adam(parameter_groups(model, lr, v.readout_lr_scale), lr=lr, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                    total_steps=max(steps, 1),
                                                    pct_start=0.05, anneal_strategy="cos")
    runtime = dataclasses.replace(cfg.runtime, amp=cfg.runtime.amp and v.amp)
    with tf32_matmuls(v.tf32 and not runtime.amp):
        result = train(f"mesh_vqvae_{stage}", model, optimizer, scheduler, batch_fn, training_loss, steps,
                       checkpoint_dir(cfg), runtime, meta=model.checkpoint_meta(), stop_after=stop_after,
                       cuda_graph=v.cuda_graph)
    model.eval()
    return model, result


def parameter_groups(model: MeshVQVAE, lr: float, readout_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups: the decoder's global readout (when it has one) at ``readout_lr_scale`` times
    the learning rate of every other weight: each readout weight moves by about the learning rate per
    Adam step, and each vertex offset is a sum over all 486 latent values (anny's linear readout has
    19.5 M weights)."""
    readout = model.decoder.readout
    if readout is None:
        return [{"params": list(model.parameters()), "lr": lr}]
    ids = {id(p) for p in readout.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr},
            {"params": list(readout.parameters()), "lr": lr * readout_lr_scale}]


def load_mesh_vqvae(cfg, body, stage: str = "finetune", device: torch.device | str = "cpu") -> MeshVQVAE:
    """A trained Mesh-VQ-VAE; refuses a checkpoint made for another body model or hierarchy."""
    model = build_mesh_vqvae(cfg, body)
    state = load_checkpoint(checkpoint_dir(cfg) / f"mesh_vqvae_{stage}.pt", expect=compatibility(model))
    model.load_state_dict(state["model"])
    return compile_for(model.to(device).eval(), cfg, device, inference=True)


@torch.no_grad()
def reconstruct(model: MeshVQVAE, meshes: torch.Tensor, batch_size: int = 64,
                quantise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and decode canonical meshes: (reconstructions (N,V,3), token ids (N,54)).

    ``quantise=False`` decodes each mesh's continuous latent instead of its nearest codes: what the
    autoencoder gives without its codebook, so the difference of the two errors is the quantiser's."""
    device = model.template.device
    recons, ids = [], []
    for i in range(0, len(meshes), batch_size):
        x = meshes[i:i + batch_size].to(device)
        z = model.encode_latent(x)
        tok = model.quantizer.nearest(z)
        recons.append((model.decode(tok) if quantise else model.decode_latent(z)).float().cpu())
        ids.append(tok.cpu())
    return torch.cat(recons), torch.cat(ids)


def reconstruction_errors(recon: torch.Tensor, meshes: torch.Tensor, regressor17: torch.Tensor) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-mesh PVE and MPJPE (mm, both meshes centred on their vertex mean) and the mean error of each
    vertex (mm, (V,)) for the per-part and heatmap views."""
    recon, meshes = recon.double(), meshes.double()
    rc = recon - recon.mean(1, keepdim=True)
    gc = meshes - meshes.mean(1, keepdim=True)
    per_vertex = 1000.0 * torch.linalg.vector_norm(rc - gc, dim=-1)
    reg = regressor17.double().cpu()
    jerr = 1000.0 * torch.linalg.vector_norm(joints_from_centred(recon, reg) - joints_from_centred(meshes, reg), dim=-1)
    table = pd.DataFrame({"PVE": per_vertex.mean(1).numpy(), "MPJPE": jerr.mean(1).numpy()})
    return table, per_vertex.numpy()


@dataclass
class Reconstruction:
    """A Mesh-VQ-VAE's reconstruction of a set of meshes: ``summary`` holds PVE_mm and MPJPE_mm through
    the codebook and PVE_continuous_mm without it; the rest are the quantised reconstructions (N, V, 3),
    their per-vertex errors (mm, (N, V)) and token ids (N, 54)."""

    summary: dict[str, float]
    recon: torch.Tensor
    per_vertex: np.ndarray
    ids: torch.Tensor


def reconstruction_summary(model: MeshVQVAE, meshes: torch.Tensor, regressor17: torch.Tensor,
                           batch_size: int = 64) -> Reconstruction:
    """Encode and decode ``meshes`` from their nearest codes and from the continuous latent (the
    difference of the two errors is what the codebook costs)."""
    recon, ids = reconstruct(model, meshes, batch_size)
    table, per_vertex = reconstruction_errors(recon, meshes, regressor17)
    continuous, _ = reconstruct(model, meshes, batch_size, quantise=False)
    summary = {"PVE_mm": float(table.PVE.mean()), "MPJPE_mm": float(table.MPJPE.mean()),
               "PVE_continuous_mm": float(reconstruction_errors(continuous, meshes, regressor17)[0].PVE.mean())}
    return Reconstruction(summary, recon, per_vertex, ids)


def evaluation_meshes(cfg, body, corpus_meshes: int = 0, splits: tuple[str, ...] = ("test",)) -> dict[str, torch.Tensor]:
    """Canonical meshes (on the CPU) to measure reconstruction on: the benchmark's ``splits`` and, with
    ``corpus_meshes`` > 0, that many pre-training meshes (``source.pretrain_sample``)."""
    device = body.template.device
    sets = {}
    for split in splits:
        arrays = source.split_meshes(cfg, split)
        sets[split] = canonical_targets(body, torch.as_tensor(arrays["pose"]).to(device),
                                        torch.as_tensor(arrays["shape"]).to(device)).cpu()
    if corpus_meshes > 0:
        sets["corpus_train"] = source.pretrain_sample(cfg, body, corpus_meshes, device).cpu()
    return sets


def part_errors(per_vertex: np.ndarray, parts: np.ndarray, part_names: tuple[str, ...]) -> pd.Series:
    """Mean reconstruction error (mm) of each body part."""
    mean = per_vertex.mean(0)
    return pd.Series({name: float(mean[parts == p].mean()) for p, name in enumerate(part_names) if (parts == p).any()})


def linear_reconstruction_errors(train: torch.Tensor, test: torch.Tensor, ranks: tuple[int, ...]) -> pd.Series:
    """PVE (mm) of ``test`` meshes (B, V, 3) projected onto the first principal components of ``train``
    meshes, for each rank: how far a linear code of that many continuous numbers gets, a yardstick for
    the 54 x 9 latent."""
    mean = train.double().mean(0)
    _, _, vh = torch.linalg.svd((train.double() - mean).flatten(1), full_matrices=False)
    centred = (test.double() - mean).flatten(1)
    errors = {}
    for rank in ranks:
        basis = vh[:rank]
        residual = (centred - centred @ basis.t() @ basis).unflatten(1, (-1, 3))
        errors[rank] = 1000.0 * torch.linalg.vector_norm(residual, dim=-1).mean().item()
    return pd.Series(errors, name="PVE_mm").rename_axis("rank")


def code_usage(ids: torch.Tensor, codebook_size: int) -> tuple[np.ndarray, float]:
    """How often each code is used over a set of token sequences, and the usage perplexity."""
    counts = np.bincount(ids.reshape(-1).numpy(), minlength=codebook_size)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return counts, float(np.exp(-(nz * np.log(nz)).sum()))


def token_regions(model: MeshVQVAE, n_samples: int = 8, scale: float = 0.5, batch: int = 64) -> np.ndarray:
    """Which token controls each vertex: perturb one token's latent and see which vertices move most.
    The perturbations (drawn in token order, ``n_samples`` each) are decoded ``batch`` at a time."""
    device = model.template.device
    base = model.codebook[torch.zeros(1, model.n_tokens, dtype=torch.long, device=device)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.arange(model.n_tokens).repeat_interleave(n_samples)
    noise = torch.stack([torch.randn(base.shape[-1], generator=gen) for _ in range(len(tokens))]).to(device)
    with torch.no_grad():
        ref = model.decode_latent(base)
        influence = torch.zeros(model.n_tokens, model.n_vertices)
        for start in range(0, len(tokens), batch):
            t = tokens[start:start + batch]
            z = base.expand(len(t), -1, -1).clone()
            z[torch.arange(len(t)), t.to(device)] += scale * noise[start:start + batch]
            moved = torch.linalg.vector_norm(model.decode_latent(z) - ref, dim=-1).cpu()
            influence.index_add_(0, t, moved)
    return influence.argmax(0).numpy()
