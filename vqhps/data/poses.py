"""Procedural pose library for the anny body model.

No motion capture ships with any package here, so body poses are built from hand-authored key poses
expressed as anatomical joint angles, interpolated, perturbed and clipped to anatomical limits.

Conventions (measured on anny 0.6.2, rig "anny", pose parameterisation "local-ref"):

* anny is z-up, in metres, faces -y; its left side (``.L``) is +x.
* A local-ref rotation ``D_c`` of bone ``c`` rotates the bone's subtree about the bone's head, about
  axes that are world-aligned in the rest pose and carried along by the parent: the posed world
  rotation of a bone (relative to rest) is ``G_c = G_parent @ D_c``, as in SMPL.
* Anatomical angles are measured from the **anatomical position** (upright, legs straight and
  vertical, arms hanging straight down, palms facing forward), not from anny's rest pose (arms in a
  wide A, elbows bent about 42 degrees, knees bent about 9 degrees). Fixed neutral offsets, derived
  from anny's rest skeleton (``ANNY_REST_HEADS``), bridge the two. All angles are zero -> anatomical
  position; the rotations then are not identity for hips, knees, feet, arms and hands.
* Each joint's three angles (flexion, abduction, twist) are rotations about world axes of the
  anatomical position, composed parent-first (``E = R_flex @ R_abd @ R_twist``): twist spins the
  bone about its own long axis, abduction moves it in the coronal plane, flexion in the sagittal one.
* Sign conventions, identical for left and right (the right side mirrors the left): flexion moves
  the distal segment forward (knee: backward), abduction moves it away from the midline, twist is
  internal rotation / pronation. Midline joints (spine, neck, head): flexion bends forward, the
  "abduction" slot bends toward the body's left, twist turns toward the left.

Axis mapping in anny world axes for the LEFT side (the right side flips the signs of y and z):
hip/shoulder/elbow/wrist flexion = -x, knee flexion = +x, ankle dorsiflexion = -x; abduction = -y;
internal rotation = -z. Spine/neck/head: flexion +x, left bend +y, left turn +z.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import roma
import torch

# --------------------------------------------------------------------------------------------------
# anny's skeleton (rig "anny"): 104 bones in model order, and the parent of each.


def _anny_bone_labels() -> tuple[str, ...]:
    """anny's 104 bone labels, in model order."""

    def leg(s: str) -> list[str]:
        toes = ["toe1-1", "toe1-2"] + [f"toe{t}-{k}" for t in range(2, 6) for k in (1, 2, 3)]
        return [f"pelvis.{s}", f"upperleg01.{s}", f"upperleg02.{s}", f"lowerleg01.{s}",
                f"lowerleg02.{s}", f"foot.{s}"] + [f"{t}.{s}" for t in toes]

    def arm(s: str) -> list[str]:
        hand = ["finger1-1", "finger1-2", "finger1-3"]
        for f in range(2, 6):
            hand += [f"metacarpal{f - 1}", f"finger{f}-1", f"finger{f}-2", f"finger{f}-3"]
        return [f"clavicle.{s}", f"shoulder01.{s}", f"upperarm01.{s}", f"upperarm02.{s}",
                f"lowerarm01.{s}", f"lowerarm02.{s}", f"wrist.{s}"] + [f"{h}.{s}" for h in hand]

    spine = ["spine05", "spine04", "spine03", "spine02", "spine01"]
    head = ["neck01", "neck02", "neck03", "head", "eye.L", "eye.R"]
    return tuple(["root"] + leg("L") + leg("R") + spine + arm("L") + arm("R") + head)


ANNY_BONE_LABELS: tuple[str, ...] = _anny_bone_labels()
ANNY_N_BONES = len(ANNY_BONE_LABELS)
_BONE = {name: i for i, name in enumerate(ANNY_BONE_LABELS)}


def _anny_bone_parents() -> tuple[int, ...]:
    """Parent index of each anny bone (-1 for the root), matching ``anny.Anny().bone_parents``."""
    parent = {"root": None}
    for s in "LR":
        chain = [f"pelvis.{s}", f"upperleg01.{s}", f"upperleg02.{s}", f"lowerleg01.{s}",
                 f"lowerleg02.{s}", f"foot.{s}"]
        parent[chain[0]] = "root"
        for a, b in zip(chain, chain[1:]):
            parent[b] = a
        for t in range(1, 6):
            digits = (1, 2) if t == 1 else (1, 2, 3)
            prev = f"foot.{s}"
            for k in digits:
                parent[f"toe{t}-{k}.{s}"] = prev
                prev = f"toe{t}-{k}.{s}"
        chain = [f"clavicle.{s}", f"shoulder01.{s}", f"upperarm01.{s}", f"upperarm02.{s}",
                 f"lowerarm01.{s}", f"lowerarm02.{s}", f"wrist.{s}"]
        parent[chain[0]] = "spine01"
        for a, b in zip(chain, chain[1:]):
            parent[b] = a
        parent[f"finger1-1.{s}"] = f"wrist.{s}"
        parent[f"finger1-2.{s}"] = f"finger1-1.{s}"
        parent[f"finger1-3.{s}"] = f"finger1-2.{s}"
        for f in range(2, 6):
            parent[f"metacarpal{f - 1}.{s}"] = f"wrist.{s}"
            parent[f"finger{f}-1.{s}"] = f"metacarpal{f - 1}.{s}"
            parent[f"finger{f}-2.{s}"] = f"finger{f}-1.{s}"
            parent[f"finger{f}-3.{s}"] = f"finger{f}-2.{s}"
    chain = ["root", "spine05", "spine04", "spine03", "spine02", "spine01", "neck01", "neck02",
             "neck03", "head"]
    for a, b in zip(chain, chain[1:]):
        parent[b] = a
    parent["eye.L"] = parent["eye.R"] = "head"
    return tuple(-1 if parent[n] is None else _BONE[parent[n]] for n in ANNY_BONE_LABELS)


ANNY_BONE_PARENTS: tuple[int, ...] = _anny_bone_parents()

#: Bone heads of anny's rest pose (metres, phenotype 0.5), left side and midline; the right side is
#: the mirror image (x -> -x). Source of the neutral offsets here and of the BVH retargeting.
ANNY_REST_HEADS: dict[str, tuple[float, float, float]] = {
    "upperleg01.L": (0.102, 0.004, -0.007),
    "lowerleg01.L": (0.133, -0.028, -0.396),
    "foot.L": (0.170, 0.000, -0.796),
    "toe3-1.L": (0.185, -0.135, -0.842),
    "spine05": (0.000, 0.000, 0.000),
    "spine04": (0.000, 0.032, 0.068),
    "spine03": (0.000, 0.019, 0.136),
    "spine02": (0.000, 0.018, 0.211),
    "spine01": (0.000, 0.035, 0.345),
    "neck01": (0.000, 0.006, 0.513),
    "neck02": (0.000, -0.004, 0.541),
    "neck03": (0.000, -0.016, 0.580),
    "head": (0.000, -0.030, 0.609),
    "clavicle.L": (0.022, -0.016, 0.447),
    "shoulder01.L": (0.101, -0.020, 0.465),
    "upperarm01.L": (0.165, -0.013, 0.427),
    "lowerarm01.L": (0.334, -0.019, 0.239),
    "lowerarm02.L": (0.390, -0.095, 0.181),
    "wrist.L": (0.450, -0.174, 0.121),
    "finger1-1.L": (0.451, -0.218, 0.113),
    "finger2-1.L": (0.477, -0.267, 0.081),
    "finger3-1.L": (0.493, -0.250, 0.070),
    "finger5-1.L": (0.502, -0.214, 0.054),
}
#: Direction of anny's head bone at rest (its tail has no child bone to point at).
ANNY_HEAD_DIRECTION: tuple[float, float, float] = (0.0, 0.040, 0.999)


def rest_head(bone: str) -> np.ndarray:
    """Rest-pose head of any body bone in ``ANNY_REST_HEADS``, mirroring ``.R`` bones from ``.L``."""
    if bone.endswith(".R"):
        x, y, z = ANNY_REST_HEADS[bone[:-2] + ".L"]
        return np.array([-x, y, z])
    return np.array(ANNY_REST_HEADS[bone], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Articulated joints: which bones move, about which axes, within which limits.


class JointSpec(NamedTuple):
    """One kind of joint: motion names, (axis, sign) per angle for the left/midline side, limits."""

    motions: tuple[str, str, str]
    axes: tuple[tuple[str, int], tuple[str, int], tuple[str, int]]
    limits: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]


_LIMB = (("x", -1), ("y", -1), ("z", -1))
_MIDLINE = (("x", 1), ("y", 1), ("z", 1))
_GIRDLE = (("z", -1), ("y", -1), ("x", 1))

#: Per-kind specification. Spine and neck limits are per segment (5 spine, 3 neck segments).
JOINT_SPECS: dict[str, JointSpec] = {
    "hip": JointSpec(("flexion", "abduction", "internal rotation"), _LIMB,
                     ((-30, 125), (-30, 50), (-60, 45))),
    "knee": JointSpec(("flexion", "valgus", "internal rotation"), (("x", 1), ("y", -1), ("z", -1)),
                      ((0, 150), (-3, 3), (-10, 10))),
    "ankle": JointSpec(("dorsiflexion", "eversion", "internal rotation"), _LIMB,
                       ((-50, 30), (-30, 20), (-20, 20))),
    "spine": JointSpec(("flexion", "left bend", "left turn"), _MIDLINE,
                       ((-6, 15), (-7, 7), (-8, 8))),
    "neck": JointSpec(("flexion", "left bend", "left turn"), _MIDLINE,
                      ((-18, 15), (-10, 10), (-12, 12))),
    "head": JointSpec(("flexion", "left bend", "left turn"), _MIDLINE,
                      ((-15, 20), (-8, 8), (-30, 30))),
    "clavicle": JointSpec(("protraction", "elevation", "roll"), _GIRDLE,
                          ((-15, 15), (-10, 30), (-10, 10))),
    "scapula": JointSpec(("protraction", "elevation", "roll"), _GIRDLE,
                         ((-10, 10), (-5, 20), (-5, 5))),
    "shoulder": JointSpec(("flexion", "abduction", "internal rotation"), _LIMB,
                          ((-60, 180), (-45, 180), (-90, 80))),
    "elbow": JointSpec(("flexion", "valgus", "twist"), _LIMB, ((0, 150), (-5, 5), (0, 0))),
    "forearm": JointSpec(("-", "-", "pronation"), _LIMB, ((0, 0), (0, 0), (-10, 170))),
    "wrist": JointSpec(("flexion", "radial deviation", "twist"), _LIMB,
                       ((-70, 80), (-35, 20), (-5, 5))),
}

_SIDED_KIND_BONES = (
    ("hip", "upperleg01"), ("knee", "lowerleg01"), ("ankle", "foot"),
)
_ARM_KIND_BONES = (
    ("clavicle", "clavicle"), ("scapula", "shoulder01"), ("shoulder", "upperarm01"),
    ("elbow", "lowerarm01"), ("forearm", "lowerarm02"), ("wrist", "wrist"),
)
SPINE_BONES = ("spine05", "spine04", "spine03", "spine02", "spine01")
NECK_BONES = ("neck01", "neck02", "neck03")


def _articulation() -> list[tuple[str, str, str]]:
    """(bone, kind, side) of every articulated bone, side in {"L", "R", ""}, in anny bone order."""
    rows = [(f"{b}.{s}", k, s) for s in "LR" for k, b in _SIDED_KIND_BONES]
    rows += [(b, "spine", "") for b in SPINE_BONES]
    rows += [(f"{b}.{s}", k, s) for s in "LR" for k, b in _ARM_KIND_BONES]
    rows += [(b, "neck", "") for b in NECK_BONES] + [("head", "head", "")]
    return sorted(rows, key=lambda r: _BONE[r[0]])


_ARTICULATION = _articulation()
#: anny bones driven by the poses, in anny bone order; index j of an angle array (J, 3) is bone j here.
ARTICULATED_BONES: tuple[str, ...] = tuple(r[0] for r in _ARTICULATION)
JOINT_KINDS: tuple[str, ...] = tuple(r[1] for r in _ARTICULATION)
JOINT_SIDES: tuple[str, ...] = tuple(r[2] for r in _ARTICULATION)
N_JOINTS = len(ARTICULATED_BONES)
JOINT_INDEX: dict[str, int] = {b: j for j, b in enumerate(ARTICULATED_BONES)}
_ART_BONE_IDX = torch.tensor([_BONE[b] for b in ARTICULATED_BONES])
#: index of each joint's mirror partner (itself on the midline)
MIRROR_INDEX: np.ndarray = np.array([
    JOINT_INDEX[b[:-2] + (".R" if s == "L" else ".L")] if s else j
    for j, (b, s) in enumerate(zip(ARTICULATED_BONES, JOINT_SIDES))
])
_AXIS_ID = {"x": 0, "y": 1, "z": 2}


def _axes_signs() -> tuple[np.ndarray, np.ndarray]:
    """(J, 3) axis ids and (J, 3) signs, the right side mirroring the left (y and z flip)."""
    axes = np.zeros((N_JOINTS, 3), dtype=np.int64)
    signs = np.zeros((N_JOINTS, 3))
    for j, (kind, side) in enumerate(zip(JOINT_KINDS, JOINT_SIDES)):
        for k, (ax, sign) in enumerate(JOINT_SPECS[kind].axes):
            axes[j, k] = _AXIS_ID[ax]
            signs[j, k] = -sign if side == "R" and ax != "x" else sign
    return axes, signs


_AXES, _SIGNS = _axes_signs()
#: multiply a midline joint's angles by this when mirroring (world y/z rotations flip sign)
_MIDLINE_MIRROR = np.where(
    (np.array(JOINT_SIDES)[:, None] == "") & (_AXES != 0), -1.0, 1.0)


@dataclass(frozen=True, eq=False)
class JointLimits:
    """Anatomical ranges (degrees) of the (flexion, abduction, twist) angles of every joint."""

    lower: np.ndarray  # (J, 3)
    upper: np.ndarray  # (J, 3)

    @classmethod
    def default(cls) -> "JointLimits":
        """The limits of ``JOINT_SPECS`` laid out over ``ARTICULATED_BONES``."""
        lim = np.array([JOINT_SPECS[k].limits for k in JOINT_KINDS], dtype=np.float64)
        return cls(lower=lim[..., 0], upper=lim[..., 1])

    @property
    def span(self) -> np.ndarray:
        """(J, 3) width of each range (0 for motions a joint does not have)."""
        return self.upper - self.lower

    def clip(self, angles: np.ndarray) -> np.ndarray:
        """Angles (..., J, 3) clipped into the ranges."""
        return np.clip(angles, self.lower, self.upper)

    def violation(self, angles: np.ndarray) -> np.ndarray:
        """(..., J, 3) degrees by which each angle leaves its range (0 inside)."""
        return np.maximum(self.lower - angles, 0) + np.maximum(angles - self.upper, 0)

    def contains(self, angles: np.ndarray, tol: float = 1e-6) -> np.ndarray:
        """Whether each pose (..., J, 3) lies within every range."""
        return (self.violation(np.asarray(angles)) <= tol).all(axis=(-1, -2))

    def table(self) -> list[tuple[str, str, float, float]]:
        """(bone, motion, lower, upper) rows, for documentation and notebooks."""
        return [(b, JOINT_SPECS[k].motions[m], float(self.lower[j, m]), float(self.upper[j, m]))
                for j, (b, k) in enumerate(zip(ARTICULATED_BONES, JOINT_KINDS)) for m in range(3)]


JOINT_LIMITS = JointLimits.default()


def mirror_angles(angles: np.ndarray) -> np.ndarray:
    """Left/right mirror image of poses (..., J, 3): swap sides, flip midline bends and turns."""
    angles = np.asarray(angles)
    return angles[..., MIRROR_INDEX, :] * _MIDLINE_MIRROR


# --------------------------------------------------------------------------------------------------
# Neutral offsets: anny's rest pose -> anatomical position.


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 3) smallest rotation taking direction a to direction b."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if np.linalg.norm(v) < 1e-12:
        if c > 0:
            return np.eye(3)
        axis = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        return roma.rotvec_to_rotmat(torch.tensor(axis / np.linalg.norm(axis) * np.pi)).numpy()
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1.0 + c)


def _rot_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _neutral_offsets_left() -> dict[str, np.ndarray]:
    """World rotations, applied bone by bone from the rest pose, reaching the anatomical position.

    Thigh and shank vertical (the foot keeps its rest orientation, flat); upper arm and forearm
    hanging straight down; hand in line with the forearm, palm forward (index knuckle lateral).
    """
    h = {k: rest_head(k) for k in ANNY_REST_HEADS if not k.endswith(".R")}
    down = np.array([0.0, 0.0, -1.0])
    q: dict[str, np.ndarray] = {}

    def turn(bone: str, rot: np.ndarray, moved: Sequence[str]) -> None:
        pivot = h[bone]
        for m in moved:
            h[m] = pivot + rot @ (h[m] - pivot)
        q[bone] = rot

    leg = ["lowerleg01.L", "foot.L", "toe3-1.L"]
    turn("upperleg01.L", rotation_between(h["lowerleg01.L"] - h["upperleg01.L"], down), leg)
    turn("lowerleg01.L", rotation_between(h["foot.L"] - h["lowerleg01.L"], down), leg[1:])
    q["foot.L"] = (q["lowerleg01.L"] @ q["upperleg01.L"]).T
    hand = ["finger1-1.L", "finger2-1.L", "finger3-1.L", "finger5-1.L"]
    arm = ["lowerarm01.L", "lowerarm02.L", "wrist.L"] + hand
    turn("upperarm01.L", rotation_between(h["lowerarm01.L"] - h["upperarm01.L"], down), arm)
    turn("lowerarm01.L", rotation_between(h["wrist.L"] - h["lowerarm01.L"], down), arm[1:])
    align = rotation_between(h["finger3-1.L"] - h["wrist.L"], down)
    across = align @ (h["finger2-1.L"] - h["finger5-1.L"])
    twist = _rot_z(-np.degrees(np.arctan2(across[1], across[0])))
    q["lowerarm02.L"] = twist
    q["wrist.L"] = twist @ align @ twist.T
    return q


def _neutral_tables() -> tuple[np.ndarray, np.ndarray]:
    """(J,3,3) neutral offset Q_c and (J,3,3) neutral world frame of each joint's parent G^N_p."""
    left = _neutral_offsets_left()
    mirror = np.diag([-1.0, 1.0, 1.0])
    q_all = {b: np.eye(3) for b in ANNY_BONE_LABELS}
    for b, rot in left.items():
        q_all[b] = rot
        q_all[b[:-2] + ".R"] = mirror @ rot @ mirror
    world = {}
    for i, b in enumerate(ANNY_BONE_LABELS):  # parents precede children in anny's order
        p = ANNY_BONE_PARENTS[i]
        world[b] = q_all[b] @ (world[ANNY_BONE_LABELS[p]] if p >= 0 else np.eye(3))
    q = np.stack([q_all[b] for b in ARTICULATED_BONES])
    gp = np.stack([world[ANNY_BONE_LABELS[ANNY_BONE_PARENTS[_BONE[b]]]] for b in ARTICULATED_BONES])
    return q, gp


_Q, _GP = (torch.from_numpy(t) for t in _neutral_tables())
_CONVENTIONS = ["".join("XYZ"[a] for a in row) for row in _AXES]


# --------------------------------------------------------------------------------------------------
# Angles <-> anny local rotations.


def angles_to_local_rotations(angles: np.ndarray | torch.Tensor,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Anatomical angles (..., J, 3) in degrees -> anny local-ref rotations (..., 104, 3, 3).

    Per joint ``D = Gp^T @ E @ Q @ Gp``: E the Euler rotation of the angles, Q the neutral offset,
    Gp the parent's frame in the anatomical position. Unarticulated bones (root, pelvis, twist
    helpers, fingers, toes, eyes) get the identity.
    """
    a = torch.as_tensor(np.asarray(angles, dtype=np.float64) if not torch.is_tensor(angles)
                        else angles.detach().cpu().double())
    if a.shape[-2:] != (N_JOINTS, 3):
        raise ValueError(f"expected angles (..., {N_JOINTS}, 3), got {tuple(a.shape)}")
    rad = torch.deg2rad(a) * torch.from_numpy(_SIGNS)
    euler = torch.empty(*a.shape[:-1], 3, 3, dtype=torch.float64)
    for conv in set(_CONVENTIONS):
        cols = [j for j, c in enumerate(_CONVENTIONS) if c == conv]
        euler[..., cols, :, :] = roma.euler_to_rotmat(conv, rad[..., cols, :])
    local = _GP.transpose(-1, -2) @ euler @ _Q @ _GP
    out = torch.eye(3, dtype=torch.float64).expand(*a.shape[:-2], ANNY_N_BONES, 3, 3).clone()
    out[..., _ART_BONE_IDX, :, :] = local
    return out.to(dtype)


def local_rotations_to_angles(rotations: np.ndarray | torch.Tensor) -> np.ndarray:
    """anny local-ref rotations (..., 104, 3, 3) -> anatomical angles (..., J, 3), degrees.

    Inverse of ``angles_to_local_rotations`` up to Euler-angle ambiguity (an abduction beyond
    +-90 degrees comes back as the equivalent triple with it inside); unarticulated bones are ignored.
    """
    r = torch.as_tensor(np.asarray(rotations, dtype=np.float64) if not torch.is_tensor(rotations)
                        else rotations.detach().cpu().double())
    local = r[..., _ART_BONE_IDX, :, :]
    euler = _GP @ local @ _GP.transpose(-1, -2) @ _Q.transpose(-1, -2)
    rad = torch.empty(*local.shape[:-2], 3, dtype=torch.float64)
    for conv in set(_CONVENTIONS):
        cols = [j for j, c in enumerate(_CONVENTIONS) if c == conv]
        rad[..., cols, :] = roma.rotmat_to_euler(conv, euler[..., cols, :, :])
    return (torch.rad2deg(rad) / torch.from_numpy(_SIGNS)).numpy()


# --------------------------------------------------------------------------------------------------
# Key poses.

_SIDED_KINDS = {k for k, _ in _SIDED_KIND_BONES} | {k for k, _ in _ARM_KIND_BONES}
_KIND_BONE = dict(_SIDED_KIND_BONES) | dict(_ARM_KIND_BONES)

Angles3 = float | tuple[float, float, float]


def _triple(kind: str, value: Angles3) -> np.ndarray:
    """A bare number is the joint's main motion: pronation for the forearm, flexion otherwise."""
    if isinstance(value, (int, float)):
        return np.array([0.0, 0.0, value]) if kind == "forearm" else np.array([value, 0.0, 0.0])
    return np.asarray(value, dtype=np.float64)


def compose_pose(**joints: Angles3) -> np.ndarray:
    """Angles (J, 3) from anatomical joints; unnamed joints stay in the anatomical position.

    Keys: ``spine`` and ``neck`` (totals spread evenly over their segments), ``head``, and
    ``<kind>_l`` / ``<kind>_r`` for kind in hip, knee, ankle, clavicle, scapula, shoulder, elbow,
    forearm, wrist. Values: (flexion, abduction, twist) in degrees, or one number (see ``_triple``).
    """
    angles = np.zeros((N_JOINTS, 3))
    for key, value in joints.items():
        if key in ("spine", "neck"):
            bones = SPINE_BONES if key == "spine" else NECK_BONES
            for b in bones:
                angles[JOINT_INDEX[b]] = _triple(key, value) / len(bones)
        elif key == "head":
            angles[JOINT_INDEX["head"]] = _triple(key, value)
        else:
            kind, _, side = key.rpartition("_")
            if kind not in _SIDED_KINDS or side not in ("l", "r"):
                raise KeyError(f"unknown joint {key!r}")
            angles[JOINT_INDEX[f"{_KIND_BONE[kind]}.{side.upper()}"]] = _triple(kind, value)
    return angles


def _both(**joints: Angles3) -> dict[str, Angles3]:
    """The same angles on both sides: ``_both(knee=30)`` -> ``{"knee_l": 30, "knee_r": 30}``."""
    return {f"{k}_{s}": v for k, v in joints.items() for s in "lr"}


#: arms hanging relaxed: slightly away from the thighs, palms toward them
_RELAXED_ARMS = _both(shoulder=(0, 8, 0), elbow=12, forearm=80, wrist=(5, 0, 0))


def _key_poses() -> dict[str, np.ndarray]:
    """Hand-authored key poses. One-sided poses use the right arm / leg (the sampler mirrors them);
    ``walk_right`` and ``run_right`` are the mirror images of the ``_left`` phases."""
    p: dict[str, np.ndarray] = {}
    p["stand"] = compose_pose(**_RELAXED_ARMS, **_both(hip=(0, 3, 0), knee=3))
    p["t_pose"] = compose_pose(**_both(shoulder=(0, 90, 0), forearm=90))
    p["a_pose"] = compose_pose(**_both(shoulder=(0, 45, 0), elbow=5, forearm=90))
    p["walk_left"] = compose_pose(
        hip_l=(25, 2, 0), knee_l=5, ankle_l=5, hip_r=(-12, 2, 0), knee_r=15, ankle_r=-15,
        shoulder_l=(-20, 8, 0), shoulder_r=(20, 8, 0), **_both(elbow=20, forearm=80),
        spine=(3, 0, -6), head=(0, 0, 5))
    p["run_left"] = compose_pose(
        hip_l=(65, 3, 0), knee_l=95, ankle_l=10, hip_r=(-20, 3, 0), knee_r=30, ankle_r=-30,
        shoulder_l=(-40, 10, 0), shoulder_r=(55, 10, 0), elbow_l=80, elbow_r=95,
        **_both(forearm=80), spine=(12, 0, -12), neck=(-12, 0, 0), head=(0, 0, 8))
    p["sit"] = compose_pose(
        **_both(hip=(90, 6, 0), knee=90, shoulder=(20, 8, 0), elbow=60, forearm=90),
        spine=(5, 0, 0))
    p["crouch"] = compose_pose(
        **_both(hip=(110, 15, -5), knee=120, ankle=25, shoulder=(45, 10, 0), elbow=60,
                forearm=90), spine=(35, 0, 0), neck=(-20, 0, 0))
    p["kneel"] = compose_pose(
        **_both(hip=(5, 5, 0), knee=95, ankle=-40), **_RELAXED_ARMS, spine=(0, 0, 0))
    p["reach_up"] = compose_pose(
        **_RELAXED_ARMS | dict(shoulder_r=(170, 10, 0), elbow_r=5, scapula_r=(0, 15, 0),
                                forearm_r=20),
        **_both(ankle=-15), spine=(-10, 4, 0), neck=(-20, 0, 0))
    p["reach_forward"] = compose_pose(
        **_both(shoulder=(90, 5, 0), elbow=5, forearm=70, clavicle=(10, 0, 0), hip=(25, 3, 0)),
        spine=(25, 0, 0), neck=(-15, 0, 0))
    p["wave"] = compose_pose(
        **_RELAXED_ARMS | dict(shoulder_r=(15, 85, -80), elbow_r=95, forearm_r=90, wrist_r=(0, 0, 0)),
        head=(0, 0, -10))
    p["jump"] = compose_pose(
        **_both(shoulder=(150, 15, 0), elbow=15, forearm=80, hip=(30, 5, 0), knee=60, ankle=-35),
        spine=(-10, 0, 0))
    p["lie"] = compose_pose(
        **_both(shoulder=(0, 20, 0), elbow=15, forearm=60, hip=(0, 8, -10), knee=5, ankle=-25))
    p["bend_forward"] = compose_pose(
        **_both(hip=(65, 3, 0), knee=5, shoulder=(100, 5, 0), elbow=10, forearm=80),
        spine=(45, 0, 0), neck=(-15, 0, 0))
    p["throw"] = compose_pose(
        shoulder_r=(-10, 90, -85), elbow_r=90, forearm_r=40, shoulder_l=(70, 25, 0), elbow_l=30,
        forearm_l=80, hip_l=(30, 5, 0), knee_l=15, hip_r=(-10, 8, 0), knee_r=20,
        spine=(-5, 10, -30), head=(0, 0, 25))
    p["kick"] = compose_pose(
        hip_r=(80, 0, 0), knee_r=20, ankle_r=-30, hip_l=(10, 0, 0), knee_l=15,
        **_both(shoulder=(10, 45, 0), elbow=20, forearm=80), spine=(-10, 0, 0))
    p["squat"] = compose_pose(
        **_both(hip=(115, 20, -15), knee=130, ankle=28, shoulder=(90, 10, 0), elbow=10,
                forearm=80), spine=(30, 0, 0), neck=(-25, 0, 0))
    p["lunge"] = compose_pose(
        hip_l=(90, 5, 0), knee_l=90, ankle_l=0, hip_r=(-20, 5, 0), knee_r=90, ankle_r=-10,
        **_RELAXED_ARMS)
    p["arms_crossed"] = compose_pose(
        shoulder_l=(25, -10, 80), elbow_l=90, shoulder_r=(35, -10, 75), elbow_r=95,
        **_both(forearm=60, hip=(0, 3, 0)))
    p["hands_on_hips"] = compose_pose(
        **_both(shoulder=(-15, 40, 35), elbow=100, forearm=80, wrist=(0, -25, 0), hip=(0, 5, 0)))
    p["phone_call"] = compose_pose(
        **_RELAXED_ARMS | dict(shoulder_r=(75, 15, 20), elbow_r=148, forearm_r=30),
        head=(5, -8, 0))
    p["stretch_side"] = compose_pose(
        **_RELAXED_ARMS | dict(shoulder_r=(10, 170, 0), elbow_r=10, forearm_r=90),
        spine=(0, 22, 0), neck=(0, 10, 0))
    p["point"] = compose_pose(
        **_RELAXED_ARMS | dict(shoulder_r=(85, 25, 0), elbow_r=0, forearm_r=70), head=(0, 0, -15))
    p["boxing_guard"] = compose_pose(
        **_both(shoulder=(35, 10, 30), elbow=125, forearm=80, hip=(15, 8, 0), knee=20, ankle=10),
        spine=(10, 0, 0))
    p["sit_cross_legged"] = compose_pose(
        **_both(hip=(85, 35, -55), knee=125, ankle=-10, shoulder=(25, 10, 0), elbow=50, forearm=90),
        spine=(10, 0, 0))
    p["look_back"] = compose_pose(**_RELAXED_ARMS, spine=(0, 0, 35), neck=(0, 0, 30),
                                       head=(0, 0, 25))
    p["climb"] = compose_pose(
        shoulder_l=(165, 15, 0), elbow_l=20, forearm_l=10, shoulder_r=(100, 15, 0), elbow_r=70,
        forearm_r=10, hip_r=(75, 10, 0), knee_r=90, hip_l=(0, 5, 0), knee_l=10, ankle_l=-20,
        spine=(5, 0, 0), neck=(-25, 0, 0))
    p["bow"] = compose_pose(**_both(hip=(40, 3, 0), shoulder=(30, 5, 0), elbow=5, forearm=80),
                            spine=(20, 0, 0), neck=(15, 0, 0))
    p["walk_right"] = mirror_angles(p["walk_left"])
    p["run_right"] = mirror_angles(p["run_left"])
    return p


#: name -> anatomical angles (J, 3), degrees
KEY_POSES: dict[str, np.ndarray] = _key_poses()
KEY_POSE_NAMES: tuple[str, ...] = tuple(sorted(KEY_POSES))

#: Forward tilt (degrees, about anny's +x) of the pelvis that puts a key pose on its feet when the
#: body stands; key poses not listed keep the pelvis upright. A suggestion for whoever samples the
#: global orientation: the sampler returns it interpolated in ``info["root_pitch"]``.
KEY_POSE_ROOT_PITCH: dict[str, float] = {
    "bend_forward": 55.0, "bow": 35.0, "reach_forward": 20.0, "crouch": 30.0, "squat": 20.0,
    "run_left": 8.0, "run_right": 8.0, "kick": -10.0,
}


def key_pose_angles(name: str) -> np.ndarray:
    """Anatomical angles (J, 3) of a key pose (a copy)."""
    if name not in KEY_POSES:
        raise KeyError(f"unknown key pose {name!r}; known: {', '.join(KEY_POSE_NAMES)}")
    return KEY_POSES[name].copy()


def root_pitch_rotation(pitch_deg: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotations about anny's +x axis tilting the trunk forward by ``pitch_deg``."""
    t = np.radians(np.asarray(pitch_deg, dtype=np.float64))
    c, s = np.cos(t), np.sin(t)
    one, zero = np.ones_like(t), np.zeros_like(t)
    return np.stack([np.stack([one, zero, zero], -1), np.stack([zero, c, -s], -1),
                     np.stack([zero, s, c], -1)], -2)


# --------------------------------------------------------------------------------------------------
# Sampling.


#: joints of the arms, shoulder girdle, neck and head: the "upper body" that part mixing swaps
UPPER_BODY: np.ndarray = np.array([k in ("clavicle", "scapula", "shoulder", "elbow", "forearm",
                                         "wrist", "neck", "head") for k in JOINT_KINDS])


class PoseSampler:
    """Random body poses: blend of two key poses, per-joint Gaussian noise, mirroring, clipping.

    With probability ``part_mix_prob`` the upper body (arms, neck, head) comes from a second,
    independent blend, so that arm poses are not tied to the leg poses they were authored with.
    Deterministic for a given seed: every draw comes from one ``numpy.random.Generator``, so the
    sequence of ``sample`` calls reproduces exactly.
    """

    def __init__(self, seed: int = 0, noise: float = 0.05, mirror_prob: float = 0.5,
                 part_mix_prob: float = 0.3, key_poses: Sequence[str] | None = None,
                 limits: JointLimits = JOINT_LIMITS) -> None:
        """``noise``: per-angle standard deviation as a fraction of that angle's range."""
        self.names = tuple(key_poses) if key_poses is not None else KEY_POSE_NAMES
        for name in self.names:
            key_pose_angles(name)
        self.rng = np.random.default_rng(seed)
        self.noise = float(noise)
        self.mirror_prob = float(mirror_prob)
        self.part_mix_prob = float(part_mix_prob)
        self.limits = limits
        self._table = np.stack([KEY_POSES[n] for n in self.names])
        self._pitch = np.array([KEY_POSE_ROOT_PITCH.get(n, 0.0) for n in self.names])

    def _blend(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        a = self.rng.integers(len(self.names), size=n)
        b = self.rng.integers(len(self.names), size=n)
        w = self.rng.random(n)
        angles = (1.0 - w)[:, None, None] * self._table[a] + w[:, None, None] * self._table[b]
        return angles, a, b, w

    def sample_angles(self, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(n, J, 3) anatomical angles and what made them (pose names, weights, mirrored, pitch)."""
        angles, a, b, w = self._blend(n)
        upper, c, d, w_upper = self._blend(n)
        mixed = self.rng.random(n) < self.part_mix_prob
        angles[mixed[:, None] & UPPER_BODY[None, :]] = upper[mixed[:, None] & UPPER_BODY[None, :]]
        angles = angles + self.rng.normal(size=angles.shape) * self.noise * self.limits.span
        mirrored = self.rng.random(n) < self.mirror_prob
        angles[mirrored] = mirror_angles(angles[mirrored])
        angles = self.limits.clip(angles)
        pitch = (1.0 - w) * self._pitch[a] + w * self._pitch[b]
        info = {
            "angles": angles.astype(np.float32),
            "pose_a": np.array(self.names)[a],
            "pose_b": np.array(self.names)[b],
            "weight": w.astype(np.float32),
            "part_mixed": mixed,
            "upper_a": np.array(self.names)[c],
            "upper_b": np.array(self.names)[d],
            "upper_weight": w_upper.astype(np.float32),
            "mirrored": mirrored,
            "root_pitch": pitch.astype(np.float32),
        }
        return angles, info

    def sample(self, n: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """(n, 104, 3, 3) float32 anny local-ref rotations and the ``sample_angles`` info."""
        angles, info = self.sample_angles(n)
        return angles_to_local_rotations(angles), info

    def key_pose(self, name: str) -> torch.Tensor:
        """(104, 3, 3) float32 local rotations of one key pose, unperturbed."""
        return angles_to_local_rotations(key_pose_angles(name))
