"""Rotation representations, projections and Procrustes alignment."""
import math

import pytest
import torch

from vqhps.geometry import (heading_angle, heading_bins,
    axis_angle_to_matrix, matrix_to_axis_angle, matrix_to_quaternion, matrix_to_rot6d, perspective_project,
    random_rotations, rot6d_to_matrix, rotation_angle_deg, similarity_procrustes, weak_perspective_project,
)


def _is_rotation(R: torch.Tensor, tol: float) -> None:
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=tol)
    assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_rot6d_to_matrix_is_a_rotation_and_round_trips(dtype, tol):
    g = torch.Generator().manual_seed(0)
    R = rot6d_to_matrix(torch.randn(64, 6, generator=g, dtype=dtype))
    _is_rotation(R, tol)
    assert R.dtype == dtype
    Rs = random_rotations(64, generator=g, dtype=dtype)
    assert torch.allclose(rot6d_to_matrix(matrix_to_rot6d(Rs)), Rs, atol=tol)


def test_rot6d_vectors_become_the_first_two_columns():
    a1 = torch.tensor([0.0, 2.0, 0.0])  # along y, unnormalised
    a2 = torch.tensor([3.0, 1.0, 0.0])  # its component orthogonal to a1 is along x
    R = rot6d_to_matrix(torch.cat((a1, a2))[None])[0]
    assert torch.allclose(R[:, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(R[:, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(R[:, 2], torch.tensor([0.0, 0.0, -1.0]))


def test_axis_angle_known_rotation_and_round_trip():
    R = axis_angle_to_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=torch.float64))[0]
    assert torch.allclose(R @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                          torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12)
    g = torch.Generator().manual_seed(1)
    axis = torch.nn.functional.normalize(torch.randn(200, 3, generator=g, dtype=torch.float64), dim=-1)
    angle = torch.rand(200, 1, generator=g, dtype=torch.float64) * (math.pi - 1e-3)
    angle[:3] = torch.tensor([[0.0], [1e-9], [1e-4]], dtype=torch.float64)  # at and near zero
    aa = axis * angle
    assert torch.allclose(matrix_to_axis_angle(axis_angle_to_matrix(aa)), aa, atol=1e-9)
    Rs = random_rotations(200, generator=g, dtype=torch.float64)
    assert torch.allclose(axis_angle_to_matrix(matrix_to_axis_angle(Rs)), Rs, atol=1e-9)


def test_axis_angle_near_pi_and_gradient_at_zero():
    aa = torch.tensor([[0.0, math.pi - 1e-7, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    aa[1] *= math.pi / aa[1].norm()
    R = axis_angle_to_matrix(aa)
    back = axis_angle_to_matrix(matrix_to_axis_angle(R))
    assert torch.allclose(back, R, atol=1e-7)
    z = torch.zeros(1, 3, requires_grad=True)
    axis_angle_to_matrix(z).sum().backward()
    assert torch.isfinite(z.grad).all()
    q = matrix_to_quaternion(R)
    assert torch.allclose(q.norm(dim=-1), torch.ones(2, dtype=torch.float64))


def test_rotation_angle_deg():
    g = torch.Generator().manual_seed(2)
    axis = torch.nn.functional.normalize(torch.randn(50, 3, generator=g, dtype=torch.float64), dim=-1)
    angle = torch.rand(50, generator=g, dtype=torch.float64) * math.pi
    R1 = random_rotations(50, generator=g, dtype=torch.float64)
    R2 = R1 @ axis_angle_to_matrix(axis * angle[:, None])
    assert torch.allclose(rotation_angle_deg(R1, R2), torch.rad2deg(angle), atol=1e-8)
    assert torch.allclose(rotation_angle_deg(R2, R1), torch.rad2deg(angle), atol=1e-8)
    assert torch.allclose(rotation_angle_deg(R1, R1), torch.zeros(50, dtype=torch.float64), atol=1e-6)


def test_weak_perspective_project_hand_example():
    pts = torch.tensor([[[1.0, 2.0, 5.0], [-1.0, 0.5, -3.0]]])
    cam = torch.tensor([[2.0, 0.1, -0.2]])
    expected = torch.tensor([[[2.1, 3.8], [-1.9, 0.8]]])
    assert torch.allclose(weak_perspective_project(pts, cam), expected)


def test_perspective_project_hand_example():
    K = torch.tensor([[100.0, 0.0, 50.0], [0.0, 200.0, 60.0], [0.0, 0.0, 1.0]])
    pts = torch.tensor([[[1.0, -1.0, 2.0], [0.0, 0.0, 4.0]]])
    expected = torch.tensor([[[100.0, -40.0], [50.0, 60.0]]])
    assert torch.allclose(perspective_project(pts, K), expected)
    assert torch.allclose(perspective_project(pts, K[None]), expected)


def test_similarity_procrustes_undoes_a_similarity_transform():
    g = torch.Generator().manual_seed(3)
    gt = torch.randn(5, 17, 3, generator=g, dtype=torch.float64)
    R = random_rotations(5, generator=g, dtype=torch.float64)
    s = torch.rand(5, 1, 1, generator=g, dtype=torch.float64) + 0.5
    t = torch.randn(5, 1, 3, generator=g, dtype=torch.float64)
    pred = s * gt @ R.transpose(-1, -2) + t
    assert torch.allclose(similarity_procrustes(pred, gt), gt, atol=1e-10)


def test_similarity_procrustes_never_reflects():
    g = torch.Generator().manual_seed(4)
    gt = torch.randn(3, 30, 3, generator=g, dtype=torch.float64)
    mirrored = gt * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    aligned = similarity_procrustes(mirrored, gt)
    # an orthogonal (reflecting) fit would be exact; a proper rotation cannot be
    assert (aligned - gt).norm(dim=-1).mean() > 0.1
    # and the aligned set is still a rotated, scaled copy of the input (no mirror inside)
    d_in = torch.cdist(mirrored, mirrored)
    d_out = torch.cdist(aligned, aligned)
    ratio = d_out[:, 0, 1:] / d_in[:, 0, 1:]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-9)
    a, b = aligned[:, 1] - aligned[:, 0], aligned[:, 2] - aligned[:, 0]
    c = aligned[:, 3] - aligned[:, 0]
    a0, b0, c0 = mirrored[:, 1] - mirrored[:, 0], mirrored[:, 2] - mirrored[:, 0], mirrored[:, 3] - mirrored[:, 0]
    vol = torch.linalg.det(torch.stack((a, b, c), -1))
    vol0 = torch.linalg.det(torch.stack((a0, b0, c0), -1))
    assert (torch.sign(vol) == torch.sign(vol0)).all()


def test_heading_angle_and_bins_by_hand():
    """Body forward (+z) seen from the camera: away = 0, turned to the camera's right (+x) = +90 deg,
    facing the camera = 180 deg; a yaw about the camera's vertical axis adds to the heading."""
    def ry(deg):
        t = math.radians(deg)
        return torch.tensor([[math.cos(t), 0.0, math.sin(t)], [0.0, 1.0, 0.0], [-math.sin(t), 0.0, math.cos(t)]])

    facing = torch.diag(torch.tensor([1.0, -1.0, -1.0]))  # upright (y down), facing the camera
    R = torch.stack([torch.eye(3), ry(90.0), facing, ry(-30.0), ry(-170.0)])
    angles = torch.rad2deg(heading_angle(R))
    torch.testing.assert_close(angles.abs()[2], torch.tensor(180.0))
    torch.testing.assert_close(angles[[0, 1, 3, 4]], torch.tensor([0.0, 90.0, -30.0, -170.0]), atol=1e-4, rtol=0)
    # 4 bins of 90 degrees starting at -180: -170 -> 0, -30 -> 1, 0 -> 2, 90 -> 3
    assert heading_bins(R[[4, 3, 0, 1]], 4).tolist() == [0, 1, 2, 3]
    assert heading_bins(ry(-30.0)[None] @ facing[None], 12).item() == heading_bins((ry(150.0))[None], 12).item()


def test_rotation_error_up_to_a_turn_forgives_front_back_swaps_only():
    from vqhps.geometry import TURN_AROUND, rotation_angle_up_to_turn_deg

    def about_y(deg):
        a = math.radians(deg)
        return torch.tensor([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]],
                            dtype=torch.float64)

    gt = rot6d_to_matrix(torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    turned = gt @ torch.tensor(TURN_AROUND, dtype=torch.float64)
    assert rotation_angle_deg(turned, gt).item() == pytest.approx(180.0, abs=1e-6)
    assert rotation_angle_up_to_turn_deg(turned, gt).item() == pytest.approx(0.0, abs=1e-6)
    for deg, want in ((30.0, 30.0), (150.0, 30.0), (90.0, 90.0)):
        assert rotation_angle_up_to_turn_deg(gt @ about_y(deg), gt).item() == pytest.approx(want, abs=1e-6)
    tilted = gt @ rot6d_to_matrix(torch.tensor([1.0, 0.0, 0.0, 0.0, math.cos(0.3), math.sin(0.3)], dtype=torch.float64))
    assert rotation_angle_up_to_turn_deg(tilted, gt).item() == pytest.approx(math.degrees(0.3), abs=1e-6)
