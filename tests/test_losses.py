"""Token cross-entropy, rotation MSE, weak-perspective reprojection L1 and per-vertex L2."""
import math

import torch
import torch.nn.functional as F

from vqhps.geometry import axis_angle_to_matrix, random_rotations, weak_perspective_project
from vqhps.losses import reprojection_l1, rotation_mse, token_cross_entropy, vertex_l2


def test_token_cross_entropy_matches_torch_and_hand_value():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]])  # (B=1, N=2, S=3)
    ids = torch.tensor([[0, 1]])
    expected_hand = -0.5 * (math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(math.e / (1 + math.e + math.exp(3))))
    got = token_cross_entropy(logits, ids)
    assert torch.isclose(got, torch.tensor(expected_hand), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3, 54, 16, generator=g)
    big_ids = torch.randint(0, 16, (3, 54), generator=g)
    assert torch.isclose(token_cross_entropy(big, big_ids), F.cross_entropy(big.permute(0, 2, 1), big_ids))


def test_rotation_mse_hand_value():
    R90 = axis_angle_to_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]]))
    # R90 - I = [[-1,-1,0],[1,-1,0],[0,0,0]] -> 4 squared units over 9 entries
    assert torch.isclose(rotation_mse(R90, torch.eye(3)[None]), torch.tensor(4.0 / 9.0), atol=1e-6)
    assert rotation_mse(R90, R90) == 0


def _joints(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    j3d = torch.randn(4, 24, 3, generator=g) * 0.4 @ random_rotations(4, generator=g).transpose(-1, -2)
    cam = torch.cat((torch.rand(4, 1, generator=g) + 0.5, torch.randn(4, 2, generator=g) * 0.1), dim=1)
    return j3d, cam, weak_perspective_project(j3d, cam)


def test_reprojection_of_ground_truth_is_zero_and_offset_is_measured():
    j3d, cam, j2d = _joints()
    assert reprojection_l1(j3d, cam, j2d) < 1e-6
    shifted = j2d + torch.tensor([0.1, -0.3])  # |0.1| and |0.3| -> mean 0.2
    assert torch.isclose(reprojection_l1(j3d, cam, shifted), torch.tensor(0.2), atol=1e-6)
    wrong_cam = cam * torch.tensor([1.5, 1.0, 1.0])
    assert reprojection_l1(j3d, wrong_cam, j2d) > 0.01


def test_reprojection_weight_masks_joints():
    j3d, cam, j2d = _joints(1)
    corrupted = j2d.clone()
    corrupted[:, 5] += 10.0
    weight = torch.ones(4, 24)
    weight[:, 5] = 0.0
    assert reprojection_l1(j3d, cam, corrupted, weight) < 1e-6
    assert reprojection_l1(j3d, cam, corrupted, weight[..., None]) < 1e-6
    assert reprojection_l1(j3d, cam, corrupted) > 0.1
    ones = torch.ones(4, 24)
    assert torch.isclose(reprojection_l1(j3d, cam, corrupted, ones), reprojection_l1(j3d, cam, corrupted))


def test_reprojection_gradient_reaches_camera_and_joints():
    j3d, cam, j2d = _joints(2)
    j3d = (j3d + 0.05).requires_grad_()
    cam = cam.clone().requires_grad_()
    reprojection_l1(j3d, cam, j2d).backward()
    assert cam.grad.abs().sum() > 0 and j3d.grad[..., :2].abs().sum() > 0
    assert j3d.grad[..., 2].abs().sum() == 0  # depth is invisible to an orthographic camera


def test_vertex_l2_hand_value():
    gt = torch.zeros(1, 2, 3)
    pred = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]])
    assert torch.isclose(vertex_l2(pred, gt), torch.tensor(3.0))
