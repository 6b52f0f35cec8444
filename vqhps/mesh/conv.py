"""Spatially varying mesh convolution (Zhou et al. 2020, "Fully convolutional mesh autoencoder using
efficient spatially varying kernels") and the pooling / unpooling layers built on it.

Each layer has a basis of ``n_basis`` weight matrices shared by all vertices and, for every output
vertex and each of its (padded) neighbours, ``n_basis`` mixing coefficients:

    y[b, v] = bias + sum_k sum_m coeff[v, k, m] * x[b, nbr[v, k]] @ basis[m]

Every layer mixes its output with a fixed residual path: ``conv(x) * sqrt(1 - r) + residual(x) * sqrt(r)``.

Computation: the per-neighbour kernels W[v, k] = sum_m coeff[v, k, m] basis[m] (plus the residual's
fixed weight times its channel map) are formed once per call (they do not depend on the batch), the
input is gathered once into (B, N_out, K * C_in), and one batched matmul over vertices gives
(N_out, B, C_out) on tensor cores. Neither the (N_out, B, C_in * m) basis responses nor a separate
residual gather are materialised, which is what bounds the speed of this layer; no loop over vertices.
Without autograd, fp32 inputs on CUDA take a fused Triton kernel (:mod:`vqhps.mesh.fused`) that reads
neighbours in place instead of materialising the gather, with the same-level residual folded in as one
more neighbour (the vertex itself); ``VQHPS_FUSED_CONV=0`` turns it off. ``VQHPS_FUSED_TRAIN=1`` trains
through fused kernels too (forward and backward, :func:`vqhps.mesh.fused.fused_varying_conv_train`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqhps.mesh import fused
from vqhps.mesh.hierarchy import MeshHierarchy


class VaryingConv(nn.Module):
    """Spatially varying convolution over a padded neighbourhood graph, with residual mixing.

    ``index`` (N_out, K) long: input vertices read by each output vertex; ``mask`` (N_out, K) bool:
    which entries are real (padding contributes nothing). ``weight`` (N_out, K): fixed averaging
    weights of the residual path; ``None`` means the residual is the input itself (same vertex set).
    A linear channel map (no bias) is added to the residual when ``in_channels != out_channels``.
    """

    def __init__(self, index: Tensor, mask: Tensor, in_channels: int, out_channels: int,
                 weight: Tensor | None = None, n_basis: int = 9, residual_rate: float = 0.5,
                 activation: bool = True) -> None:
        super().__init__()
        if index.shape != mask.shape or index.ndim != 2:
            raise ValueError(f"index {tuple(index.shape)} and mask {tuple(mask.shape)} must be equal (N, K)")
        if not 0.0 <= residual_rate <= 1.0:
            raise ValueError(f"residual_rate must lie in [0, 1], got {residual_rate}")
        mask = mask.bool()
        n_out, k = index.shape
        self.in_channels, self.out_channels, self.n_basis = in_channels, out_channels, n_basis
        self.residual_rate = float(residual_rate)
        self.activation = activation
        # padding reads the row's first real neighbour (its kernel is zero): in the backward pass, padded
        # entries then add their zeros to spread-out rows instead of all contending for vertex 0
        index = index.long()
        first_real = index.gather(1, mask.long().argmax(dim=1, keepdim=True))
        self.register_buffer("index", torch.where(mask, index, first_real), persistent=False)
        self.register_buffer("mask", mask.float(), persistent=False)
        if weight is None:
            self.register_buffer("res_weight", None, persistent=False)
        else:
            self.register_buffer("res_weight", weight.float() * mask.float(), persistent=False)

        avg_neighbours = float(mask.sum(dim=1).float().mean().clamp(min=1.0))
        self.coeff = nn.Parameter(torch.randn(n_out, k, n_basis) / (avg_neighbours * n_basis))
        # coefficients are ~1/(K m): this basis scale keeps the output variance near the input's
        std = math.sqrt(avg_neighbours * n_basis / in_channels)
        self.basis = nn.Parameter(torch.randn(n_basis, in_channels, out_channels) * std)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.channel_map = (nn.Linear(in_channels, out_channels, bias=False)
                            if in_channels != out_channels and residual_rate > 0 else None)

    @property
    def n_out(self) -> int:
        return int(self.index.shape[0])

    def _params(self) -> list[Tensor]:
        """The parameters the kernels are built from."""
        return [p for p in (self.coeff, self.basis, getattr(self.channel_map, "weight", None)) if p is not None]

    def _cache_key(self) -> tuple | None:
        """Key of the kernel caches, or None where they must not be used (autograd, compiling)."""
        params = self._params()
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return None
        amp = torch.is_autocast_enabled(self.coeff.device.type)
        return (tuple((p.data_ptr(), p._version, p.dtype) for p in params), amp,
                torch.get_autocast_dtype(self.coeff.device.type) if amp else None)

    def kernels(self) -> Tensor:
        """Per-output-vertex kernels (N_out, K * C_in, C_out), residual path folded in: rows ordered
        (neighbour, input channel) like the gathered input. Without autograd (a frozen model, or under
        ``torch.no_grad``) they are kept until a parameter changes (in-place update, reload, move)."""
        key = self._cache_key()
        if key is None:
            return self._compute_kernels()
        cached = self.__dict__.get("_kernel_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._compute_kernels().detach())
            self.__dict__["_kernel_cache"] = cached
        return cached[1]

    def fused_operands(self) -> tuple[Tensor, Tensor]:
        """(index (N_out, K'), kernels (N_out, K' * C_in, C_out)) for the fused kernel, cached like
        :meth:`kernels`: for a same-level residual, one extra neighbour (the vertex itself) whose
        kernel is sqrt(r) times the channel map, so the kernel only sums neighbours."""
        key = self._cache_key()
        cached = self.__dict__.get("_fused_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        operands = (self._fused_index().contiguous(), self._fused_kernels(self.kernels()).detach().contiguous())
        if key is not None:
            self.__dict__["_fused_cache"] = (key, operands)
        return operands

    @property
    def _self_neighbour(self) -> bool:
        """Whether the fused kernels read the vertex itself as one more neighbour: the same-level residual."""
        return self.residual_rate > 0 and self.res_weight is None

    def _fused_index(self) -> Tensor:
        """The neighbour index of the fused kernels, (N_out, K + 1) with the vertex itself appended where
        :attr:`_self_neighbour`."""
        if not self._self_neighbour:
            return self.index
        return torch.cat((self.index, torch.arange(self.n_out, device=self.index.device).unsqueeze(1)), dim=1)

    def _fused_kernels(self, w: Tensor) -> Tensor:
        """Kernels (N_out, K * C_in, C_out) extended to :meth:`_fused_index`: the vertex's own kernel is
        sqrt(r) times the channel map (or the identity)."""
        if not self._self_neighbour:
            return w
        mix = (self.channel_map.weight.t() if self.channel_map is not None
               else torch.eye(self.in_channels, device=w.device, dtype=w.dtype))
        self_w = (math.sqrt(self.residual_rate) * mix).to(w.dtype).expand(self.n_out, -1, -1)
        return torch.cat((w, self_w), dim=1)

    def _reverse_graph(self, n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        """(fused index, reverse table, counts) for training through the fused kernels, kept per input size
        and device; padded neighbours (zero kernels) are left out of the reverse graph."""
        key = (n_in, self.index.device)
        cached = self.__dict__.get("_reverse_cache")
        if cached is None or cached[0] != key:
            index, mask = self._fused_index().contiguous(), self.mask.bool()
            if self._self_neighbour:
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            cached = (key, (index, *fused.reverse_graph(index, mask, n_in)))
            self.__dict__["_reverse_cache"] = cached
        return cached[1]

    def _use_fused_training(self, x: Tensor) -> bool:
        """Fused training (VQHPS_FUSED_TRAIN=1): fp32, under autograd, not while compiling."""
        return (x.dtype == torch.float32 and self.basis.dtype == torch.float32 and torch.is_grad_enabled()
                and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()
                and fused.training_enabled(x))

    def _use_fused(self, x: Tensor) -> bool:
        """The fused kernel serves fp32 inference: where the kernel caches apply (no autograd, not
        compiling) and no gradient must reach the input (soft decoding through a frozen decoder needs
        one), no autocast, Triton there."""
        return (x.dtype == torch.float32 and self.basis.dtype == torch.float32
                and not torch.is_autocast_enabled(x.device.type) and self._cache_key() is not None
                and not (torch.is_grad_enabled() and x.requires_grad) and fused.available(x))

    def _compute_kernels(self) -> Tensor:
        n_out, k = self.index.shape
        r = self.residual_rate
        # every scale lands on the small (N_out, K, M) coefficients; the residual path joins as one more
        # basis kernel (its channel map) with the averaging weights as coefficients, so the large
        # (N_out, K, C_in, C_out) tensor is written once, by one matrix product
        coeff = self.coeff * (self.mask * math.sqrt(1.0 - r)).unsqueeze(-1)
        basis = self.basis
        if r > 0 and self.res_weight is not None:
            mix = (self.channel_map.weight.t() if self.channel_map is not None
                   else torch.eye(self.in_channels, device=basis.device, dtype=basis.dtype))
            coeff = torch.cat((coeff, (math.sqrt(r) * self.res_weight).unsqueeze(-1).to(coeff.dtype)), dim=-1)
            basis = torch.cat((basis, mix.unsqueeze(0).to(basis.dtype)), dim=0)
        w = torch.einsum("vkm,mio->vkio", coeff, basis)
        return w.reshape(n_out, k * self.in_channels, self.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N_in, C_in) -> (B, N_out, C_out). The output is a transposed view of a contiguous
        (N_out, B, C_out) tensor; the next layer's gather reads it without a copy."""
        if self._use_fused(x):
            index, w = self.fused_operands()
            bias = self.bias * math.sqrt(1.0 - self.residual_rate)
            return fused.fused_varying_conv(x, index, w, bias, self.activation)
        if self._use_fused_training(x):
            index, reverse, counts = self._reverse_graph(x.shape[1])
            w = self._fused_kernels(self.kernels())
            bias = self.bias * math.sqrt(1.0 - self.residual_rate)
            return fused.fused_varying_conv_train(x, index, reverse, counts, w, bias, self.activation)
        b, _, c_in = x.shape
        n_out, k = self.index.shape
        gathered = x.index_select(1, self.index.reshape(-1)).view(b, n_out, k * c_in)
        out = torch.bmm(gathered.transpose(0, 1), self.kernels().to(gathered.dtype)).transpose(0, 1)
        out = out + (self.bias * math.sqrt(1.0 - self.residual_rate)).to(out.dtype)
        if self.residual_rate > 0 and self.res_weight is None:  # same vertex set: the input itself
            res = x if self.channel_map is None else self.channel_map(x)
            out = out + res.to(out.dtype) * math.sqrt(self.residual_rate)
        if self.activation:
            out = F.elu(out)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, n_out={self.n_out}, K={self.index.shape[1]}, "
                f"n_basis={self.n_basis}, residual_rate={self.residual_rate}, activation={self.activation}")


class MeshConv(VaryingConv):
    """Convolution within one level: output vertices = input vertices, residual = the input."""

    def __init__(self, index: Tensor, mask: Tensor, in_channels: int, out_channels: int, n_basis: int = 9,
                 residual_rate: float = 0.5, activation: bool = True) -> None:
        super().__init__(index, mask, in_channels, out_channels, None, n_basis, residual_rate, activation)

    @classmethod
    def at_level(cls, hierarchy: MeshHierarchy, level: int, in_channels: int, out_channels: int,
                 **kwargs) -> "MeshConv":
        index, mask = hierarchy.conv_graph(level)
        return cls(index, mask, in_channels, out_channels, **kwargs)


class MeshPool(VaryingConv):
    """Down-sampling ``level -> level + 1``: each coarse vertex convolves its pool neighbourhood;
    residual = the fixed weighted average of that neighbourhood."""

    def __init__(self, index: Tensor, mask: Tensor, weight: Tensor, in_channels: int, out_channels: int,
                 n_basis: int = 9, residual_rate: float = 0.5, activation: bool = True) -> None:
        super().__init__(index, mask, in_channels, out_channels, weight, n_basis, residual_rate, activation)

    @classmethod
    def between(cls, hierarchy: MeshHierarchy, level: int, in_channels: int, out_channels: int,
                **kwargs) -> "MeshPool":
        index, mask, weight = hierarchy.pool_graph(level)
        return cls(index, mask, weight, in_channels, out_channels, **kwargs)


class MeshUnpool(VaryingConv):
    """Up-sampling ``level + 1 -> level``: each fine vertex convolves its nearest coarse vertices;
    residual = their fixed weighted average (interpolation)."""

    def __init__(self, index: Tensor, mask: Tensor, weight: Tensor, in_channels: int, out_channels: int,
                 n_basis: int = 9, residual_rate: float = 0.5, activation: bool = True) -> None:
        super().__init__(index, mask, in_channels, out_channels, weight, n_basis, residual_rate, activation)

    @classmethod
    def between(cls, hierarchy: MeshHierarchy, level: int, in_channels: int, out_channels: int,
                **kwargs) -> "MeshUnpool":
        index, mask, weight = hierarchy.unpool_graph(level)
        return cls(index, mask, weight, in_channels, out_channels, **kwargs)
