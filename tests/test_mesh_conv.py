"""Spatially varying mesh convolution: agrees with a hand-written numpy neighbour sum, ignores padded
neighbours, mixes the residual path as documented and runs under bf16 autocast."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from vqhps.mesh.conv import MeshConv, MeshPool, MeshUnpool
from vqhps.mesh.hierarchy import build_hierarchy

# 6 vertices, up to 3 neighbours each; -1 marks padding
NEIGHBOURS = np.array([[0, 1, 2], [1, 0, -1], [2, 3, 4], [3, 2, -1], [4, 5, 2], [5, 4, -1]])


def _graph() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.from_numpy(NEIGHBOURS >= 0)
    index = torch.from_numpy(np.where(NEIGHBOURS >= 0, NEIGHBOURS, 0))
    return index, mask


def _numpy_conv(x: np.ndarray, coeff: np.ndarray, basis: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """y[b, v] = bias + sum over real neighbours k and basis m of coeff[v, k, m] x[b, nbr] @ basis[m]."""
    b, n = x.shape[0], NEIGHBOURS.shape[0]
    y = np.tile(bias, (b, n, 1)).astype(np.float64)
    for v in range(n):
        for k, u in enumerate(NEIGHBOURS[v]):
            if u < 0:
                continue
            for m in range(basis.shape[0]):
                y[:, v] += coeff[v, k, m] * x[:, u] @ basis[m]
    return y


@pytest.fixture(scope="module")
def sphere_hierarchy():
    s = trimesh.creation.icosphere(subdivisions=3)
    return build_hierarchy(s.vertices, s.faces, level_sizes=(200, 100, 54))


def _pure_conv(c_in: int = 4, c_out: int = 5, n_basis: int = 3) -> MeshConv:
    index, mask = _graph()
    return MeshConv(index, mask, c_in, c_out, n_basis=n_basis, residual_rate=0.0, activation=False)


@pytest.mark.parametrize("k,m", [(0, 0), (1, 2), (2, 1)])
def test_one_hot_coefficients_select_one_neighbour_and_basis(k, m):
    torch.manual_seed(0)
    conv = _pure_conv()
    with torch.no_grad():
        conv.coeff.zero_()
        conv.coeff[:, k, m] = 1.0
    x = torch.randn(2, 6, 4)
    y = conv(x).detach().numpy()
    xn, basis = x.numpy(), conv.basis.detach().numpy()
    for v in range(6):
        u = NEIGHBOURS[v, k]
        expected = xn[:, u] @ basis[m] if u >= 0 else np.zeros((2, 5))
        np.testing.assert_allclose(y[:, v], expected, rtol=1e-5, atol=1e-5)


def test_random_coefficients_match_numpy_sum():
    torch.manual_seed(1)
    conv = _pure_conv()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, 6, 4)
    expected = _numpy_conv(x.numpy().astype(np.float64), conv.coeff.detach().double().numpy(),
                           conv.basis.detach().double().numpy(), conv.bias.detach().double().numpy())
    np.testing.assert_allclose(conv(x).detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_padded_neighbours_contribute_nothing():
    torch.manual_seed(2)
    index, mask = _graph()
    conv = MeshConv(index, mask, 4, 5, n_basis=3, residual_rate=0.0, activation=False)
    x = torch.randn(2, 6, 4)
    # padding points at vertex 0: changing it may only alter outputs of vertices that really read it
    readers = {v for v in range(6) if 0 in NEIGHBOURS[v]}
    x2 = x.clone()
    x2[:, 0] += 10.0
    changed = (conv(x2) - conv(x)).abs().amax(dim=(0, 2)) > 1e-4
    assert {int(v) for v in torch.nonzero(changed)} == readers
    # the same layer with the padded slots pointing elsewhere gives the same output
    conv_elsewhere = MeshConv(torch.where(mask, index, 5), mask, 4, 5, n_basis=3, residual_rate=0.0,
                              activation=False)
    conv_elsewhere.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv_elsewhere(x), conv(x))
    # padded slots read the row's own first neighbour, so their (zero) gradients spread over the mesh
    for v in range(6):
        real = set(index[v][mask[v]].tolist())
        assert set(conv.index[v].tolist()) == real
    # and padded coefficients receive no gradient
    conv(x).square().sum().backward()
    assert conv.coeff.grad[~mask].abs().max() == 0
    assert conv.coeff.grad[mask].abs().max() > 0


def test_residual_mixing_of_pooling(sphere_hierarchy):
    """With the conv branch silenced the output is sqrt(r) times the fixed weighted average."""
    torch.manual_seed(3)
    r = 0.3
    pool = MeshPool.between(sphere_hierarchy, 0, 6, 6, n_basis=4, residual_rate=r, activation=False)
    with torch.no_grad():
        pool.coeff.zero_()
    x = torch.randn(2, sphere_hierarchy.sizes[0], 6)
    idx, mask, w = sphere_hierarchy.pool_graph(0)
    average = (x[:, idx] * (w * mask).unsqueeze(-1)).sum(2)
    torch.testing.assert_close(pool(x), math.sqrt(r) * average, rtol=1e-5, atol=1e-5)
    # and with the residual off the silenced layer outputs just its bias
    pool.residual_rate = 0.0
    assert pool(x).abs().max() == 0


def test_layer_shapes(sphere_hierarchy):
    h = sphere_hierarchy
    x = torch.randn(2, h.sizes[1], 8)
    down = MeshPool.between(h, 1, 8, 16)
    up = MeshUnpool.between(h, 1, 16, 8)
    conv = MeshConv.at_level(h, 1, 8, 8)
    y = down(x)
    assert y.shape == (2, h.sizes[2], 16)
    assert up(y).shape == x.shape and conv(x).shape == x.shape
    assert (down(x) > -1.0).all(), "ELU output is bounded below by -1"


def test_bf16_autocast_matches_fp32(sphere_hierarchy):
    torch.manual_seed(4)
    h = sphere_hierarchy
    layers = torch.nn.Sequential(MeshConv.at_level(h, 0, 3, 16), MeshPool.between(h, 0, 16, 32),
                                 MeshUnpool.between(h, 0, 32, 16), MeshConv.at_level(h, 0, 16, 3, activation=False))
    x = torch.randn(4, h.sizes[0], 3)
    ref = layers(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layers(x)
        low.float().square().mean().backward()
    assert torch.isfinite(low).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, f"bf16 relative error {rel:.4f}"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layers.parameters())


def _reference_layer(layer, x: torch.Tensor, index, mask, weight) -> torch.Tensor:
    """The documented formula, written out per vertex in float64 (no folded kernels):
    ELU((bias + sum_k sum_m coeff x[nbr] @ basis[m]) sqrt(1 - r) + residual sqrt(r))."""
    x = x.double()
    coeff, basis = layer.coeff.detach().double(), layer.basis.detach().double()
    mix = (layer.channel_map.weight.detach().double().t() if layer.channel_map is not None
           else torch.eye(x.shape[-1], dtype=torch.float64))
    r = layer.residual_rate
    out = []
    for v in range(index.shape[0]):
        conv = layer.bias.detach().double().expand(x.shape[0], -1).clone()
        res = torch.zeros_like(conv)
        for k in range(index.shape[1]):
            if not mask[v, k]:
                continue
            xu = x[:, index[v, k]]
            conv += sum(coeff[v, k, m] * xu @ basis[m] for m in range(basis.shape[0]))
            if weight is not None:
                res += float(weight[v, k]) * xu @ mix
        if weight is None:
            res = x[:, v] @ mix
        out.append(conv * math.sqrt(1 - r) + res * math.sqrt(r))
    y = torch.stack(out, 1)
    return torch.nn.functional.elu(y) if layer.activation else y


@pytest.mark.parametrize("kind,c_in,c_out", [("conv", 5, 5), ("conv", 4, 6), ("pool", 4, 6), ("unpool", 6, 3)])
def test_layer_matches_per_vertex_formula(sphere_hierarchy, kind, c_in, c_out):
    """Folded per-vertex kernels (conv + residual path in one matmul) equal the formula written out."""
    torch.manual_seed(5)
    h = sphere_hierarchy
    if kind == "conv":
        layer = MeshConv.at_level(h, 1, c_in, c_out, n_basis=3, residual_rate=0.4)
        (index, mask), weight, n_in = h.conv_graph(1), None, h.sizes[1]
    elif kind == "pool":
        layer = MeshPool.between(h, 1, c_in, c_out, n_basis=3, residual_rate=0.4)
        index, mask, weight = h.pool_graph(1)
        n_in = h.sizes[1]
    else:
        layer = MeshUnpool.between(h, 1, c_in, c_out, n_basis=3, residual_rate=0.4)
        index, mask, weight = h.unpool_graph(1)
        n_in = h.sizes[2]
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, n_in, c_in)
    expected = _reference_layer(layer, x, index, mask, weight)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)


def test_kernels_are_reused_without_autograd_and_refreshed_when_weights_change(sphere_hierarchy):
    torch.manual_seed(6)
    layer = MeshPool.between(sphere_hierarchy, 0, 4, 6, n_basis=3, residual_rate=0.4)
    x = torch.randn(2, sphere_hierarchy.sizes[0], 4)
    with torch.no_grad():
        first = layer.kernels()
        assert layer.kernels() is first  # reused
        y = layer(x)
    torch.testing.assert_close(y, layer(x).detach())  # same as the autograd path
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().mean().backward()
    opt.step()  # in-place update of the weights
    with torch.no_grad():
        after_step = layer.kernels()
        assert after_step is not first
        torch.testing.assert_close(after_step, layer._compute_kernels())
        layer.load_state_dict({k: v * 0.5 for k, v in layer.state_dict().items()})
        torch.testing.assert_close(layer.kernels(), layer._compute_kernels())
