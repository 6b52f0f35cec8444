"""Fused inference kernel for :class:`vqhps.mesh.conv.VaryingConv` (Triton, fp32, no autograd).

The reference forward gathers the input into (B, N_out, K * C_in) and multiplies it per vertex by
(K * C_in, C_out) kernels; the gather is tens of MB per image and bounds the decoder's speed on a GPU.
Here one program per output vertex loops over batch tiles and, for each neighbour, loads the
neighbour's rows straight from ``x`` (any strides) and accumulates ``x_tile @ W[v, k]`` in fp32, then
adds the bias and applies ELU: the gathered tensor never exists. Neighbouring vertices run
concurrently and read the same input rows, which therefore come from L2.

Triton is imported lazily: the package imports where it is missing, and ``TRITON_INTERPRET=1`` (read
by Triton when a kernel is defined) runs the kernel on CPU tensors, which is how the CPU tests run it.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

# full fp32 products, so the fused path matches the fp32 reference (torch's default disallows TF32)
INPUT_PRECISION = "ieee"
BLOCK_B = 64  # batch rows per tile; tl.dot needs every block dimension >= 16


def _interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1): CPU tensors may take the fused path."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_kernel():
    """The jitted kernel, or None where Triton does not import (defined on first use, see module doc)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(x_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr, B, C_IN, C_OUT, K,
               sxb, sxn, sxc, ELU: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
        v = tl.program_id(0).to(tl.int64)
        offs_b = tl.arange(0, BLOCK)
        ci = tl.arange(0, BLOCK_CI)
        co = tl.arange(0, BLOCK_CO)
        ci_ok, co_ok = ci < C_IN, co < C_OUT
        w_mask = ci_ok[:, None] & co_ok[None, :]
        bias = tl.load(bias_ptr + co, mask=co_ok, other=0.0)
        w_base = w_ptr + v * K * C_IN * C_OUT
        for b0 in range(0, B, BLOCK):
            rows = (b0 + offs_b).to(tl.int64)
            b_ok = rows < B
            acc = tl.zeros((BLOCK, BLOCK_CO), dtype=tl.float32)
            for k in range(K):
                u = tl.load(idx_ptr + v * K + k).to(tl.int64)
                xt = tl.load(x_ptr + u * sxn + rows[:, None] * sxb + ci[None, :] * sxc,
                             mask=b_ok[:, None] & ci_ok[None, :], other=0.0)
                w = tl.load(w_base + (k * C_IN + ci[:, None]) * C_OUT + co[None, :], mask=w_mask, other=0.0)
                acc = tl.dot(xt, w, acc, input_precision=PRECISION)
            acc = acc + bias[None, :]
            if ELU:
                acc = tl.where(acc > 0, acc, tl.exp(tl.minimum(acc, 0.0)) - 1.0)
            tl.store(out_ptr + v * B * C_OUT + rows[:, None] * C_OUT + co[None, :], acc,
                     mask=b_ok[:, None] & co_ok[None, :])

    return kernel


def available(x: Tensor) -> bool:
    """Whether ``x`` may take the fused path: Triton imports, VQHPS_FUSED_CONV is not "0" (read at
    call time) and ``x`` is on CUDA, or Triton's interpreter is on (then CPU tensors run too)."""
    if os.environ.get("VQHPS_FUSED_CONV", "1") == "0":
        return False
    if not (x.is_cuda or _interpreting()):
        return False
    return _triton_kernel() is not None


def _block(n: int) -> int:
    """Padded block size: a power of two >= 16 (the smallest tl.dot operand)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


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
    block_ci, block_co = _block(c_in), _block(c_out)
    _triton_kernel()[(n_out,)](
        x, index.contiguous(), kernels.contiguous(), bias.contiguous(), out, b, c_in, c_out, k,
        x.stride(0), x.stride(1), x.stride(2), ELU=bool(elu), PRECISION=INPUT_PRECISION,
        BLOCK=BLOCK_B, BLOCK_CI=block_ci, BLOCK_CO=block_co,
        num_warps=8 if block_ci * block_co >= 4096 else 4)
    return out.transpose(0, 1)
