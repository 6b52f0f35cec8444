"""Mesh-VQ-VAE (paper Sec. 4.1): a fully convolutional mesh autoencoder whose latent (N=54 vectors of
d=9 at the bottom level of the mesh hierarchy) is quantised with an EMA codebook of S=512 entries.

Inputs are canonical meshes (B, V, 3) in metres, centred on their vertex mean. Internally the network
sees ``(verts - template) / scale`` (template centred on its mean, ``scale`` its RMS radius), so the
layers work on unit-size offsets whatever the body model; reconstructions and losses are in metres.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vqhps.config import VQVAEConfig
from vqhps.mesh.conv import MeshConv, MeshPool, MeshUnpool
from vqhps.mesh.hierarchy import MeshHierarchy


#: config fields that define the weights (the rest only says how they were trained)
ARCHITECTURE_FIELDS = ("channels", "latent_dim", "codebook_size", "n_basis", "residual_rate", "bottleneck_layers",
                       "linear_readout", "readout_hidden", "readout_layers", "linear_encoder")


# ------------------------------------------------------------------------- quantiser
@dataclass
class Quantized:
    """Output of :class:`EMAQuantizer`: straight-through codes, ids, commitment loss, batch stats."""

    zq: Tensor
    ids: Tensor
    loss: Tensor
    perplexity: Tensor
    counts: Tensor
    #: codes restarted by this forward (a 0-d tensor on the device: reading it waits for the GPU)
    n_restarted: Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class EMAQuantizer(nn.Module):
    """Vector quantiser with an exponential-moving-average codebook (van den Oord et al. 2017).

    Training-mode forwards update the codebook: ``cluster_size`` and ``embed_sum`` follow EMAs of the
    assignment counts and sums, ``embed = embed_sum / laplace(cluster_size)``. Codes whose EMA usage
    fraction ``cluster_size / sum(cluster_size)`` falls below ``dead_code_threshold`` are restarted on
    random current inputs (torch's RNG; a threshold of 0 restarts nothing). The codebook starts from random inputs of the first training
    batch unless :meth:`set_codebook` was called. Only the commitment loss reaches the encoder.
    A training forward never waits for the GPU (no host synchronisation after the first batch), so the
    host queues the decoder while the GPU still runs the encoder.
    """

    def __init__(self, codebook_size: int = 512, dim: int = 9, decay: float = 0.99, commitment: float = 0.25,
                 dead_code_threshold: float = 1e-3, eps: float = 1e-5) -> None:
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.commitment = decay, commitment
        self.dead_code_threshold, self.eps = dead_code_threshold, eps
        embed = torch.randn(codebook_size, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initialised", torch.tensor(False))
        self._known_initialised = False  # host copy of ``initialised`` once it was read as True

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._known_initialised = False
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------ codebook state
    @torch.no_grad()
    def set_codebook(self, embed: Tensor) -> None:
        """Set the codes (K, D) and reset the EMA state to one assignment per code."""
        self.embed.copy_(embed)
        self.embed_sum.copy_(embed)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    def usage(self) -> Tensor:
        """EMA usage fraction of every code (K,), summing to 1."""
        return self.cluster_size / self.cluster_size.sum().clamp(min=1e-12)

    def codebook_perplexity(self) -> Tensor:
        """exp(entropy) of the EMA usage: the effective number of codes in use."""
        return _perplexity(self.usage())

    # ------------------------------------------------------------ quantisation
    def nearest(self, z: Tensor) -> Tensor:
        """Index of the nearest code of every vector ``z`` (..., D) (ties: lowest index)."""
        flat = z.detach().float().reshape(-1, self.dim)
        e = self.embed.float()
        d = flat.square().sum(1, keepdim=True) - 2.0 * flat @ e.t() + e.square().sum(1)
        return d.argmin(dim=1).reshape(z.shape[:-1])

    def forward(self, z: Tensor) -> Quantized:
        """Quantise ``z`` (..., D); in training mode also update the codebook."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().reshape(-1, self.dim)
            if self.training and not self._known_initialised:
                if not bool(self.initialised):
                    self._init_from(flat.detach())
                self._known_initialised = True
            ids = self.nearest(flat)
            zq = F.embedding(ids, self.embed).detach()
            counts = _code_counts(ids, self.codebook_size)
            n_restarted = counts.new_zeros((), dtype=torch.long)
            if self.training:
                self._ema_update(flat.detach(), ids, counts)
                if self.dead_code_threshold > 0:
                    n_restarted = self._restart_dead(flat.detach())
            loss = self.commitment * F.mse_loss(flat, zq)
            perplexity = _perplexity(counts / counts.sum().clamp(min=1.0))
        zq = zq.reshape(z.shape).to(z.dtype)
        zq_st = z + (zq - z).detach()
        return Quantized(zq=zq_st, ids=ids.reshape(z.shape[:-1]), loss=loss, perplexity=perplexity,
                         counts=counts, n_restarted=n_restarted)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, ids: Tensor, counts: Tensor) -> None:
        sums = torch.zeros_like(self.embed_sum).index_add_(0, ids, flat)
        if _distributed():
            counts = counts.clone()  # the batch's own counts stay this rank's
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.embed.copy_(self.embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead(self, flat: Tensor) -> Tensor:
        """Restart dead codes on distinct random inputs (where possible); returns how many. Masked
        rather than indexed, so that the host never needs the count."""
        dead = self.usage() < self.dead_code_threshold
        fresh = flat[_sample_rows(len(flat), self.codebook_size, flat.device)]
        mean_size = self.cluster_size.sum() / self.codebook_size
        self.embed.copy_(torch.where(dead[:, None], fresh, self.embed))
        self.cluster_size.copy_(torch.where(dead, mean_size, self.cluster_size))
        self.embed_sum.copy_(torch.where(dead[:, None], fresh * mean_size, self.embed_sum))
        self._broadcast()
        return dead.sum()

    @torch.no_grad()
    def _init_from(self, flat: Tensor) -> None:
        self.set_codebook(flat[_sample_rows(len(flat), self.codebook_size, flat.device)])
        self._broadcast()

    def _broadcast(self) -> None:
        """Rank 0's codebook everywhere (restarts draw different samples on every rank)."""
        if _distributed():
            for buf in (self.embed, self.embed_sum, self.cluster_size):
                dist.broadcast(buf, src=0)


def _sample_rows(n: int, k: int, device: torch.device) -> Tensor:
    """``k`` row indices out of ``n`` drawn on ``device``: without replacement when possible."""
    if n >= k:
        return torch.randperm(n, device=device)[:k]
    return torch.randint(0, n, (k,), device=device)


def _code_counts(ids: Tensor, codebook_size: int) -> Tensor:
    """Assignments per code (K,) as floats; unlike ``torch.bincount`` on CUDA, which reads the
    largest id back to the host, it never waits for the GPU."""
    flat = ids.reshape(-1)
    return torch.zeros(codebook_size, device=ids.device).index_add_(0, flat, torch.ones(flat.shape, device=ids.device))


def _perplexity(p: Tensor) -> Tensor:
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


# ------------------------------------------------------------------------- encoder / decoder
def bottleneck_conv(n_vertices: int, in_channels: int, out_channels: int, **kwargs) -> MeshConv:
    """A convolution at the bottom level whose neighbourhood is every bottom vertex: each token reads
    all the others, so information can move between body parts before (and after) quantisation."""
    index = torch.arange(n_vertices).expand(n_vertices, n_vertices)
    conv = MeshConv(index, torch.ones(n_vertices, n_vertices, dtype=torch.bool), in_channels, out_channels, **kwargs)
    with torch.no_grad():  # starts as its residual path alone: random all-to-all mixing would scramble the tokens
        conv.coeff.zero_()
    return conv


def level_widths(channels: tuple[int, ...], latent_dim: int, bottleneck_layers: int) -> list[int]:
    """Channels at the full mesh and at each pooled level: the bottom level carries the latent itself,
    or the last width when bottleneck layers map it to the latent there."""
    return list(channels) + [channels[-1] if bottleneck_layers else latent_dim]


class MeshEncoder(nn.Module):
    """3 -> channels[0] conv on the full mesh, then one pool per level down to the bottom vertices,
    then ``bottleneck_layers`` all-to-all convolutions there; the last layer outputs ``latent_dim``.
    ELU after every layer, the latent included. With ``linear_encoder``, a linear map from every vertex
    offset at once to all latent values is added to that output."""

    def __init__(self, hierarchy: MeshHierarchy, channels: tuple[int, ...], latent_dim: int, n_basis: int,
                 residual_rate: float, bottleneck_layers: int = 0, linear_encoder: bool = False) -> None:
        super().__init__()
        n_latent = hierarchy.sizes[-1] * latent_dim
        self.linear = zero_linear(3 * hierarchy.sizes[0], n_latent) if linear_encoder else None
        widths = level_widths(channels, latent_dim, bottleneck_layers)
        kw = dict(n_basis=n_basis, residual_rate=residual_rate)
        self.layers = nn.ModuleList([MeshConv.at_level(hierarchy, 0, 3, widths[0], **kw)])
        for level in range(hierarchy.n_levels):
            self.layers.append(MeshPool.between(hierarchy, level, widths[level], widths[level + 1], **kw))
        for i in range(bottleneck_layers):
            out = latent_dim if i == bottleneck_layers - 1 else channels[-1]
            self.layers.append(bottleneck_conv(hierarchy.sizes[-1], channels[-1], out, **kw))

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self.layers:
            out = layer(out)
        if self.linear is not None:
            out = out + self.linear(x.flatten(1)).unflatten(1, out.shape[1:])
        return out


class MeshDecoder(nn.Module):
    """Mirror of :class:`MeshEncoder`: ``bottleneck_layers`` all-to-all convolutions at the bottom, one
    unpool per level up to the full mesh, then a conv to 3 channels without activation. With
    ``linear_readout``, a map from all tokens at once to every vertex is added to that output: linear,
    or with ``readout_hidden`` > 0 an MLP with ``readout_layers`` hidden layers of that width."""

    def __init__(self, hierarchy: MeshHierarchy, channels: tuple[int, ...], latent_dim: int, n_basis: int,
                 residual_rate: float, bottleneck_layers: int = 0, linear_readout: bool = False,
                 readout_hidden: int = 0, readout_layers: int = 1) -> None:
        super().__init__()
        n_latent = hierarchy.sizes[-1] * latent_dim
        self.readout = (global_readout(n_latent, 3 * hierarchy.sizes[0], readout_hidden, readout_layers)
                        if linear_readout else None)
        widths = level_widths(channels, latent_dim, bottleneck_layers)
        kw = dict(n_basis=n_basis, residual_rate=residual_rate)
        self.layers = nn.ModuleList([
            bottleneck_conv(hierarchy.sizes[-1], latent_dim if i == 0 else channels[-1], channels[-1], **kw)
            for i in range(bottleneck_layers)
        ])
        self.layers.extend(
            MeshUnpool.between(hierarchy, level, widths[level + 1], widths[level], **kw)
            for level in reversed(range(hierarchy.n_levels))
        )
        self.layers.append(MeshConv.at_level(hierarchy, 0, widths[0], 3, activation=False, **kw))

    def forward(self, z: Tensor) -> Tensor:
        out = z
        for layer in self.layers:
            out = layer(out)
        if self.readout is not None:
            out = out + self.readout(z.flatten(1)).unflatten(1, (-1, 3))
        return out


def global_readout(n_latent: int, n_out: int, hidden: int = 0, layers: int = 1) -> nn.Module:
    """All latent values -> every vertex offset: :func:`zero_linear`, or with ``hidden`` > 0 a GELU MLP
    of ``layers`` hidden layers whose last layer is zero-initialised, so that the decoder still starts
    as its convolutions alone."""
    if hidden <= 0:
        return zero_linear(n_latent, n_out)
    if layers < 1:
        raise ValueError(f"vqvae.readout_layers must be at least 1 with readout_hidden > 0, got {layers}")
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks += [nn.Linear(n_latent if i == 0 else hidden, hidden), nn.GELU()]
    return nn.Sequential(*blocks, zero_linear(hidden, n_out))


def zero_linear(n_in: int, n_out: int) -> nn.Linear:
    """A global linear path (all latent values <-> every vertex offset) beside the convolutions' local
    one, zero-initialised so that the network starts as its convolutions alone."""
    layer = nn.Linear(n_in, n_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# ------------------------------------------------------------------------- the model
class MeshVQVAE(nn.Module):
    """Mesh-VQ-VAE on one template mesh and its hierarchy.

    ``forward(verts)`` -> dict(recon (B, V, 3), ids (B, N) long, loss, recon_loss (mean per-vertex
    Euclidean distance, metres), vq_loss (commitment), perplexity (of this batch's code usage)).
    """

    def __init__(self, template: Tensor, hierarchy: MeshHierarchy, cfg: VQVAEConfig | None = None,
                 body_id: str = "unknown") -> None:
        super().__init__()
        cfg = cfg if cfg is not None else VQVAEConfig()
        template = torch.as_tensor(template, dtype=torch.float32)
        if template.ndim != 2 or template.shape[1] != 3 or template.shape[0] != hierarchy.sizes[0]:
            raise ValueError(f"template {tuple(template.shape)} does not match the hierarchy's "
                             f"{hierarchy.sizes[0]} vertices")
        if len(cfg.channels) != hierarchy.n_levels:
            raise ValueError(f"cfg.channels {cfg.channels} needs one width per hierarchy level below the "
                             f"mesh; the hierarchy has {hierarchy.n_levels} ({hierarchy.sizes})")
        self.cfg, self.body_id, self.hierarchy_hash = cfg, body_id, hierarchy.hash
        centred = template - template.mean(dim=0)
        self.register_buffer("template", centred)
        self.register_buffer("scale", centred.square().sum(1).mean().sqrt().clamp(min=1e-8))
        args = (hierarchy, tuple(cfg.channels), cfg.latent_dim, cfg.n_basis, cfg.residual_rate, cfg.bottleneck_layers)
        self.encoder = MeshEncoder(*args, linear_encoder=cfg.linear_encoder)
        self.decoder = MeshDecoder(*args, linear_readout=cfg.linear_readout, readout_hidden=cfg.readout_hidden,
                                   readout_layers=cfg.readout_layers)
        self.quantizer = EMAQuantizer(cfg.codebook_size, cfg.latent_dim, cfg.ema_decay, cfg.commitment,
                                      cfg.dead_code_threshold)
        self._n_tokens = hierarchy.sizes[-1]

    # ------------------------------------------------------------ properties
    @property
    def codebook(self) -> Tensor:
        """The codes (S, d)."""
        return self.quantizer.embed

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def n_vertices(self) -> int:
        return int(self.template.shape[0])

    # ------------------------------------------------------------ encode / decode
    def encode_latent(self, verts: Tensor) -> Tensor:
        """Canonical meshes (B, V, 3) -> continuous latent (B, N, d), before quantisation."""
        x = (verts.to(self.template.dtype) - self.template) / self.scale
        return self.encoder(x)

    @torch.no_grad()
    def encode(self, verts: Tensor) -> Tensor:
        """Canonical meshes (B, V, 3) -> token ids (B, N) long (never updates the codebook)."""
        return self.quantizer.nearest(self.encode_latent(verts))

    def decode_latent(self, zq: Tensor) -> Tensor:
        """Latent vectors (B, N, d) -> meshes (B, V, 3); differentiable (soft decoding)."""
        out = self.decoder(zq)
        return self.template + self.scale * out.to(self.template.dtype)

    def decode(self, ids: Tensor) -> Tensor:
        """Token ids (B, N) -> meshes (B, V, 3)."""
        return self.decode_latent(F.embedding(ids.long(), self.codebook))

    def forward(self, verts: Tensor) -> dict[str, Tensor]:
        z = self.encode_latent(verts)
        q = self.quantizer(z)
        recon = self.decode_latent(q.zq)
        recon_loss = torch.linalg.vector_norm(recon.float() - verts.float(), dim=-1).mean()
        return {"recon": recon, "ids": q.ids, "loss": recon_loss + q.loss, "recon_loss": recon_loss,
                "vq_loss": q.loss, "perplexity": q.perplexity,
                "n_restarted": q.n_restarted}

    # ------------------------------------------------------------ bookkeeping
    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint of this model records: body id, hierarchy hash, the whole config and,
        separately, the fields that fix the weights' shapes and meaning (``architecture``: expect
        this rather than ``config`` to accept checkpoints trained with other lr/steps/batch sizes)."""
        config = asdict(self.cfg)
        return {"kind": "mesh_vqvae", "body_id": self.body_id, "hierarchy_hash": self.hierarchy_hash,
                "architecture": {k: config[k] for k in ARCHITECTURE_FIELDS}, "config": config,
                "n_vertices": self.n_vertices, "n_tokens": self.n_tokens, "codebook_size": self.codebook_size}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["EMAQuantizer", "MeshDecoder", "MeshEncoder", "MeshVQVAE", "Quantized", "bottleneck_conv", "count_parameters",
           "global_readout", "zero_linear"]
