"""Fused inference kernel for :class:`vqhps.mesh.conv.VaryingConv` (Triton, fp32, no autograd).

The reference forward gathers the input into (B, N_out, K * C_in) and multiplies it per vertex by
(K * C_in, C_out) kernels; the gather is tens of MB per image and bounds the decoder's speed on a GPU.
Here one program per output vertex loops over batch tiles and, for each neighbour, loads the
neighbour's rows straight from ``x`` (any strides) and accumulates ``x_tile @ W[v, k]`` in fp32, then
adds the bias and applies ELU: the gathered tensor never exists. Neighbouring vertices run
concurrently and read the same input rows, which therefore come from L2.

Training (``VQHPS_FUSED_TRAIN=1``) runs the same forward inside an autograd function whose backward
is two more kernels of the same shape: the input gradient, one program per input vertex summing
``g[v] @ W[v, k]^T`` over the (v, k) that read it (the reverse graph), and the kernel gradient, one
program per (vertex, neighbour) summing ``x[nbr]^T @ g[v]`` over the batch. Neither the gathered
input nor its gradient is materialised.

Triton is imported lazily (the kernels live in :mod:`vqhps.mesh.fused_kernels`): the package imports
where it is missing, and ``TRITON_INTERPRET=1`` (read by Triton when a kernel is defined) runs the
kernels on CPU tensors, which is how the CPU tests run them.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch
from torch import Tensor

# full fp32 products, so the fused path matches the fp32 reference (torch's default disallows TF32);
# dot_precision() switches it for a block
INPUT_PRECISION = "ieee"
PRECISIONS = ("ieee", "tf32x3", "tf32")
BLOCK_B = 64  # batch rows per tile; tl.dot needs every block dimension >= 16


def _interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1): CPU tensors may take the fused path."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels():
    """The module of jitted kernels (:mod:`vqhps.mesh.fused_kernels`), or None where Triton does not
    import (imported on first use, see module doc)."""
    try:
        from vqhps.mesh import fused_kernels
    except ImportError:
        return None
    return fused_kernels


@contextlib.contextmanager
def dot_precision(precision: str) -> Iterator[None]:
    """Run the fused kernels' products at ``precision`` for a block: "ieee" (fp32 FMA, the default),
    "tf32x3" (three TF32 tensor-core products, close to fp32) or "tf32"."""
    global INPUT_PRECISION
    if precision not in PRECISIONS:
        raise ValueError(f"unknown fused-kernel precision {precision!r}; choose one of {PRECISIONS}")
    saved, INPUT_PRECISION = INPUT_PRECISION, precision
    try:
        yield
    finally:
        INPUT_PRECISION = saved


def available(x: Tensor) -> bool:
    """Whether ``x`` may take the fused path: Triton imports, VQHPS_FUSED_CONV is not "0" (read at
    call time) and ``x`` is on CUDA, or Triton's interpreter is on (then CPU tensors run too)."""
    if os.environ.get("VQHPS_FUSED_CONV", "1") == "0":
        return False
    if not (x.is_cuda or _interpreting()):
        return False
    return _kernels() is not None


def _block(n: int) -> int:
    """Padded block size: a power of two >= 16 (the smallest tl.dot operand)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _launch_shape(c_in: int, c_out: int) -> tuple[int, int, int]:
    """(BLOCK_CI, BLOCK_CO, num_warps) of every fused kernel for these channel counts."""
    block_ci, block_co = _block(c_in), _block(c_out)
    return block_ci, block_co, 8 if block_ci * block_co >= 4096 else 4


def fused_varying_conv(x: Tensor, index: Tensor, kernels: Tensor, bias: Tensor, elu: bool) -> Tensor:
    """out[b, v] = sum_k x[b, index[v, k]] @ kernels[v, k*C_in:(k+1)*C_in] + bias, then ELU if ``elu``.

    ``x`` (B, N_in, C_in) fp32 with any strides, ``index`` (N_out, K), ``kernels`` (N_out, K*C_in, C_out),
    ``bias`` (C_out,). Returns (B, N_out, C_out): a transposed view of a contiguous (N_out, B, C_out)
    tensor, the layout of the reference forward."""
    b, _, c_in = x.shape
    n_out, k = index.shape
    c_out = kernels.shape[-1]
    if x.dtype != torch.float32 or kernels.dtype != torch.float32 or bias.dtype != torch.float32:
        raise TypeError(f"fused_varying_conv is fp32 only, got {x.dtype}, {kernels.dtype}, {bias.dtype}")
    if kernels.shape != (n_out, k * c_in, c_out):
        raise ValueError(f"kernels {tuple(kernels.shape)} do not match index {tuple(index.shape)}, C_in={c_in}")
    out = torch.empty(n_out, b, c_out, device=x.device, dtype=torch.float32)
    if b == 0 or n_out == 0:
        return out.transpose(0, 1)
    block_ci, block_co, warps = _launch_shape(c_in, c_out)
    _kernels().forward[(n_out,)](
        x, index.contiguous(), kernels.contiguous(), bias.contiguous(), out, b, c_in, c_out, k,
        x.stride(0), x.stride(1), x.stride(2), ELU=bool(elu), PRECISION=INPUT_PRECISION,
        BLOCK=BLOCK_B, BLOCK_CI=block_ci, BLOCK_CO=block_co, num_warps=warps)
    return out.transpose(0, 1)


def training_enabled(x: Tensor) -> bool:
    """Whether training convolutions on ``x`` take the fused autograd path: VQHPS_FUSED_TRAIN is "1"
    (read at call time) and the fused kernels are available for ``x``."""
    return os.environ.get("VQHPS_FUSED_TRAIN", "0") == "1" and available(x)


def reverse_graph(index: Tensor, mask: Tensor, n_in: int) -> tuple[Tensor, Tensor]:
    """For each input vertex u, the flat positions ``v * K + k`` of the real entries ``index[v, k] == u``:
    (N_in, D) long, padded with 0 after the first ``counts[u]`` entries, and counts (N_in,) int32."""
    n_out, k = index.shape
    flat = torch.arange(n_out * k, device=index.device)[mask.reshape(-1).bool()]
    src = index.reshape(-1)[flat]
    order = torch.argsort(src, stable=True)
    src, flat = src[order], flat[order]
    counts = torch.bincount(src, minlength=n_in)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(src), device=index.device) - starts[src]
    table = torch.zeros(n_in, max(int(counts.max()) if len(src) else 0, 1), dtype=torch.long, device=index.device)
    table[src, slot] = flat
    return table.contiguous(), counts.to(torch.int32).contiguous()


class _FusedConvFunction(torch.autograd.Function):
    """Fused forward, and a backward through the reverse graph (input) and per (vertex, neighbour) (kernels)."""

    @staticmethod
    def forward(ctx, x, kernels, bias, index, reverse, counts, elu):
        y = fused_varying_conv(x, index, kernels, bias, elu)
        ctx.save_for_backward(x, kernels, y, index, reverse, counts)
        ctx.elu = elu
        return y

    @staticmethod
    def backward(ctx, gy):
        x, kernels, y, index, reverse, counts = ctx.saved_tensors
        g = torch.where(y > 0, gy, gy * (y + 1.0)) if ctx.elu else gy  # ELU' from its output: 1, or e^a = y + 1
        g = g.transpose(0, 1).contiguous()  # (N_out, B, C_out)
        n_out, b, c_out = g.shape
        c_in, k = x.shape[2], index.shape[1]
        jit = _kernels()
        block_ci, block_co, warps = _launch_shape(c_in, c_out)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            n_in = x.shape[1]
            dx = torch.empty(n_in, b, c_in, device=g.device, dtype=torch.float32)
            jit.input_grad[(n_in,)](g, reverse, counts, kernels, dx, b, c_in, c_out, k, reverse.shape[1],
                                    PRECISION=INPUT_PRECISION, BLOCK=BLOCK_B, BLOCK_CI=block_ci, BLOCK_CO=block_co,
                                    num_warps=warps)
            dx = dx.transpose(0, 1)
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(kernels)
            jit.kernel_grad[(n_out, k)](x, index, g, dw, b, c_in, c_out, k, x.stride(0), x.stride(1), x.stride(2),
                                        PRECISION=INPUT_PRECISION, BLOCK=BLOCK_B, BLOCK_CI=block_ci,
                                        BLOCK_CO=block_co, num_warps=warps)
        dbias = g.sum(dim=(0, 1)) if ctx.needs_input_grad[2] else None
        return dx, dw, dbias, None, None, None, None


def fused_varying_conv_train(x: Tensor, index: Tensor, reverse: Tensor, counts: Tensor, kernels: Tensor,
                             bias: Tensor, elu: bool) -> Tensor:
    """:func:`fused_varying_conv` with gradients for ``x``, ``kernels`` and ``bias``; ``reverse`` and
    ``counts`` come from :func:`reverse_graph` of ``index``."""
    return _FusedConvFunction.apply(x, kernels.contiguous(), bias, index.contiguous(), reverse, counts, bool(elu))
