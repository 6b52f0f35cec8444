"""PVE / MPJPE / PA-MPJPE in mm under the vertex-mean centring protocol, and the summary table."""
import numpy as np
import pandas as pd
import pytest
import torch

from vqhps.geometry import random_rotations
from vqhps.metrics import evaluate_meshes, joints_from_centred, mpjpe, pa_mpjpe, pve, summarise


def _regressor(n_joints: int, n_verts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n_joints, n_verts, generator=g) * 2, dim=-1)  # rows sum to 1


def test_translated_copy_has_zero_error():
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(3, 50, 3, generator=g)
    pred = gt + torch.tensor([0.3, -1.0, 2.0])
    assert torch.allclose(pve(pred, gt), torch.zeros(3, dtype=torch.float64), atol=1e-3)
    res = evaluate_meshes(pred, gt, _regressor(17, 50))
    for key in ("PVE", "MPJPE", "PA-MPJPE"):
        assert np.allclose(res[key], 0.0, atol=1e-3), key


def test_pve_of_one_moved_vertex_hand_computed():
    # 4 vertices, vertex 0 moved by 4 cm along x. After centring the offset is d*(e_0 - 1/4):
    # vertex 0 is off by 3 cm, the other three by 1 cm -> mean 1.5 cm = 15 mm.
    gt = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    pred = gt.clone()
    pred[0, 0, 0] += 0.04
    assert torch.allclose(pve(pred, gt), torch.tensor([15.0], dtype=torch.float64), atol=1e-4)


def test_mpjpe_hand_computed_and_uses_centred_meshes():
    gt_j = torch.zeros(1, 2, 3)
    pred_j = torch.tensor([[[0.003, 0.004, 0.0], [0.0, 0.0, 0.01]]])  # 5 mm and 10 mm
    assert torch.allclose(mpjpe(pred_j, gt_j), torch.tensor([7.5], dtype=torch.float64), atol=1e-6)
    # evaluate_meshes: a one-vertex regressor; moving that vertex by 4 cm of 4 gives 30 mm after centring
    gt = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    pred = gt.clone()
    pred[0, 0, 0] += 0.04
    reg = torch.zeros(1, 4)
    reg[0, 0] = 1.0
    res = evaluate_meshes(pred + 5.0, gt, reg)
    assert np.allclose(res["MPJPE"], 30.0, atol=1e-4)
    assert np.allclose(res["PVE"], 15.0, atol=1e-4)


def test_pa_mpjpe_invariant_to_similarity_and_below_mpjpe():
    g = torch.Generator().manual_seed(1)
    gt = torch.randn(6, 17, 3, generator=g, dtype=torch.float64) * 0.3
    pred = gt + torch.randn(6, 17, 3, generator=g, dtype=torch.float64) * 0.02
    base = pa_mpjpe(pred, gt)
    R = random_rotations(6, generator=g, dtype=torch.float64)
    s = torch.rand(6, 1, 1, generator=g, dtype=torch.float64) * 2 + 0.3
    t = torch.randn(6, 1, 3, generator=g, dtype=torch.float64)
    moved = s * pred @ R.transpose(-1, -2) + t
    assert torch.allclose(pa_mpjpe(moved, gt), base, atol=1e-8)
    assert (base <= mpjpe(pred, gt) + 1e-9).all()
    assert (base > 0).all()


def test_joints_from_centred_ignores_translation():
    g = torch.Generator().manual_seed(2)
    verts = torch.randn(2, 30, 3, generator=g)
    reg = _regressor(17, 30)
    j = joints_from_centred(verts, reg)
    assert torch.allclose(j, joints_from_centred(verts + 3.0, reg), atol=1e-6)
    assert j.shape == (2, 17, 3)


def test_evaluate_and_summarise_full_and_valid_rows():
    g = torch.Generator().manual_seed(3)
    gt = torch.randn(5, 40, 3, generator=g) * 0.3
    pred = gt + torch.randn(5, 40, 3, generator=g) * torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05])[:, None, None]
    valid = torch.tensor([True, False, True, False, True])
    res = evaluate_meshes(pred, gt, _regressor(17, 40), valid_mask=valid)
    df = pd.DataFrame(res)
    table = summarise(df)
    assert list(table.index) == ["full", "valid"]
    assert list(table.columns) == ["PVE", "MPJPE", "PA-MPJPE"]
    for col in table.columns:
        assert table.loc["full", col] == pytest.approx(res[col].mean())
        assert table.loc["valid", col] == pytest.approx(res[col][valid.numpy()].mean())
    assert table.loc["valid", "PVE"] != pytest.approx(table.loc["full", "PVE"])
    no_flag = summarise(df.drop(columns="valid"))
    assert no_flag.loc["valid", "MPJPE"] == pytest.approx(no_flag.loc["full", "MPJPE"])
    assert evaluate_meshes(pred, gt, _regressor(17, 40))["valid"].all()
