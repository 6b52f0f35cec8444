"""SMPL body model read from the user's own copy of the official ``SMPL_{NEUTRAL,MALE,FEMALE}.pkl``.

The file is read by a tolerant unpickler (no ``chumpy`` needed: the official pickles wrap some arrays
in chumpy objects, and chumpy does not import under numpy 2), validated field by field, and the
forward pass is smplx's own linear blend skinning (``smplx.lbs.lbs``) run on the validated arrays.
``smplx.SMPL`` itself is not used because it unpickles the file with chumpy. Nothing is read at
import time: only constructing :class:`SMPLBody` touches the file.

The model's arrays are registered as non-persistent buffers: checkpoints never carry SMPL data
(the SMPL licence forbids redistributing it); a model is rebuilt from the user's file.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch
from scipy.spatial import cKDTree
from smplx.lbs import batch_rodrigues, lbs

from vqhps.body.base import H36M17_NAMES, SMPL24_NAMES, BodyModel, BodyOutput

#: parent of every SMPL joint (root: -1), the kinematic tree of the official release
SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)
N_JOINTS = 24
GENDER_FILES = {"neutral": "SMPL_NEUTRAL.pkl", "male": "SMPL_MALE.pkl", "female": "SMPL_FEMALE.pkl"}
H36M_REGRESSOR_FILE = "J_regressor_h36m.npy"
SMPL_ENV_VAR = "VQHPS_SMPL_DIR"

#: fallback H36M joints as combinations of SMPL joint-regressor rows (head_top is built from vertices)
_H36M_FROM_SMPL: dict[str, dict[str, float]] = {
    "pelvis": {"pelvis": 1.0},
    "right_hip": {"right_hip": 1.0},
    "right_knee": {"right_knee": 1.0},
    "right_ankle": {"right_ankle": 1.0},
    "left_hip": {"left_hip": 1.0},
    "left_knee": {"left_knee": 1.0},
    "left_ankle": {"left_ankle": 1.0},
    "spine": {"spine2": 1.0},  # H36M spine sits ~0.23 m above the pelvis, as SMPL's spine2
    "thorax": {"neck": 1.0},  # base of the neck, between the shoulders
    "neck": {"head": 1.0},  # H36M "neck/nose": SMPL's head joint (top of the neck)
    "left_shoulder": {"left_shoulder": 1.0},
    "left_elbow": {"left_elbow": 1.0},
    "left_wrist": {"left_wrist": 1.0},
    "right_shoulder": {"right_shoulder": 1.0},
    "right_elbow": {"right_elbow": 1.0},
    "right_wrist": {"right_wrist": 1.0},
}
#: head_top = mean of the head-skinned template vertices within this height of the highest one
_HEAD_TOP_BAND_M = 0.02


# ----------------------------------------------------------------------------------------------
# reading the file


class _ChumpyStandIn:
    """Receives the pickled state of a chumpy object; its array lives under ``x``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _SmplUnpickler(pickle.Unpickler):
    """Unpickles SMPL files without chumpy and across numpy/scipy module renames."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStandIn
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if module.startswith("scipy.sparse") and hasattr(scipy.sparse, name):
            return getattr(scipy.sparse, name)
        return super().find_class(module, name)


def _to_array(value: Any) -> Any:
    """Plain array from an ndarray, a sparse matrix or a chumpy stand-in; None if impossible."""
    if isinstance(value, _ChumpyStandIn):
        state = value.state
        if isinstance(state, dict) and "x" in state:
            return _to_array(state["x"])
        return None
    if scipy.sparse.issparse(value):
        return np.asarray(value.toarray())
    try:
        return np.asarray(value)
    except Exception:  # noqa: BLE001 - any unconvertible object is reported by the caller
        return None


@dataclass
class SmplArrays:
    """Validated arrays of one SMPL model file (float64 as stored, faces int64)."""

    path: Path
    v_template: np.ndarray  # (V, 3)
    shapedirs: np.ndarray  # (V, 3, S)
    posedirs: np.ndarray  # (V, 3, 207)
    j_regressor: np.ndarray  # (24, V) dense
    weights: np.ndarray  # (V, 24)
    parents: np.ndarray  # (24,) int64, root -1
    faces: np.ndarray  # (F, 3) int64


def missing_model_message(path: Path) -> str:
    """One-line explanation of where the SMPL file is expected and how to obtain it."""
    return (
        f"SMPL model file not found: {path} (expected {path.name} in {path.parent}; set {SMPL_ENV_VAR} "
        f"to the folder that holds it). Obtain it by registering at https://smpl.is.tue.mpg.de, "
        f"downloading 'SMPL for Python' and copying its .pkl there renamed to {path.name} "
        f"(e.g. basicmodel_neutral_lbs_10_207_0_v1.1.0.pkl -> SMPL_NEUTRAL.pkl)."
    )


def load_smpl_arrays(path: str | Path, num_betas: int = 10) -> SmplArrays:
    """Read and validate an official-layout SMPL pickle.

    Raises FileNotFoundError (naming the file and ``VQHPS_SMPL_DIR``) when it is absent, ValueError
    naming the file and the field when it is not a pickle or a field is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing_model_message(path))
    try:
        with path.open("rb") as fh:
            raw = _SmplUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - every unpickling failure means the same thing here
        raise ValueError(f"{path}: not a readable SMPL pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a pickled dict of SMPL fields, got {type(raw).__name__}")

    def field(key: str, ndim: int, dtype: type = np.float64) -> np.ndarray:
        if key not in raw:
            raise ValueError(f"{path}: missing field '{key}'")
        arr = _to_array(raw[key])
        if arr is None or arr.dtype == object or arr.ndim != ndim:
            shape = getattr(arr, "shape", None)
            raise ValueError(f"{path}: field '{key}' is not a {ndim}-d numeric array (got shape {shape})")
        arr = arr.astype(dtype)
        if dtype is np.float64 and not np.isfinite(arr).all():
            raise ValueError(f"{path}: field '{key}' contains non-finite values")
        return arr

    def expect(key: str, arr: np.ndarray, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"{path}: field '{key}' has shape {tuple(arr.shape)}, expected {expected}")

    v_template = field("v_template", 2)
    n_verts = v_template.shape[0]
    expect("v_template", v_template, v_template.shape[1] == 3 and n_verts > 0, "(V, 3)")
    shapedirs = field("shapedirs", 3)
    expect("shapedirs", shapedirs, shapedirs.shape[:2] == (n_verts, 3) and shapedirs.shape[2] >= num_betas,
           f"({n_verts}, 3, >={num_betas})")
    posedirs = field("posedirs", 3)
    expect("posedirs", posedirs, posedirs.shape == (n_verts, 3, 9 * (N_JOINTS - 1)),
           f"({n_verts}, 3, {9 * (N_JOINTS - 1)})")
    j_regressor = field("J_regressor", 2)
    expect("J_regressor", j_regressor, j_regressor.shape == (N_JOINTS, n_verts), f"({N_JOINTS}, {n_verts})")
    weights = field("weights", 2)
    expect("weights", weights, weights.shape == (n_verts, N_JOINTS), f"({n_verts}, {N_JOINTS})")
    if not np.allclose(weights.sum(1), 1.0, atol=1e-4):
        raise ValueError(f"{path}: field 'weights' rows must sum to 1")
    kintree = field("kintree_table", 2, np.int64)
    expect("kintree_table", kintree, kintree.shape == (2, N_JOINTS), f"(2, {N_JOINTS})")
    parents = kintree[0].copy()
    parents[0] = -1  # the official files store 4294967295 (uint32 -1) for the root
    if tuple(parents.tolist()) != SMPL_PARENTS:
        raise ValueError(f"{path}: field 'kintree_table' is not SMPL's kinematic tree: parents {parents.tolist()}")
    faces = field("f", 2, np.int64)
    expect("f", faces, faces.shape[1] == 3 and faces.shape[0] > 0, "(F, 3)")
    if faces.min() < 0 or faces.max() >= n_verts:
        raise ValueError(f"{path}: field 'f' indexes vertices outside [0, {n_verts})")
    return SmplArrays(path, v_template, shapedirs[:, :, :num_betas], posedirs, j_regressor, weights,
                      parents, faces)


# ----------------------------------------------------------------------------------------------
# derived data


def h36m_fallback_regressor(j_regressor: np.ndarray, template: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(17, V) H36M-like regressor from SMPL's joint regressor rows when ``J_regressor_h36m.npy`` is absent.

    Each joint is an SMPL joint (see ``_H36M_FROM_SMPL``); head_top is the mean of the head-skinned
    template vertices within 2 cm of the highest one (rows still sum to 1, still linear in vertices).
    """
    index = {n: i for i, n in enumerate(SMPL24_NAMES)}
    reg = np.zeros((len(H36M17_NAMES), j_regressor.shape[1]))
    for row, name in enumerate(H36M17_NAMES):
        if name == "head_top":
            head = index["head"]
            on_head = np.flatnonzero(weights.argmax(1) == head)
            if on_head.size:
                top = template[on_head, 1].max()
                chosen = on_head[template[on_head, 1] >= top - _HEAD_TOP_BAND_M]
                reg[row, chosen] = 1.0 / chosen.size
            else:  # no head-skinned vertex: extrapolate neck -> head once more
                reg[row] = 2.0 * j_regressor[head] - j_regressor[index["neck"]]
            continue
        for smpl_name, coef in _H36M_FROM_SMPL[name].items():
            reg[row] += coef * j_regressor[index[smpl_name]]
    return reg


def mirror_vertices(template: np.ndarray) -> tuple[np.ndarray, float]:
    """Each vertex's mirror twin (nearest neighbour of the x-mirrored template) and the worst distance."""
    mirrored = template * np.array([-1.0, 1.0, 1.0])
    dist, idx = cKDTree(template).query(mirrored)
    return idx.astype(np.int64), float(dist.max())


def pose_to_rotmats(pose: torch.Tensor) -> torch.Tensor:
    """(B,72) or (B,24,3) axis-angle, or (B,24,3,3) rotation matrices -> (B,24,3,3)."""
    if pose.dim() == 4 and pose.shape[1:] == (N_JOINTS, 3, 3):
        return pose
    if pose.dim() == 2 and pose.shape[1] == 3 * N_JOINTS:
        pose = pose.reshape(-1, N_JOINTS, 3)
    if pose.dim() == 3 and pose.shape[1:] == (N_JOINTS, 3):
        b = pose.shape[0]
        return batch_rodrigues(pose.reshape(-1, 3)).reshape(b, N_JOINTS, 3, 3)
    raise ValueError(f"pose must be (B,72), (B,24,3) axis-angle or (B,24,3,3) rotations, got {tuple(pose.shape)}")


# ----------------------------------------------------------------------------------------------
# the model


class SMPLBody(BodyModel):
    """SMPL (6890 vertices, 24 joints, 10 betas) from the user's model file.

    ``regressor17_source`` says which H36M regressor is in use: ``"file"`` (``J_regressor_h36m.npy``
    next to the model) or ``"fallback"`` (:func:`h36m_fallback_regressor`); ``require_h36m`` makes a
    missing file an error instead (the paper's protocol).
    """

    name = "smpl"
    shape_dim = 10

    def __init__(self, model_dir: Path | str | None = None, gender: str = "neutral", num_betas: int = 10,
                 require_h36m: bool = False) -> None:
        super().__init__()
        if gender not in GENDER_FILES:
            raise ValueError(f"gender must be one of {sorted(GENDER_FILES)}, got {gender!r}")
        if model_dir is None:
            from vqhps.config import Paths

            model_dir = Paths().smpl_dir
        self.model_dir = Path(model_dir)
        self.gender = gender
        self.shape_dim = int(num_betas)
        arrays = load_smpl_arrays(self.model_dir / GENDER_FILES[gender], num_betas=num_betas)
        self.model_path = arrays.path
        n_verts = arrays.v_template.shape[0]

        reg17_path = self.model_dir / H36M_REGRESSOR_FILE
        if require_h36m and not reg17_path.is_file():
            raise FileNotFoundError(
                f"H36M joint regressor not found: {reg17_path} (the paper's MPJPE / PA-MPJPE need it; "
                f"copy J_regressor_h36m.npy, (17, {n_verts}), from SPIN's or VIBE's data files into "
                f"{self.model_dir}, set {SMPL_ENV_VAR} to its folder)")
        if reg17_path.is_file():
            reg17 = _load_h36m_regressor(reg17_path, n_verts)
            self.regressor17_source = "file"
        else:
            reg17 = h36m_fallback_regressor(arrays.j_regressor, arrays.v_template, arrays.weights)
            self.regressor17_source = "fallback"
        flip, self.vertex_flip_error = mirror_vertices(arrays.v_template)

        f32 = torch.float32
        buffers = {
            "template": torch.tensor(arrays.v_template, dtype=f32),
            "faces": torch.tensor(arrays.faces, dtype=torch.long),
            "regressor24": torch.tensor(arrays.j_regressor, dtype=f32),
            "regressor17": torch.tensor(reg17, dtype=f32),
            "vertex_flip": torch.tensor(flip, dtype=torch.long),
            "shapedirs": torch.tensor(arrays.shapedirs, dtype=f32),
            # smplx.lbs wants (207, V*3): pose feature -> flattened vertex offsets
            "posedirs": torch.tensor(arrays.posedirs.reshape(-1, arrays.posedirs.shape[2]).T.copy(), dtype=f32),
            "lbs_weights": torch.tensor(arrays.weights, dtype=f32),
            "parents": torch.tensor(arrays.parents, dtype=torch.long),
        }
        for key, value in buffers.items():
            self.register_buffer(key, value, persistent=False)

    def forward(self, pose: torch.Tensor, shape: torch.Tensor | None = None) -> BodyOutput:
        """Pose (B,72)/(B,24,3) axis-angle or (B,24,3,3) rotations (joint 0 = global orientation),
        shape (B,num_betas) betas (None = mean shape) -> vertices (B,V,3) and the 24 regressor joints
        of the posed vertices (B,24,3)."""
        return self._pose(pose, shape)

    def _pose(self, pose: torch.Tensor, shape: torch.Tensor | None = None) -> BodyOutput:
        dtype, device = self.template.dtype, self.template.device
        rotmats = pose_to_rotmats(torch.as_tensor(pose, dtype=dtype, device=device))
        batch = rotmats.shape[0]
        if shape is None:
            shape = torch.zeros(batch, self.shape_dim, dtype=dtype, device=device)
        shape = torch.as_tensor(shape, dtype=dtype, device=device)
        if shape.dim() != 2 or shape.shape[1] != self.shape_dim or shape.shape[0] not in (1, batch):
            raise ValueError(f"shape must be (B,{self.shape_dim}) with B={batch}, got {tuple(shape.shape)}")
        shape = shape.expand(batch, -1)
        vertices, _ = lbs(shape, rotmats, self.template, self.shapedirs, self.posedirs, self.regressor24,
                          self.parents, self.lbs_weights, pose2rot=False)
        return BodyOutput(vertices=vertices, joints=self.joints24(vertices))


def _load_h36m_regressor(path: Path, n_verts: int) -> np.ndarray:
    """Read ``J_regressor_h36m.npy`` (17, V); ValueError naming the file when malformed."""
    try:
        reg = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable .npy regressor ({exc})") from exc
    if reg.shape != (len(H36M17_NAMES), n_verts) or not np.isfinite(reg).all():
        raise ValueError(f"{path}: regressor has shape {reg.shape}, expected ({len(H36M17_NAMES)}, {n_verts})")
    return reg.astype(np.float64)
