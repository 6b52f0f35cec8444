"""Batched rotation and camera geometry in torch: 6D rotations, axis-angle, geodesic angles,
weak-perspective and pinhole projection, similarity Procrustes.

Conventions: rotation matrices act on column vectors (``x' = R x``); for row-stacked points
``(..., N, 3)`` that is ``points @ R.transpose(-1, -2)``. Every function works on any leading batch
shape and keeps the input dtype (fp32 or fp64).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: the 6D code of the identity rotation: first two columns of I, stacked
IDENTITY_6D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def rot6d_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3). Zhou et al. 2019: ``x[..., :3]`` and ``x[..., 3:]`` are
    Gram-Schmidt orthonormalised into the first two COLUMNS; the third is their cross product."""
    a1, a2 = x[..., 0:3], x[..., 3:6]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


def matrix_to_rot6d(R: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 6): the first two columns, concatenated (inverse of ``rot6d_to_matrix``)."""
    return torch.cat((R[..., :, 0], R[..., :, 1]), dim=-1)


def heading_angle(R: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) body-to-camera rotations -> heading in radians, (-pi, pi]: the angle of the body's
    forward axis (its +z, the column ``R[..., :, 2]``) in the camera's x-z plane, atan2(x, z); 0 when the
    body faces away from the camera, +-pi when it faces it."""
    forward = R[..., :, 2]
    return torch.atan2(forward[..., 0], forward[..., 2])


def heading_bins(R: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(..., 3, 3) -> (...) long: the heading (``heading_angle``) in ``n_bins`` equal bins, bin 0
    starting at -pi."""
    frac = (heading_angle(R.float()) + math.pi) / (2.0 * math.pi)
    return (frac * n_bins).floor().long().clamp(0, n_bins - 1)


def skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrix ``[v]_x`` with ``[v]_x w = v x w``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack((o, -z, y, z, o, -x, -y, x, o), dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis * angle (radians) -> (..., 3, 3) by Rodrigues' formula
    ``R = I + A [v]_x + B [v]_x^2`` with A = sin t / t, B = (1 - cos t) / t^2; Taylor series near
    t = 0 keep values and gradients finite there."""
    t2 = (aa * aa).sum(-1)
    small = t2 < 1e-6
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    a = torch.where(small, 1.0 - t2 / 6.0, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24.0, (1.0 - torch.cos(t)) / (t * t))
    K = skew(aa)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(K)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 4) unit quaternion (w, x, y, z) with w >= 0. Of the four algebraic
    candidates, each sample uses the one with the largest divisor (Shepperd), so it is stable
    at every angle, 180 degrees included."""
    m = R
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    four_sq = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), dim=-1
    )
    q_abs = torch.sqrt(four_sq.clamp_min(0.0))  # 2|w|, 2|x|, 2|y|, 2|z|
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s10, s02, s21 = m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2]
    # row k: 2 * q_k * q, i.e. the quaternion scaled by 2 q_k
    cand = torch.stack(
        (
            torch.stack((q_abs[..., 0] ** 2, d21, d02, d10), -1),
            torch.stack((d21, q_abs[..., 1] ** 2, s10, s02), -1),
            torch.stack((d02, s10, q_abs[..., 2] ** 2, s21), -1),
            torch.stack((d10, s02, s21, q_abs[..., 3] ** 2), -1),
        ),
        dim=-2,
    )
    cand = cand / (2.0 * q_abs.clamp_min(0.1))[..., None]
    best = q_abs.argmax(-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 3) axis * angle with angle in [0, pi], via the quaternion
    (angle = 2 atan2(|v|, w)); a series keeps it exact near the identity."""
    q = matrix_to_quaternion(R)
    w, v = q[..., 0], q[..., 1:]
    n = v.norm(dim=-1)
    angle = 2.0 * torch.atan2(n, w)
    small = n < 1e-6
    factor = torch.where(small, 2.0 / w.clamp_min(1e-12), angle / torch.where(small, torch.ones_like(n), n))
    return v * factor[..., None]


def rotation_angle_deg(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) x2 -> (...,) geodesic angle of ``R1^T R2`` in degrees, via atan2(sin, cos) so it
    is accurate near 0 and 180 degrees."""
    Rd = R1.transpose(-1, -2) @ R2
    cos2 = Rd[..., 0, 0] + Rd[..., 1, 1] + Rd[..., 2, 2] - 1.0
    sin2 = torch.stack(
        (Rd[..., 2, 1] - Rd[..., 1, 2], Rd[..., 0, 2] - Rd[..., 2, 0], Rd[..., 1, 0] - Rd[..., 0, 1]), -1
    ).norm(dim=-1)
    return torch.rad2deg(torch.atan2(sin2, cos2))


#: the body turned about its own vertical axis by 180 degrees (body frame: y up, facing +z)
TURN_AROUND = ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0))


def rotation_angle_up_to_turn_deg(R_pred: torch.Tensor, R_gt: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) x2 -> (...,) the smaller of the rotation errors against ``R_gt`` and against the
    body turned around (``R_gt @ TURN_AROUND``): the error of an orientation that may have front and
    back swapped. A diagnostic: it falls while the plain error still reads ~90 deg when a model has
    learned the heading up to front/back (180 deg flips)."""
    # R_gt @ TURN_AROUND negates its first and third columns; no constant tensor from the host (a
    # CUDA-graph training step cannot copy one in)
    turned = torch.stack((-R_gt[..., 0], R_gt[..., 1], -R_gt[..., 2]), dim=-1)
    return torch.minimum(rotation_angle_deg(R_pred, R_gt), rotation_angle_deg(R_pred, turned))


def weak_perspective_project(points: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """(B, J, 3) points and (B, 3) camera ``[s, tx, ty]`` -> (B, J, 2) = ``s * X[..., :2] + t``
    (paper eq. 3: scaled orthographic projection)."""
    return cam[:, None, 0:1] * points[..., :2] + cam[:, None, 1:3]


def perspective_project(points: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(B, J, 3) camera-frame points (z > 0) and intrinsics K (B, 3, 3) or (3, 3) -> (B, J, 2) pixels."""
    p = points @ K.transpose(-1, -2)
    return p[..., :2] / p[..., 2:3]


def similarity_procrustes(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) x2 -> ``pred`` after the similarity transform (rotation, scale, translation) that
    best fits it to ``gt`` in least squares (Umeyama 1991, with the reflection fix so the rotation
    has det +1)."""
    mu_p, mu_g = pred.mean(-2, keepdim=True), gt.mean(-2, keepdim=True)
    xp, xg = pred - mu_p, gt - mu_g
    var_p = (xp * xp).sum(dim=(-1, -2))
    K = xp.transpose(-1, -2) @ xg  # (B, 3, 3) = sum_i p_i g_i^T
    U, S, Vh = torch.linalg.svd(K)
    V = Vh.transpose(-1, -2)
    sign = torch.sign(torch.linalg.det(V @ U.transpose(-1, -2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    Z = torch.ones_like(S)
    Z = torch.cat((Z[..., :2], sign[..., None]), dim=-1)
    R = V @ torch.diag_embed(Z) @ U.transpose(-1, -2)  # R p_i ~ g_i
    scale = (S * Z).sum(-1) / var_p.clamp_min(torch.finfo(pred.dtype).tiny)
    return scale[..., None, None] * (xp @ R.transpose(-1, -2)) + mu_g


def project_to_so3(M: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> the rotation nearest to ``M`` in the Frobenius norm: ``U diag(1, 1, d) V^T``
    from the SVD ``M = U S V^T``, with d = det(U V^T) so the result has det +1."""
    U, _, Vh = torch.linalg.svd(M)
    d = torch.linalg.det(U @ Vh)
    d = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    Z = torch.stack((torch.ones_like(d), torch.ones_like(d), d), dim=-1)
    return U @ torch.diag_embed(Z) @ Vh


def chordal_mean_rotation(R: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotations -> (3, 3) their chordal L2 mean: the arithmetic mean of the matrices
    projected back to SO(3) (``project_to_so3``), the rotation minimising sum_i ||R - R_i||_F^2."""
    return project_to_so3(R.mean(dim=0))


def crop_camera_rotation(bbox: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(B, 4) boxes (x0, y0, x1, y1, full-frame pixels) and (B, 3, 3) or (3, 3) pinhole intrinsics ->
    (B, 3, 3) rotation of the crop's camera: the smallest rotation (axis perpendicular to the optical
    axis and the ray) taking the optical axis z onto the ray ``K^-1 [cx, cy, 1]`` through the box
    centre. A crop sits off the optical axis; this is the camera it is seen from (identity on the axis)."""
    dtype = torch.promote_types(bbox.dtype, K.dtype)
    dtype = dtype if dtype.is_floating_point else torch.float32
    bbox, K = bbox.to(dtype), K.to(device=bbox.device, dtype=dtype).expand(bbox.shape[0], 3, 3)
    cx, cy = (bbox[:, 0] + bbox[:, 2]) / 2, (bbox[:, 1] + bbox[:, 3]) / 2  # the crop's centre pixel
    # K^-1 of an upper-triangular pinhole, written out (linalg.solve would check for errors on the host)
    y = (cy - K[:, 1, 2]) / K[:, 1, 1]
    x = (cx - K[:, 0, 2] - K[:, 0, 1] * y) / K[:, 0, 0]
    ray = F.normalize(torch.stack((x, y, torch.ones_like(x)), dim=-1), dim=-1)
    x, y, z = ray.unbind(-1)
    h = 1.0 / (1.0 + z)  # Rodrigues' formula for axis z x ray, cos = z, written without dividing by sin
    return torch.stack((1 - h * x * x, -h * x * y, x,
                        -h * x * y, 1 - h * y * y, y,
                        -x, -y, z), dim=-1).reshape(-1, 3, 3)


def random_rotations(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(n, 3, 3) rotations uniform on SO(3) (normalised Gaussian quaternions)."""
    q = F.normalize(torch.randn(n, 4, generator=generator, dtype=torch.float64), dim=-1)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        (
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ),
        dim=-1,
    ).reshape(n, 3, 3)
    return R.to(dtype=dtype, device=device)


__all__ = [
    "IDENTITY_6D", "rot6d_to_matrix", "matrix_to_rot6d", "skew", "axis_angle_to_matrix",
    "matrix_to_quaternion", "matrix_to_axis_angle", "rotation_angle_deg", "weak_perspective_project",
    "perspective_project", "similarity_procrustes", "random_rotations", "crop_camera_rotation",
]
