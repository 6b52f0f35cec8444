"""The fused Triton mesh convolution (vqhps.mesh.fused) agrees with the reference forward.

Run on the CPU through Triton's interpreter: TRITON_INTERPRET=1 is read when a kernel is defined, so
the check runs in a child process with it set. Covers same-level convs (residual folded in as the
vertex itself, with and without a channel map), pool/unpool-like layers (residual weights), inputs in
the (N, B, C)-contiguous layout the layers return, cache invalidation, and that autograd keeps the
reference path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import os
import torch
import vqhps.mesh.fused as fused
from vqhps.mesh.conv import VaryingConv

calls = []
_orig = fused.fused_varying_conv
def _counting(*args, **kwargs):
    calls.append(1)
    return _orig(*args, **kwargs)
fused.fused_varying_conv = _counting

def reference(layer, x):
    os.environ["VQHPS_FUSED_CONV"] = "0"
    try:
        return layer(x)
    finally:
        os.environ["VQHPS_FUSED_CONV"] = "1"

def check(layer, x):
    n = len(calls)
    got = layer(x)
    assert len(calls) == n + 1, "fused path not taken"
    ref = reference(layer, x)
    assert len(calls) == n + 1, "reference path took the fused kernel"
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape, got.dtype)
    assert got.stride() == ref.stride(), (got.stride(), ref.stride())
    assert got.transpose(0, 1).is_contiguous()
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= 1e-5 * scale, (err, scale)
    return got

torch.manual_seed(0)
N_IN, N_OUT, K, B = 40, 25, 5, 7
def graph(n_in, n_out):
    index = torch.randint(0, n_in, (n_out, K))
    mask = torch.rand(n_out, K) > 0.25
    mask[:, 0] = True
    return index, mask

n_checked = 0
with torch.no_grad():
    for c_in, c_out in [(3, 32), (16, 3), (16, 16), (3, 3)]:
        for same_level in (True, False):
            for act in (True, False):
                if same_level:
                    index, mask = graph(N_IN, N_IN)
                    weight, n_in = None, N_IN
                else:
                    index, mask = graph(N_IN, N_OUT)
                    weight, n_in = torch.rand(N_OUT, K), N_IN
                layer = VaryingConv(index, mask, c_in, c_out, weight=weight, n_basis=3,
                                    residual_rate=0.5, activation=act).eval()
                layer.bias.normal_()
                x = torch.randn(B, n_in, c_in)
                check(layer, x)
                x_t = torch.randn(n_in, B, c_in).transpose(0, 1)  # (N, B, C)-contiguous view
                check(layer, x_t)
                check(layer, torch.randn(B, n_in, 2 * c_in)[:, :, ::2])  # channel stride 2
                n_checked += 3
    # residual_rate 0 (no residual path), and a chain fed with the layers' own output layout
    index, mask = graph(N_IN, N_IN)
    check(VaryingConv(index, mask, 16, 32, residual_rate=0.0).eval(), torch.randn(B, N_IN, 16))
    index2, mask2 = graph(N_IN, N_OUT)
    first = VaryingConv(index, mask, 3, 16, residual_rate=0.5).eval()
    second = VaryingConv(index2, mask2, 16, 32, weight=torch.rand(N_OUT, K), residual_rate=0.5).eval()
    h = check(first, torch.randn(B, N_IN, 3))
    check(second, h)
    # a batch larger than one tile (BLOCK_B) with a ragged last tile
    check(first, torch.randn(fused.BLOCK_B + 5, N_IN, 3))
    # an in-place parameter update invalidates the cached kernels
    first.coeff.mul_(2.0)
    first.channel_map.weight.add_(1.0)
    check(first, torch.randn(B, N_IN, 3))

# autograd: parameters requiring grad keep the reference path and gradients reach coeff
n = len(calls)
layer = VaryingConv(index, mask, 16, 32, residual_rate=0.5)
layer(torch.randn(B, N_IN, 16)).square().sum().backward()
assert len(calls) == n, "fused path used under autograd"
assert layer.coeff.grad is not None and layer.coeff.grad.abs().sum() > 0
print("OK", n_checked, len(calls))
'''


def test_fused_conv_matches_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", VQHPS_FUSED_CONV="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().startswith("OK"), proc.stdout


def test_fused_not_available_for_cpu_without_interpreter(monkeypatch):
    import torch

    from vqhps.mesh import fused

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused.available(torch.zeros(1, 2, 3))
