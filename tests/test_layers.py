"""The regression MLP shared by the rotation/camera head, the refiner and the HMR/CLIFF regressor keeps
its hidden units alive on pooled-ResNet-like input (all positive, large common mean) under Adam,
where a plain ReLU MLP loses a large share of them within a few dozen steps."""
from __future__ import annotations

import torch
from torch import nn

from vqhps.models.layers import regression_mlp


def _train(mlp: nn.Sequential, x: torch.Tensor, y: torch.Tensor, steps: int = 40, lr: float = 1e-3):
    """Adam on a random regression; -> (fraction of units of each hidden layer with a positive
    pre-activation for some sample at the end, first loss, last loss)."""
    head = nn.Linear(mlp[-3].out_features, y.shape[1])
    opt = torch.optim.AdamW([*mlp.parameters(), *head.parameters()], lr=lr)
    pre: dict[int, torch.Tensor] = {}
    for i, lin in enumerate(m for m in mlp if isinstance(m, nn.Linear)):
        lin.register_forward_hook(lambda mod, inp, out, i=i: pre.__setitem__(i, out.detach()))
    losses = []
    for _ in range(steps):
        loss = (head(mlp(x)) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    mlp(x)
    return [float((pre[i] > 0).any(0).float().mean()) for i in sorted(pre)], losses[0], losses[-1]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(64, 512, generator=g)) * 3 + 1.0
    return x, torch.randn(64, 6, generator=g)


def test_regression_mlp_keeps_units_alive_and_learns():
    x, y = _data()
    torch.manual_seed(0)
    alive, first, last = _train(regression_mlp(512, 256), x, y)
    assert min(alive) > 0.99, alive
    assert last < 0.1 * first


def test_plain_relu_mlp_loses_units_on_the_same_input():
    """The failure the LayerNorm + GELU layout prevents (and what the test above would catch)."""
    x, y = _data()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.0), nn.Linear(256, 256), nn.ReLU(),
                          nn.Dropout(0.0))
    alive, _, _ = _train(plain, x, y)
    assert alive[0] < 0.9, alive
