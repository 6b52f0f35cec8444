"""Helpers that WRITE small stand-ins of the real files in their exact formats: an SMPL model pickle
(official layout, 6890 vertices, 24 joints, random but valid values), an AMASS ``.npz`` and a 3DPW
sequence pickle with its JPEG frames. Tests import these; nothing here is a test."""
from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
from PIL import Image

N_VERTS = 6890
N_FACES = 13776
N_JOINTS = 24
#: kintree_table[0] of the official files: uint32, root parent stored as 2**32 - 1
SMPL_PARENTS_U32 = np.array([4294967295, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17,
                             18, 19, 20, 21], dtype=np.uint32)
PARENTS = [-1] + [int(p) for p in SMPL_PARENTS_U32[1:]]
#: rough T-pose joint positions of SMPL (m, y up, facing +z, left = +x), left side only mirrored below
_LEFT_JOINTS = {
    0: (0.0, 0.0, 0.0), 1: (0.06, -0.09, 0.0), 3: (0.0, 0.11, -0.02), 4: (0.10, -0.47, 0.0),
    6: (0.0, 0.24, 0.0), 7: (0.08, -0.87, -0.04), 9: (0.0, 0.29, 0.02), 10: (0.12, -0.93, 0.08),
    12: (0.0, 0.51, -0.01), 13: (0.08, 0.41, 0.0), 15: (0.0, 0.58, 0.04), 16: (0.18, 0.44, -0.01),
    18: (0.44, 0.43, -0.03), 20: (0.70, 0.44, -0.01), 22: (0.78, 0.43, -0.02),
}
_RIGHT_OF = {1: 2, 4: 5, 7: 8, 10: 11, 13: 14, 16: 17, 18: 19, 20: 21, 22: 23}
_CHILD = {0: 3, 1: 4, 3: 6, 4: 7, 6: 9, 7: 10, 9: 12, 12: 15, 13: 16, 16: 18, 18: 20, 20: 22}


def skeleton() -> np.ndarray:
    """(24, 3) symmetric T-pose joint positions."""
    joints = np.zeros((N_JOINTS, 3))
    for j, pos in _LEFT_JOINTS.items():
        joints[j] = pos
    for left, right in _RIGHT_OF.items():
        joints[right] = joints[left] * np.array([-1.0, 1.0, 1.0])
    return joints


def subtree(joint: int) -> list[int]:
    """``joint`` and all its descendants in the SMPL tree."""
    out = [joint]
    for j in range(joint + 1, N_JOINTS):
        if PARENTS[j] in out:
            out.append(j)
    return out


def make_smpl_arrays(seed: int = 0, n_shape: int = 10) -> dict[str, Any]:
    """The fields of an official SMPL pickle with random but valid values.

    The template is a mirror-symmetric cloud of points around the bones; each vertex is skinned to its
    bone's joint, half of them blended with the parent joint; pose correctives of joint j only move
    vertices skinned to j; J_regressor rows average a few vertices near each joint.
    """
    rng = np.random.default_rng(seed)
    joints = skeleton()
    left_joints = [j for j in range(N_JOINTS) if joints[j, 0] >= 0]
    half = N_VERTS // 2
    owner = rng.choice(left_joints, size=half)
    verts = np.empty((half, 3))
    for k, j in enumerate(owner):
        end = joints[_CHILD[j]] if j in _CHILD else joints[j] + np.array([0.03, 0.0, 0.03])
        point = joints[j] + rng.uniform(0.1, 0.9) * (end - joints[j]) + rng.normal(scale=0.04, size=3)
        if joints[j, 0] == 0.0:  # centre-line bones: keep every point strictly on the left
            point[0] = abs(point[0]) + 1e-3
        verts[k] = point
    verts[:, 0] = np.maximum(verts[:, 0], 1e-3)
    right_owner = np.array([_RIGHT_OF.get(j, j) for j in owner])
    v_template = np.concatenate([verts, verts * np.array([-1.0, 1.0, 1.0])])
    vert_joint = np.concatenate([owner, right_owner])

    weights = np.zeros((N_VERTS, N_JOINTS))
    blend = rng.uniform(0.5, 1.0, size=N_VERTS) * (rng.random(N_VERTS) < 0.5)
    for v, j in enumerate(vert_joint):
        if j == 0 or blend[v] == 0.0:
            weights[v, j] = 1.0
        else:
            weights[v, j] = blend[v]
            weights[v, PARENTS[j]] = 1.0 - blend[v]

    posedirs = np.zeros((N_VERTS, 3, 9 * (N_JOINTS - 1)))
    for j in range(1, N_JOINTS):
        skinned = weights[:, j] > 0
        posedirs[skinned, :, 9 * (j - 1): 9 * j] = rng.normal(scale=0.01, size=(int(skinned.sum()), 3, 9))

    j_regressor = np.zeros((N_JOINTS, N_VERTS))
    for j in range(N_JOINTS):
        nearest = np.argsort(np.linalg.norm(v_template - joints[j], axis=1))[:8]
        w = rng.uniform(0.5, 1.0, size=8)
        j_regressor[j, nearest] = w / w.sum()

    faces = np.stack([rng.choice(N_VERTS, size=3, replace=False) for _ in range(N_FACES)]).astype(np.uint32)
    shapedirs = rng.normal(scale=0.01, size=(N_VERTS, 3, n_shape))
    return {
        "J_regressor_prior": scipy.sparse.csc_matrix(j_regressor),
        "f": faces,
        "J_regressor": scipy.sparse.csc_matrix(j_regressor),
        "kintree_table": np.stack([SMPL_PARENTS_U32, np.arange(N_JOINTS, dtype=np.uint32)]),
        "J": j_regressor @ v_template,
        "weights_prior": weights.copy(),
        "weights": weights,
        "vert_sym_idxs": np.concatenate([np.arange(half, N_VERTS), np.arange(half)]),
        "posedirs": posedirs,
        "pose_training_info": {},
        "bs_style": "lbs",
        "v_template": v_template,
        "shapedirs": shapedirs,
        "bs_type": "lrotmin",
    }


class _FakeCh:
    """Pickles like chumpy's ``Ch``: class ``chumpy.ch.Ch`` with its array under state ``x``."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.dterms = ["x"]

    def __getstate__(self) -> dict[str, Any]:
        return {"x": self.x, "dterms": self.dterms}


def write_smpl_pkl(model_dir: Path, gender: str = "neutral", seed: int = 0, chumpy: bool = False,
                   arrays: dict[str, Any] | None = None) -> Path:
    """Write ``SMPL_<GENDER>.pkl`` (protocol 2, as the official files); ``chumpy=True`` wraps the
    dense arrays in chumpy objects like the official release does."""
    model_dir.mkdir(parents=True, exist_ok=True)
    data = dict(make_smpl_arrays(seed) if arrays is None else arrays)
    path = model_dir / f"SMPL_{gender.upper()}.pkl"
    if not chumpy:
        with path.open("wb") as fh:
            pickle.dump(data, fh, protocol=2)
        return path
    # pickle records the class as chumpy.ch.Ch: register a stand-in module while dumping
    pkg, mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    fake = type("Ch", (_FakeCh,), {"__module__": "chumpy.ch"})
    mod.Ch = fake
    pkg.ch = mod
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules.update({"chumpy": pkg, "chumpy.ch": mod})
    try:
        for key in ("v_template", "shapedirs", "posedirs", "weights", "J"):
            data[key] = fake(data[key])
        with path.open("wb") as fh:
            pickle.dump(data, fh, protocol=2)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return path


def write_amass_npz(path: Path, n_frames: int = 12, seed: int = 0, width: int = 156,
                    orient: np.ndarray | None = None, trans: np.ndarray | None = None,
                    body_pose: np.ndarray | None = None, drop: tuple[str, ...] = ()) -> Path:
    """An AMASS SMPL+H sequence: poses (T,width), betas (16,), trans (T,3), gender, mocap_framerate."""
    rng = np.random.default_rng(seed)
    poses = rng.normal(scale=0.3, size=(n_frames, width))
    if body_pose is not None:
        poses[:, 3:66] = body_pose
    if orient is not None:
        poses[:, :3] = orient
    data = {
        "poses": poses,
        "betas": rng.normal(size=16),
        "trans": rng.normal(size=(n_frames, 3)) if trans is None else trans,
        "gender": np.array("female"),
        "mocap_framerate": np.array(120.0),
        "dmpls": rng.normal(size=(n_frames, 8)),
    }
    for key in drop:
        data.pop(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return path


def camera_facing_body(distance: float, yaw: float) -> np.ndarray:
    """(4,4) world->camera extrinsic of an OpenCV camera at ``distance`` on +z (rotated by ``yaw``
    about world y) looking at the origin."""
    flip = np.diag([1.0, -1.0, -1.0])  # world y-up/z-towards-camera -> camera y-down/z-forward
    c, s = np.cos(yaw), np.sin(yaw)
    yaw_rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    rot = flip @ yaw_rot.T
    centre = yaw_rot @ np.array([0.0, 0.0, distance])
    ext = np.eye(4)
    ext[:3, :3] = rot
    ext[:3, 3] = -rot @ centre
    return ext


def write_pw3d(root: Path, sequence: str = "downtown_fake_00", n_frames: int = 3, n_people: int = 2,
               seed: int = 0, image_size: tuple[int, int] = (240, 320),
               split: str = "test") -> tuple[Path, Path, dict[str, Any]]:
    """A 3DPW sequence pickle under ``root/sequenceFiles/<split>`` (train, validation or test) and its
    JPEGs under ``root/imageFiles/<sequence>``; frame ``t`` uses image number ``2t`` and is filled with
    grey level ``(40 + 50 t) mod 256``. Returns (pkl path, image root, the pickled dict)."""
    rng = np.random.default_rng(seed)
    width, height = image_size
    poses, trans, betas, valid = [], [], [], []
    for p in range(n_people):
        pose = rng.normal(scale=0.2, size=(n_frames, 72))
        pose[:, :3] = rng.normal(scale=0.5, size=(n_frames, 3))
        poses.append(pose)
        trans.append(np.array([0.6 * p - 0.3, 0.0, 0.0]) + rng.normal(scale=0.05, size=(n_frames, 3)))
        betas.append(rng.normal(size=10))
        valid.append((np.arange(n_frames) + p) % 3 != 1)
    data = {
        "sequence": sequence,
        "genders": ["m", "f"][:n_people] + ["m"] * max(0, n_people - 2),
        "poses": poses,
        "betas": betas,
        "trans": trans,
        "cam_poses": np.stack([camera_facing_body(4.0 + 0.1 * t, 0.2 * t - 0.2) for t in range(n_frames)]),
        "cam_intrinsics": np.array([[400.0, 0.0, width / 2 - 0.5], [0.0, 410.0, height / 2 - 0.5],
                                    [0.0, 0.0, 1.0]]),
        "campose_valid": [v.astype(np.int64) for v in valid],
        "img_frame_ids": np.arange(n_frames) * 2,
        "poses2d": [rng.normal(size=(n_frames, 3, 18)) for _ in range(n_people)],
        "jointPositions": [rng.normal(size=(n_frames, 72)) for _ in range(n_people)],
        "betas_clothed": betas,
        "v_template_clothed": [np.zeros((N_VERTS, 3)) for _ in range(n_people)],
        "texture_maps": [np.zeros((4, 4, 3)) for _ in range(n_people)],
    }
    pkl = root / "sequenceFiles" / split / f"{sequence}.pkl"
    pkl.parent.mkdir(parents=True, exist_ok=True)
    with pkl.open("wb") as fh:
        pickle.dump(data, fh, protocol=2)
    image_root = root / "imageFiles"
    (image_root / sequence).mkdir(parents=True, exist_ok=True)
    for t in range(n_frames):
        img = np.full((height, width, 3), (40 + 50 * t) % 256, np.uint8)
        Image.fromarray(img).save(image_root / sequence / f"image_{2 * t:05d}.jpg", quality=95)
    return pkl, image_root, data


def rewrite_pickle(src: Path, dst: Path, **changes: Any) -> Path:
    """Copy a pickled dict with keys replaced (value ``None`` deletes the key)."""
    with src.open("rb") as fh:
        data = pickle.load(fh, encoding="latin1")
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("wb") as fh:
        pickle.dump(data, fh, protocol=2)
    return dst


def symmetric_smpl_arrays(seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """``make_smpl_arrays`` whose joint regressor is mirror-symmetric too (each right joint's row is
    its left twin's on the mirrored vertices; midline rows averaged with their mirror), as SMPL's
    nearly is: a flipped image's joints are then exactly the mirrored mesh's. Returns (arrays, (24, V)
    regressor)."""
    arrays = make_smpl_arrays(seed)
    reg = arrays["J_regressor"].toarray()
    twin = arrays["vert_sym_idxs"]
    for left, right in _RIGHT_OF.items():
        reg[right] = reg[left][twin]
    for j in set(range(N_JOINTS)) - set(_RIGHT_OF) - set(_RIGHT_OF.values()):
        reg[j] = 0.5 * (reg[j] + reg[j][twin])
    arrays["J_regressor"] = scipy.sparse.csc_matrix(reg)
    arrays["J"] = reg @ arrays["v_template"]
    return arrays, reg


#: H36M-17 joints (the usual regressor's order) as the SMPL joints the stand-in regressor copies
H36M_AS_SMPL = ("pelvis", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "spine2",
                "neck", "head", "head", "left_shoulder", "left_elbow", "left_wrist", "right_shoulder", "right_elbow",
                "right_wrist")
SMPL_JOINT_NAMES = ("pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle",
                    "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head",
                    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                    "left_hand", "right_hand")


def local_faces(vertices: np.ndarray, n_faces: int = N_FACES, spare: int = 64) -> np.ndarray:
    """(n_faces, 3) uint32 small triangles over ``vertices``: each vertex with its nearest neighbours,
    plus one triangle joining every stray patch to the largest, so the surface is connected. Random
    faces would span the body: software rendering of such a mesh costs seconds a frame."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    tree = cKDTree(vertices)
    _, nn = tree.query(vertices, k=4)
    faces = np.concatenate([nn[:, [0, 1, 2]], nn[:, [0, 2, 3]]])[:n_faces - spare]
    n = len(vertices)
    edges = coo_matrix((np.ones(faces.size), (faces.ravel(), np.roll(faces, 1, axis=1).ravel())), shape=(n, n))
    _, label = connected_components(edges, directed=False)
    main = np.flatnonzero(label == np.bincount(label).argmax())
    main_tree = cKDTree(vertices[main])
    links = []
    for comp in set(label.tolist()) - {int(label[main[0]])}:
        v = int(np.flatnonzero(label == comp)[0])
        _, near = main_tree.query(vertices[v], k=2)
        links.append([v, int(main[near[0]]), int(main[near[1]])])
    if len(links) > spare:
        raise ValueError(f"{len(links)} stray patches, more than the {spare} spare faces")
    faces = np.concatenate([faces, np.asarray(links, dtype=np.int64).reshape(-1, 3)])
    return np.concatenate([faces, faces[:n_faces - len(faces)]]).astype(np.uint32)


def write_paper_files(root: Path, frames: dict[str, int] | None = None, seed: int = 0) -> dict[str, Path]:
    """The paper source's files in their fixed layout under ``root``: ``smpl/SMPL_NEUTRAL.pkl`` (a
    symmetric random model with small faces) and ``smpl/J_regressor_h36m.npy`` (17, 6890, non-negative); two AMASS
    sequences (SMPL+H and SMPL widths) and a ``shape.npz`` under ``amass/``; a two-person 3DPW sequence
    per split (``frames`` per split, default train 8, validation 3, test 5) under ``3dpw/``. Returns
    {"smpl", "amass", "3dpw"} folders."""
    frames = frames or {"train": 8, "validation": 3, "test": 5}
    smpl, amass, pw3d = root / "smpl", root / "amass", root / "3dpw"
    arrays, reg = symmetric_smpl_arrays(seed)
    arrays["f"] = local_faces(arrays["v_template"])
    write_smpl_pkl(smpl, arrays=arrays)
    np.save(smpl / "J_regressor_h36m.npy", np.stack([reg[SMPL_JOINT_NAMES.index(n)] for n in H36M_AS_SMPL]))
    write_amass_npz(amass / "CMU" / "01" / "01_01_poses.npz", n_frames=60, seed=seed + 1)
    write_amass_npz(amass / "BMLrub" / "s2" / "walk_poses.npz", n_frames=60, seed=seed + 2, width=72)
    np.savez(amass / "CMU" / "01" / "shape.npz", betas=np.zeros(16), gender=np.array("male"))
    for k, (split, n) in enumerate(frames.items()):
        write_pw3d(pw3d, sequence=f"{split}_seq_00", n_frames=n, n_people=2, seed=seed + 10 + k, split=split)
    return {"smpl": smpl, "amass": amass, "3dpw": pw3d}
