"""Shared parts of the parametric baselines (HMR, CLIFF): the parameter vector (global rotation,
27 articulated-joint rotations, 6 phenotypes, weak-perspective camera), its mean, the iterative
error-feedback regressor, posing the body model, and the losses on joints and parameters.

Pose layout (``PoseSpec``, chosen by the pose tensor's bone count): anny takes (B, 104, 3, 3) local
bone rotations; only the 27 bones of ``vqhps.data.poses.ARTICULATED_BONES`` move in the data, so
only those are regressed (6D each) and every other bone keeps the identity. SMPL takes (B, 24, 3, 3):
its 23 non-root joints are regressed, 10 unbounded betas instead of 6 phenotypes in [0, 1]. The global rotation is separate (body frame -> the model's
camera frame: the crop's own camera for HMR, as ``crop_rot`` of a prepared batch; the full frame's
for CLIFF, as ``root_rot``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..body.base import SMPL24_NAMES, mirror_index
from ..data.datasets import rotation_target
from ..data.poses import (ANNY_BONE_LABELS, ANNY_N_BONES, ARTICULATED_BONES, angles_to_local_rotations,
                          key_pose_angles)
from ..geometry import matrix_to_rot6d, rot6d_to_matrix
from ..losses import reprojection_l1, rotation_mse
from .layers import regression_mlp
from .vqhps import UPRIGHT_FACING_CAMERA

N_ARTICULATED = len(ARTICULATED_BONES)
#: position of each articulated bone among the body model's 104 bones
ARTICULATED_INDEX = torch.tensor([ANNY_BONE_LABELS.index(b) for b in ARTICULATED_BONES], dtype=torch.long)
#: index of each of the 104 bones' left/right twin (itself on the midline)
BONE_MIRROR_INDEX = mirror_index(ANNY_BONE_LABELS)
#: the sagittal mirror x -> -x (the left side is +x in the body frame and in anny's own frame)
_MIRROR = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
#: SMPL: 24 joints, the root's rotation is the global one, so its 23 others are the articulated ones
SMPL_N_JOINTS = len(SMPL24_NAMES)
SMPL_ARTICULATED_INDEX = torch.arange(1, SMPL_N_JOINTS)
SMPL_MIRROR_INDEX = mirror_index(SMPL24_NAMES)


@dataclass(frozen=True)
class PoseSpec:
    """How a body model's pose tensor is laid out: bone count, the regressed (articulated) bones, each
    bone's left/right twin, and how phenotype parameters are bounded (anny: [0, 1] through a sigmoid;
    SMPL: unbounded betas around 0)."""

    name: str
    n_bones: int
    articulated: torch.Tensor
    mirror: torch.Tensor
    bounded_shape: bool
    init_shape: float

    @property
    def n_articulated(self) -> int:
        return int(self.articulated.numel())


ANNY_POSE = PoseSpec("anny", ANNY_N_BONES, ARTICULATED_INDEX, BONE_MIRROR_INDEX, True, 0.5)
SMPL_POSE = PoseSpec("smpl", SMPL_N_JOINTS, SMPL_ARTICULATED_INDEX, SMPL_MIRROR_INDEX, False, 0.0)
_BY_BONES = {ANNY_POSE.n_bones: ANNY_POSE, SMPL_POSE.n_bones: SMPL_POSE}
_BY_ARTICULATED = {ANNY_POSE.n_articulated: ANNY_POSE, SMPL_POSE.n_articulated: SMPL_POSE}


def pose_spec(body_or_name) -> PoseSpec:
    """The pose layout of a body model (or its name, "anny" / "smpl")."""
    name = body_or_name if isinstance(body_or_name, str) else getattr(body_or_name, "name", "anny")
    if name not in ("anny", "smpl"):
        raise ValueError(f"no parametric pose layout for body model {name!r}; HMR and CLIFF support anny and smpl")
    return SMPL_POSE if name == "smpl" else ANNY_POSE


def _spec_of(n: int, table: dict[int, PoseSpec], what: str) -> PoseSpec:
    if n not in table:
        raise ValueError(f"no pose layout with {n} {what} (anny: {ANNY_POSE.n_bones} bones, "
                         f"{ANNY_POSE.n_articulated} articulated; SMPL: {SMPL_POSE.n_bones}, {SMPL_POSE.n_articulated})")
    return table[n]


@functools.cache
def _on(device: torch.device, name: str = "anny") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(articulated index, bone mirror index, _MIRROR) of a layout on ``device``, copied once: a
    training step captured in a CUDA graph cannot copy host tensors in."""
    spec = pose_spec(name)
    return spec.articulated.to(device), spec.mirror.to(device), _MIRROR.to(device)


def full_precision(t: torch.Tensor) -> torch.autocast:
    """Context that turns autocast off on ``t``'s device: body model, geometry and losses run in fp32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


# ------------------------------------------------------------------------------------ pose layout
def scatter_pose(local: torch.Tensor, n_bones: int | None = None) -> torch.Tensor:
    """(B, A, 3, 3) articulated-joint rotations -> (B, n_bones, 3, 3) body pose, identity elsewhere
    (anny: A = 27 of 104 bones; SMPL: A = 23 of 24 joints, the root left to the global rotation)."""
    spec = _spec_of(local.shape[1], _BY_ARTICULATED, "articulated joints")
    b = local.shape[0]
    eye = torch.eye(3, dtype=local.dtype, device=local.device).expand(b, n_bones or spec.n_bones, 3, 3)
    return eye.index_copy(1, _on(local.device, spec.name)[0], local)


def gather_articulated(pose: torch.Tensor) -> torch.Tensor:
    """(B, n_bones, 3, 3) body pose -> (B, A, 3, 3) rotations of the articulated joints."""
    spec = _spec_of(pose.shape[1], _BY_BONES, "bones")
    return pose[:, _on(pose.device, spec.name)[0]]


def mirror_pose(pose: torch.Tensor) -> torch.Tensor:
    """Left/right mirror image of (B, n_bones, 3, 3) poses: twins swap and each rotation is conjugated
    by the x mirror, so the posed mesh is the mirrored mesh (what a horizontally flipped image shows)."""
    spec = _spec_of(pose.shape[1], _BY_BONES, "bones")
    _, twins, m = _on(pose.device, spec.name)
    m = m.to(pose.dtype)
    return m @ pose[:, twins] @ m


def pose_targets(batch: dict[str, Any]) -> torch.Tensor:
    """Ground-truth (B, n_bones, 3, 3) pose of a batch, mirrored for the samples ``prepare_batch``
    flipped (it mirrors image, joints, root rotation and canonical mesh, but not the stored pose)."""
    pose = batch["pose"].float()
    flipped = batch.get("flipped")
    if flipped is None:  # no `flipped.any()` shortcut: reading it back would stall the GPU queue
        return pose
    return torch.where(flipped.view(-1, 1, 1, 1), mirror_pose(pose), pose)


def mean_pose(name: str | None = "stand", spec: PoseSpec = ANNY_POSE) -> torch.Tensor:
    """(A, 3, 3) local rotations of the articulated joints in a key pose of ``vqhps.data.poses``
    (default: relaxed standing, arms down); ``None`` gives the identity (anny's rest pose, a wide A).
    SMPL starts from its rest pose (the identity, a T-pose) whatever ``name`` says: the key poses are
    anny's bones."""
    if name is None or spec.name != "anny":
        return torch.eye(3).expand(spec.n_articulated, 3, 3).clone()
    return gather_articulated(angles_to_local_rotations(key_pose_angles(name))[None])[0].float()


# ------------------------------------------------------------------------------- parameter vector
class ParamLayout:
    """Slices of the flat parameter vector: [global 6D | A x 6D joints | shape | s, tx, ty], A and the
    shape's bounds from the body's ``PoseSpec`` (anny: 27 joints, 6 phenotype logits; SMPL: 23, 10 betas)."""

    def __init__(self, shape_dim: int = 6, n_joints: int | None = None, spec: PoseSpec = ANNY_POSE) -> None:
        self.spec = spec
        self.n_joints, self.shape_dim = n_joints or spec.n_articulated, shape_dim
        self.glob = slice(0, 6)
        self.pose = slice(6, 6 + 6 * self.n_joints)
        self.shape = slice(self.pose.stop, self.pose.stop + shape_dim)
        self.cam = slice(self.shape.stop, self.shape.stop + 3)
        self.dim = self.cam.stop

    def mean(self, init_pose: str | None = "stand", init_rotmat: torch.Tensor | None = None,
             init_shape: float | None = None, init_scale: float = 1.0) -> torch.Tensor:
        """(dim,) starting parameters: ``init_rotmat`` (default upright, facing the camera), the
        ``init_pose`` key pose, shape ``init_shape`` (default the layout's: anny 0.5 as sigmoid logits,
        SMPL betas 0), camera (s, 0, 0)."""
        rot = torch.tensor(UPRIGHT_FACING_CAMERA) if init_rotmat is None else torch.as_tensor(init_rotmat).float()
        value = self.spec.init_shape if init_shape is None else float(init_shape)
        shape = torch.full((self.shape_dim,), value)
        shape = torch.logit(shape.clamp(1e-4, 1 - 1e-4)) if self.spec.bounded_shape else shape
        return torch.cat((matrix_to_rot6d(rot), matrix_to_rot6d(mean_pose(init_pose, self.spec)).reshape(-1),
                          shape, torch.tensor([float(init_scale), 0.0, 0.0])))

    def decode(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, dim) -> rotmat (B, 3, 3), local_rotmat (B, A, 3, 3), pose (B, n_bones, 3, 3), shape
        (B, shape_dim) (anny: in [0, 1]), cam (B, 3); fp32."""
        p = params.float()
        b = p.shape[0]
        local = rot6d_to_matrix(p[:, self.pose].reshape(b, self.n_joints, 6))
        shape = p[:, self.shape]
        return {"rotmat": rot6d_to_matrix(p[:, self.glob]), "local_rotmat": local, "pose": scatter_pose(local),
                "shape": torch.sigmoid(shape) if self.spec.bounded_shape else shape, "cam": p[:, self.cam]}


class IterativeRegressor(nn.Module):
    """HMR's iterative error feedback: ``n_iter`` times, [feature ⊕ extra ⊕ current params] ->
    ``regression_mlp`` (LayerNorm, FC ``hidden``, GELU, dropout, twice) -> FC -> delta added to the
    params, starting from ``init`` (a buffer). The last layer starts with tiny weights and runs in
    fp32, so the first estimate is the mean and the parameters keep full precision under autocast."""

    def __init__(self, feat_dim: int, init: torch.Tensor, hidden: int = 1024, dropout: float = 0.0,
                 n_iter: int = 3) -> None:
        super().__init__()
        self.n_iter = int(n_iter)
        self.register_buffer("init", init.float().clone())
        dim = init.numel()
        self.mlp = regression_mlp(feat_dim + dim, hidden, dropout)
        self.out = nn.Linear(hidden, dim)
        nn.init.xavier_uniform_(self.out.weight, gain=0.01)
        nn.init.zeros_(self.out.bias)

    def forward(self, feat: torch.Tensor) -> list[torch.Tensor]:
        """feat (B, feat_dim) -> the (B, dim) fp32 parameters after each iteration."""
        params = self.init.expand(feat.shape[0], -1)
        history = []
        for _ in range(self.n_iter):
            h = self.mlp(torch.cat((feat, params.to(feat.dtype)), dim=-1))
            with full_precision(h):
                params = params + self.out(h.float())
            history.append(params)
        return history


# ------------------------------------------------------------------------------------- body model
def pose_body(body, rotmat: torch.Tensor, pose: torch.Tensor, shape: torch.Tensor) -> dict[str, torch.Tensor]:
    """Differentiable meshes in fp32: canonical (B, V, 3) = body(pose, shape) centred on its vertex
    mean; vertices = canonical @ rotmat^T (oriented, camera-aligned axes); joints24 / joints17 of it."""
    with full_precision(pose):
        canonical = body(pose.float(), shape.float()).vertices
        canonical = canonical - canonical.mean(1, keepdim=True)
        vertices = canonical @ rotmat.float().transpose(-1, -2)
        return {"canonical": canonical, "vertices": vertices,
                "joints24": body.joints24(vertices), "joints17": body.joints17(vertices)}


def ensure_body_device(body, device: torch.device) -> None:
    """Move the (shared, unregistered) body model to ``device`` if it is elsewhere."""
    if body.template.device != device:
        body.to(device)


def oriented_targets(batch: dict[str, Any], frame: str = "camera") -> torch.Tensor:
    """Ground-truth oriented mesh (B, V, 3) = canonical @ R^T (both from ``prepare_batch``), R the
    rotation in ``frame``: ``root_rot`` ("camera") or ``crop_rot`` ("crop", what crop-only models predict)."""
    return batch["canonical"].float() @ rotation_target(batch, frame).transpose(-1, -2)


def camera_regulariser(cam: torch.Tensor) -> torch.Tensor:
    """exp(-10 s)^2, mean: near 0 for s > 0.3, steep for negative scales (as in SPIN)."""
    return torch.exp(-20.0 * cam[:, 0].float()).mean()


DEFAULT_WEIGHTS = {"reproj": 1.0, "joints3d": 5.0, "pose": 1.0, "rot": 1.0, "shape": 1.0, "cam_reg": 1.0}


def weighted_mean_abs(diff: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of |diff| (B, J, C), each joint weighed by ``weight`` (B, J) or (B, J, 1) when given."""
    diff = diff.abs()
    if weight is None:
        return diff.mean()
    w = weight.float()
    w = (w if w.dim() == 3 else w[..., None]).expand_as(diff)
    return (diff * w).sum() / w.sum().clamp_min(1e-8)


def parametric_terms(outputs: dict[str, torch.Tensor], batch: dict[str, Any], body,
                     frame: str = "crop") -> dict[str, torch.Tensor]:
    """HMR's loss terms (with their graphs), fp32, against the ground truth in ``frame`` (the model's:
    "crop" for HMR, "camera" for CLIFF).

    reproj: L1 between the weak perspective of the predicted joints24 and ``batch["joints2d"]``
    (optional ``joints2d_weight``); joints3d: MSE (m²) between predicted and ground-truth joints24,
    both from vertex-mean-centred oriented meshes; pose: MSE between the 27 predicted joint rotation
    matrices and the ground truth (mirrored for flipped samples); rot: MSE of the global rotation vs
    ``crop_rot`` or ``root_rot``; shape: MSE of the phenotypes; cam_reg: see ``camera_regulariser``."""
    with full_precision(outputs["vertices"]):
        gt_joints = body.joints24(oriented_targets(batch, frame))
        return {
            "reproj": reprojection_l1(outputs["joints24"], outputs["cam"], batch["joints2d"],
                                      batch.get("joints2d_weight")),
            "joints3d": F.mse_loss(outputs["joints24"].float(), gt_joints),
            "pose": F.mse_loss(outputs["local_rotmat"].float(), gather_articulated(pose_targets(batch))),
            "rot": rotation_mse(outputs["rotmat"], rotation_target(batch, frame)),
            "shape": F.mse_loss(outputs["shape"].float(), batch["shape"].float()),
            "cam_reg": camera_regulariser(outputs["cam"]),
        }


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """dict(loss = sum of weights[k] * terms[k], and every term detached for logging)."""
    total = sum(float(weights.get(k, 0.0)) * v for k, v in terms.items())
    return {"loss": total, **{k: v.detach() for k, v in terms.items()}}
