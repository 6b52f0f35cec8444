"""The embedded default body model: ``anny`` (open, CC0 assets), wrapped in the common interface.

anny is z-up and faces -y; this wrapper rotates it into the shared convention (y up, facing +z,
left = +x), keeps only the body surface (the mouth interior and eyeballs are separate mesh pieces
that carry no pose or shape information) and exposes the 6 phenotype parameters as shape. The eyeballs
are posed on request (``pose_with_eyes``) for rendering only: the labels stay the body surface.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import torch

from .base import BodyModel, BodyOutput

#: rotation taking anny's frame (z up, facing -y) to the shared one (y up, facing +z)
ANNY_TO_SHARED = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=torch.float64)

PHENOTYPES = ("gender", "age", "muscle", "weight", "height", "proportions")
#: ranges the project samples phenotypes from: adults, and heights where anny's knee and spine bones
#: stay tied to the skin (toward the extremes of "height" they slide along it by up to 3 cm, which
#: no sparse non-negative vertex regressor can follow)
PHENOTYPE_RANGES = ((0.0, 1.0), (0.4, 1.0), (0.0, 1.0), (0.0, 1.0), (0.35, 0.65), (0.0, 1.0))


def sample_phenotypes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 6) float32 phenotypes drawn uniformly from PHENOTYPE_RANGES."""
    lo, hi = np.array(PHENOTYPE_RANGES, dtype=np.float64).T
    return (lo + (hi - lo) * rng.uniform(0.0, 1.0, (n, len(PHENOTYPES)))).astype(np.float32)


def _import_anny(cache_dir: Path):
    """Import anny with its model cache under the project cache (built once, ~1 GB)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ANNY_CACHE_DIR", str(cache_dir))
    try:
        import anny
        import anny.paths
    except ImportError as err:  # pragma: no cover - exercised only without the dependency
        raise ImportError("the body model package `anny` is missing: run `make setup`") from err
    anny.paths.set_anny_cache_path(cache_dir)
    anny.utils.interpolation.linear_interpolation_coefficients = interpolation_coefficients
    import anny.models.phenotype

    anny.models.phenotype.phenotype_blendshape_weights = phenotype_blendshape_weights
    return anny


def interpolation_coefficients(value: torch.Tensor, anchors: torch.Tensor, extrapolate: bool = False) -> torch.Tensor:
    """(B, n) linear interpolation weights of each value over the increasing ``anchors``: the two
    bracketing anchors get 1 - alpha and alpha (values outside clamp to the ends unless ``extrapolate``).

    anny's phenotype blend weights come from this; it stands in for anny's own version, which indexes
    with a host-side ``arange`` and so cannot run inside a CUDA graph (HMR's and CLIFF's training steps
    pose the body). Same values and gradients."""
    n = anchors.shape[0]
    if not extrapolate:
        value = torch.where(value < anchors[0], anchors[0], value)
        value = torch.where(value > anchors[-1], anchors[-1], value)
    upper = torch.searchsorted(anchors, value.contiguous(), side="left").clamp(1, n - 1)
    lower_value, upper_value = anchors[upper - 1], anchors[upper]
    alpha = ((value - lower_value) / (upper_value - lower_value)).to(anchors.dtype).unsqueeze(1)
    weights = torch.zeros(value.shape[0], n, dtype=anchors.dtype, device=anchors.device)
    return weights.scatter(1, (upper - 1).unsqueeze(1), 1.0 - alpha).scatter(1, upper.unsqueeze(1), alpha)


def phenotype_blendshape_weights(phenotype_parameters: torch.Tensor, phenotype_labels: list[str], anchors,
                                 stacked_phenotype_blend_shapes_mask: torch.Tensor, extrapolate: bool) -> torch.Tensor:
    """(B, K) weights of anny's phenotype blendshapes: blendshape k weighs the product of the
    interpolation weights of the variations its mask row selects (race: the normalised race values;
    phenotypes the model does not expose sit at 0.5).

    Stands in for anny's own version, whose ``torch.prod`` backward asks the GPU whether any factor is
    zero, a host sync that no CUDA graph can capture (HMR's and CLIFF's training steps pose the body).
    Same values and gradients: the product is taken by pairwise multiplication instead."""
    from anny.models.model_data import PHENOTYPE_VARIATIONS

    batch = phenotype_parameters.shape[0]

    def value(label: str) -> torch.Tensor:
        if label in phenotype_labels:
            return phenotype_parameters[:, phenotype_labels.index(label)]
        return phenotype_parameters.new_full((batch,), 0.5)

    weights = {}
    for feature, variations in PHENOTYPE_VARIATIONS.items():
        if feature == "race":
            race = torch.stack([value(label) for label in variations], dim=1)
            column = torch.nan_to_num(race / race.sum(dim=1, keepdim=True), 1 / 3, 1 / 3, 1 / 3)
        else:
            column = interpolation_coefficients(value(feature), anchors[feature], extrapolate=extrapolate)
        weights.update(zip(variations, column.unbind(1)))
    per_variation = torch.stack([weights[v] for variations in PHENOTYPE_VARIATIONS.values() for v in variations], 1)
    mask = stacked_phenotype_blend_shapes_mask.unsqueeze(0)
    factors = per_variation.unsqueeze(1) * mask + (1 - mask)  # (B, K, V): 1 where the variation is not used
    while factors.shape[-1] > 1:
        if factors.shape[-1] % 2:
            factors = torch.cat((factors, torch.ones_like(factors[..., :1])), dim=-1)
        factors = factors[..., 0::2] * factors[..., 1::2]
    return factors.squeeze(-1)


def build_anny(cache_dir: Path, topology: str = "anny"):
    """Construct the raw anny model; the first call builds anny's cache (≈1 min, ≈0.8 GB)."""
    anny = _import_anny(cache_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Fallback to lbs skinning.*")
        return anny.Anny(topology=topology)


def largest_component(n_vertices: int, faces: np.ndarray) -> np.ndarray:
    """Sorted indices of the vertices of the largest edge-connected piece of a triangle mesh."""
    rows = faces.ravel()
    cols = np.roll(faces, 1, axis=1).ravel()
    adj = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n_vertices, n_vertices))
    _, labels = csgraph.connected_components(adj, directed=False)
    biggest = np.bincount(labels).argmax()
    return np.flatnonzero(labels == biggest)


def eye_pieces(n_vertices: int, faces: np.ndarray, vertex_bones: np.ndarray,
               bone_labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted raw indices of the vertices of the mesh pieces skinned to an ``eye*`` bone (anny's
    eyeballs), and those pieces' triangles indexing that vertex list."""
    rows = faces.ravel()
    cols = np.roll(faces, 1, axis=1).ravel()
    adj = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n_vertices, n_vertices))
    _, labels = csgraph.connected_components(adj, directed=False)
    is_eye = np.array([label.startswith("eye") for label in bone_labels])[vertex_bones]
    pieces = [c for c in np.unique(labels) if is_eye[labels == c].all()]
    index = np.flatnonzero(np.isin(labels, pieces))
    remap = -np.ones(n_vertices, dtype=np.int64)
    remap[index] = np.arange(index.size)
    eye_faces = remap[faces]
    return index, eye_faces[(eye_faces >= 0).all(1)]


class AnnyBody(BodyModel):
    """anny's body surface with 6 phenotype shape parameters and per-bone local rotations as pose.

    ``forward(pose, shape)``: pose (B, 104, 3, 3) local bone rotations in anny's ``local-ref``
    parameterisation (identity = rest pose; the root entry is ignored: global orientation is a
    separate quantity in this project), shape (B, 6) phenotypes in [0, 1] (0.5 = average).
    """

    name = "anny"
    shape_dim = len(PHENOTYPES)

    def __init__(self, cache_dir: Path, topology: str = "anny", regressors: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.topology = topology
        self.model = build_anny(cache_dir, topology)  # float64 until the template is computed
        self.bone_labels: list[str] = list(self.model.bone_labels)
        self.n_bones = len(self.bone_labels)
        raw_faces = self.model.get_triangular_faces().cpu().numpy().astype(np.int64)
        n_raw = int(self.model.template_vertices.shape[0])
        keep = largest_component(n_raw, raw_faces)
        remap = -np.ones(n_raw, dtype=np.int64)
        remap[keep] = np.arange(keep.size)
        faces = remap[raw_faces]
        faces = faces[(faces >= 0).all(1)]
        self.register_buffer("keep", torch.from_numpy(keep), persistent=False)
        bone_idx = self.model.vertex_bone_indices.cpu().numpy()
        dominant = bone_idx[np.arange(n_raw), self.model.vertex_bone_weights.cpu().numpy().argmax(1)]
        eyes, eye_faces = eye_pieces(n_raw, raw_faces, dominant, self.bone_labels)
        self.register_buffer("eye_index", torch.from_numpy(eyes), persistent=False)
        self.register_buffer("eye_faces", torch.from_numpy(eye_faces), persistent=False)
        self.register_buffer("faces", torch.from_numpy(faces), persistent=False)
        self.register_buffer("to_shared", ANNY_TO_SHARED.to(torch.float32), persistent=False)
        # the template in float64, snapped to a 0.1 um grid, then float32: bit-identical whatever the
        # thread count (summation order), so hashes of it (mesh hierarchy, checkpoints) are stable
        rest = self._raw_forward(self.rest_pose(1), torch.full((1, self.shape_dim), 0.5))["vertices"][0]
        snapped = torch.round(rest * 1e7) / 1e7 + 0.0  # + 0.0 turns -0.0 into 0.0 (same bytes)
        self.register_buffer("template", snapped.to(torch.float32), persistent=False)
        self.model = self.model.to(torch.float32)
        self.register_buffer("vertex_flip", torch.from_numpy(mirror_vertices(self.template.numpy())), persistent=False)
        n = self.n_vertices
        reg = regressors or {"regressor24": np.full((24, n), 1.0 / n), "regressor17": np.full((17, n), 1.0 / n)}
        self.set_regressors(reg["regressor24"], reg["regressor17"])

    def set_regressors(self, regressor24: np.ndarray, regressor17: np.ndarray) -> None:
        self.register_buffer("regressor24", torch.as_tensor(regressor24, dtype=torch.float32), persistent=False)
        self.register_buffer("regressor17", torch.as_tensor(regressor17, dtype=torch.float32), persistent=False)

    def rest_pose(self, batch: int) -> torch.Tensor:
        """(B, 104, 3, 3) identity rotations: anny's rest pose (arms in a wide A)."""
        return torch.eye(3).expand(batch, self.n_bones, 3, 3).clone()

    def _raw_forward(self, pose: torch.Tensor, shape: torch.Tensor, eyes: bool = False) -> dict[str, torch.Tensor]:
        """Pose anny and return vertices (B, V, 3) and bone heads (B, 104, 3) in the shared frame (and
        the eyeball vertices (B, E, 3), same skinning, when ``eyes``)."""
        batch = pose.shape[0]
        dtype = self.model.template_vertices.dtype
        if pose.shape[-2:] == (3, 3):
            transforms = torch.eye(4, dtype=dtype, device=pose.device).repeat(batch, self.n_bones, 1, 1)
            transforms[..., :3, :3] = pose
        else:
            transforms = pose.to(dtype).clone()
        transforms[:, 0] = torch.eye(4, dtype=transforms.dtype, device=transforms.device)
        out = self.model(pose_parameters=transforms, phenotype_kwargs=shape.to(dtype))
        to_shared = self.to_shared.to(dtype)
        verts = out["vertices"][:, self.keep] @ to_shared.T
        heads = out["bone_poses"][..., :3, 3] @ to_shared.T
        if eyes:
            eye_verts = out["vertices"][:, self.eye_index] @ to_shared.T
            return {"vertices": verts, "bone_heads": heads, "eye_vertices": eye_verts}
        return {"vertices": verts, "bone_heads": heads}

    def pose_with_bones(self, pose: torch.Tensor, shape: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vertices and bone heads: what the regressor fit and the pose-library tests need."""
        return self._raw_forward(pose, shape)

    def pose_with_eyes(self, pose: torch.Tensor, shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Body vertices (B, V, 3), exactly ``forward``'s, and the eyeball vertices (B, E, 3) posed by
        the same skinning (triangles: ``eye_faces``): what the renderer draws; labels use the former."""
        out = self._raw_forward(pose, shape, eyes=True)
        return out["vertices"], out["eye_vertices"]

    def forward(self, pose: torch.Tensor, shape: torch.Tensor | None = None) -> BodyOutput:
        if shape is None:
            shape = torch.full((pose.shape[0], self.shape_dim), 0.5, device=pose.device)
        verts = self._raw_forward(pose, shape)["vertices"]
        return BodyOutput(vertices=verts, joints=self.joints24(verts))


def mirror_vertices(vertices: np.ndarray) -> np.ndarray:
    """Index of each vertex's left/right twin: nearest vertex to its x-mirrored position."""
    from scipy.spatial import cKDTree

    mirrored = vertices * np.array([-1.0, 1.0, 1.0])
    _, idx = cKDTree(vertices).query(mirrored)
    return idx.astype(np.int64)
