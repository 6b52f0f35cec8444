"""The one interface every body model offers: template, faces, forward(pose, shape) -> vertices and
joints, linear joint regressors, the T-pose skeleton and left/right symmetry maps.

Convention shared by all body models (SMPL's): metres, y up, the body faces +z, its left side is +x.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

#: 24 SMPL joints, in SMPL's order
SMPL24_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle",
    "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hand", "right_hand",
)
#: 17 Human3.6M joints, in the order of the usual H36M regressor
H36M17_NAMES = (
    "pelvis", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "spine",
    "thorax", "neck", "head_top", "left_shoulder", "left_elbow", "left_wrist", "right_shoulder",
    "right_elbow", "right_wrist",
)


def mirror_index(names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Index that swaps every ``left_*``/``right_*`` (or ``*.L``/``*.R``) name with its twin."""
    def twin(n: str) -> str:
        for a, b in (("left_", "right_"), ("right_", "left_"), (".L", ".R"), (".R", ".L")):
            if a in n:
                return n.replace(a, b)
        return n

    lookup = {n: i for i, n in enumerate(names)}
    return torch.tensor([lookup[twin(n)] for n in names], dtype=torch.long)


@dataclass
class BodyOutput:
    vertices: torch.Tensor  # (B, V, 3)
    joints: torch.Tensor  # (B, 24, 3), SMPL-like joints from the regressor


class BodyModel(torch.nn.Module):
    """Base class of body models. Subclasses fill the buffers in ``__init__`` and implement
    ``forward(pose, shape) -> BodyOutput``.

    Buffers: ``template`` (V, 3) rest vertices of the mean shape, ``faces`` (F, 3),
    ``regressor24`` (24, V) and ``regressor17`` (17, V) linear joint regressors (rows sum to 1),
    ``vertex_flip`` (V,) index of each vertex's mirror twin.
    """

    name: str = "body"
    shape_dim: int = 0

    template: torch.Tensor
    faces: torch.Tensor
    regressor24: torch.Tensor
    regressor17: torch.Tensor
    vertex_flip: torch.Tensor

    @property
    def n_vertices(self) -> int:
        return int(self.template.shape[0])

    @property
    def joint_flip24(self) -> torch.Tensor:
        return mirror_index(SMPL24_NAMES)

    @property
    def joint_flip17(self) -> torch.Tensor:
        return mirror_index(H36M17_NAMES)

    def joints24(self, vertices: torch.Tensor) -> torch.Tensor:
        """(B, V, 3) -> (B, 24, 3) SMPL-like joints, linear in the vertices."""
        return torch.einsum("jv,bvc->bjc", self.regressor24.to(vertices.dtype), vertices)

    def joints17(self, vertices: torch.Tensor) -> torch.Tensor:
        """(B, V, 3) -> (B, 17, 3) H36M-like joints, linear in the vertices."""
        return torch.einsum("jv,bvc->bjc", self.regressor17.to(vertices.dtype), vertices)

    def tpose_joints17(self) -> torch.Tensor:
        """(17, 3) H36M-like joints of the mean-shape T-pose, centred on the vertex mean: the initial
        pose ``p`` that VQ-HPS's rotation/camera MLP receives."""
        verts = self.template - self.template.mean(0, keepdim=True)
        return self.joints17(verts[None])[0]

    def identifier(self) -> str:
        """Short hash of the topology (faces and vertex count): checkpoints carry it and refuse a
        body model whose meshes they cannot encode."""
        h = hashlib.sha1()
        h.update(self.name.encode())
        h.update(np.ascontiguousarray(self.faces.cpu().numpy().astype(np.int64)).tobytes())
        h.update(str(self.n_vertices).encode())
        return f"{self.name}-{self.n_vertices}-{h.hexdigest()[:10]}"
