"""The fused Triton mesh convolution (vqhps.mesh.fused) agrees with the reference forward.

Run on the CPU through Triton's interpreter: TRITON_INTERPRET=1 is read when a kernel is defined, so
the check runs in a child process with it set. Covers same-level convs (residual folded in as the
vertex itself, with and without a channel map), pool/unpool-like layers (residual weights), inputs in
the (N, B, C)-contiguous layout the layers return, cache invalidation, and that autograd keeps the
reference path; and that training through the fused kernels (VQHPS_FUSED_TRAIN=1) gives the reference
path's outputs and gradients, for single layers and for a whole encoder and decoder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _counting(name: str) -> str:
    """Child-script prelude: ``calls`` grows by one at every call of ``vqhps.mesh.fused.<name>``."""
    return f'''
import os
import torch
import vqhps.mesh.fused as fused
from vqhps.mesh.conv import VaryingConv

calls = []
_orig = fused.{name}
def _counting(*args, **kwargs):
    calls.append(1)
    return _orig(*args, **kwargs)
fused.{name} = _counting
'''


CHILD = _counting("fused_varying_conv") + r'''

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


TRAIN_CHILD = _counting("fused_varying_conv_train") + r'''
import trimesh
from vqhps.config import VQVAEConfig
from vqhps.mesh.hierarchy import build_hierarchy
from vqhps.vqvae import MeshVQVAE

def grads(module, x, train):
    """Output and the gradients of a fixed random projection of it w.r.t. x and every parameter."""
    os.environ["VQHPS_FUSED_TRAIN"] = "1" if train else "0"
    n = len(calls)
    y = module(x)
    assert (len(calls) > n) == train, "fused training path taken: %s, expected %s" % (len(calls) > n, train)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in module.parameters() if p.requires_grad]
    return y, torch.autograd.grad((y * g).sum(), ([x] if x.requires_grad else []) + params, allow_unused=True)

def close(a, b, what):
    assert a is not None and b is not None, what
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-5 * scale, (what, (a - b).abs().max().item(), scale)

def check(module, x):
    y, g = grads(module, x, True)
    y_ref, g_ref = grads(module, x, False)
    close(y, y_ref, "output")
    assert len(g) == len(g_ref)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        if b is None:
            assert a is None or a.abs().max() == 0, i
        else:
            close(a, b, "gradient %d" % i)

torch.manual_seed(0)
N_IN, N_OUT, K = 40, 25, 5
for c_in, c_out in [(3, 32), (16, 3)]:  # widening and narrowing
    for same_level in (True, False):
        for act in (True, False):
            index = torch.randint(0, N_IN, (N_IN if same_level else N_OUT, K))
            mask = torch.rand(index.shape) > 0.25
            mask[:, 0] = True
            weight = None if same_level else torch.rand(N_OUT, K)
            layer = VaryingConv(index, mask, c_in, c_out, weight=weight, n_basis=3, residual_rate=0.5, activation=act)
            with torch.no_grad():
                layer.bias.normal_()
            # a full batch tile and a ragged second one
            check(layer, torch.randn(fused.BLOCK_B + 5, N_IN, c_in, requires_grad=True))
# a frozen layer still passes the gradient to its input (soft decoding through the frozen decoder)
layer.requires_grad_(False)
x = torch.randn(4, N_IN, 16, requires_grad=True)
for train in (False, True):
    os.environ["VQHPS_FUSED_TRAIN"] = "1" if train else "0"
    y = layer(x)
    assert y.requires_grad, "frozen layer cut the gradient to its input (fused training %s)" % train
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    os.environ["VQHPS_FUSED_TRAIN"] = "0"
    with torch.no_grad():
        assert layer(x).requires_grad is False  # inference without autograd keeps the fused kernel
    if train:
        close(dx, dx_ref, "input gradient through a frozen layer")
    dx_ref = dx
# a whole encoder and decoder on a small hierarchy, bottleneck layers (all-to-all) included
sphere = trimesh.creation.icosphere(subdivisions=1)
hierarchy = build_hierarchy(sphere.vertices, sphere.faces, level_sizes=(24, 12, 6), bottom_size=6)
model = MeshVQVAE(torch.as_tensor(sphere.vertices, dtype=torch.float32), hierarchy,
                  VQVAEConfig(channels=(4, 8, 8), latent_dim=3, codebook_size=8, bottleneck_layers=1,
                              readout_hidden=16))
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))  # the bottleneck layers start with zero coefficients
x = torch.randn(3, hierarchy.sizes[0], 3)
check(model.encoder, x)
check(model.decoder, torch.randn(3, hierarchy.sizes[-1], 3, requires_grad=True))
print("OK", len(calls))
'''


def _run_interpreted(script: str, **env_vars: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", **env_vars,
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def test_fused_conv_matches_reference_under_interpreter():
    assert _run_interpreted(CHILD, VQHPS_FUSED_CONV="1").startswith("OK")


def test_fused_training_matches_reference_gradients_under_interpreter():
    assert _run_interpreted(TRAIN_CHILD).startswith("OK")


def test_reverse_graph_lists_each_real_reader_once():
    import torch

    from vqhps.mesh import fused

    # output vertex v reads index[v, k]; (1, 2) is padding and must not appear
    index = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 3]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    table, counts = fused.reverse_graph(index, mask, n_in=5)
    readers = {u: sorted(table[u, :counts[u]].tolist()) for u in range(5)}
    # flat position v * 3 + k of every real entry reading u
    assert readers == {0: [0, 7], 1: [1, 6], 2: [2, 3, 4], 3: [8], 4: []}


def test_fused_not_available_for_cpu_without_interpreter(monkeypatch):
    import torch

    from vqhps.mesh import fused

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused.available(torch.zeros(1, 2, 3))


def test_dot_precision_switches_for_a_block_and_refuses_unknown_values():
    from vqhps.mesh import fused

    assert fused.INPUT_PRECISION == "ieee"
    with fused.dot_precision("tf32x3"):
        assert fused.INPUT_PRECISION == "tf32x3"
    assert fused.INPUT_PRECISION == "ieee"
    with pytest.raises(ValueError, match="tf32x3"):
        with fused.dot_precision("fp16"):
            pass
    assert fused.INPUT_PRECISION == "ieee"
