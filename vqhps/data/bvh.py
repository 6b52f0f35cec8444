"""BVH motion files: a parser, and retargeting of CMU-style skeletons onto anny's local rotations.

Parsing follows the usual BVH reading: every joint's frame is aligned with the file's axes in the
rest pose (channels all zero); a joint's rotation channels compose in the listed order
(``Zrotation Xrotation Yrotation`` -> ``Rz @ Rx @ Ry``, intrinsic); position channels, when
present, replace the joint's OFFSET.

Retargeting (``bvh_to_anny``) and its approximations:

* Axes: the file's up and forward axes (CMU: +y up, facing +z) map to anny's +z and -y; the
  character's left is +x in both.
* anny's local-ref rotations compose exactly like BVH rotations (world-aligned rest frames, child in
  parent), so after the change of axes only the rest poses differ: a BVH T-pose versus anny's A-pose
  with bent elbows. Each mapped bone gets a rest alignment ``Q`` taking anny's rest bone direction
  to the BVH rest bone direction; anny's world bone rotation is then ``W_bvh @ Q``. ``Q`` is the
  smallest such rotation, built from the parent's alignment, so twist about the bone is matched
  only approximately (directions are exact).
* Several BVH spine or neck joints share anny's five spine / three neck segments: each BVH joint
  drives a run of consecutive segments, its rotation split evenly among them.
* BVH joints without an anny counterpart (CMU's LHipJoint, toes, fingers) still shape the world
  rotations of their descendants; anny's fingers, toes and eyes stay at rest.
* The Hips rotation and position become ``root_rotation`` / ``root_translation``; the local
  rotations' root entry is the identity (global orientation is kept apart).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import roma
import torch

from vqhps.data.poses import (
    ANNY_BONE_LABELS,
    ANNY_BONE_PARENTS,
    ANNY_HEAD_DIRECTION,
    ANNY_N_BONES,
    NECK_BONES,
    SPINE_BONES,
    rest_head,
    rotation_between,
)


class BVHError(ValueError):
    """A malformed BVH file; the message starts with ``<file>:<line>:``."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source}:{line}: {message}")
        self.source, self.line = source, line


# --------------------------------------------------------------------------------------------------
# Parsing.

_ROTATION_CHANNELS = {"Xrotation": "X", "Yrotation": "Y", "Zrotation": "Z"}
_POSITION_CHANNELS = {"Xposition": 0, "Yposition": 1, "Zposition": 2}


@dataclass
class BVHJoint:
    """One joint of the hierarchy: parent index (-1 for the root), OFFSET, channel names."""

    name: str
    parent: int
    offset: np.ndarray
    channels: tuple[str, ...]
    end_site: np.ndarray | None = None


@dataclass
class BVHMotion:
    """A parsed BVH file: the joints in file order and one row of channel values per frame."""

    joints: list[BVHJoint]
    frame_time: float
    frames: np.ndarray  # (T, C) channel values, degrees and file units
    source: str = "<string>"

    @property
    def names(self) -> list[str]:
        return [j.name for j in self.joints]

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    def children(self, index: int) -> list[int]:
        """Indices of a joint's children."""
        return [i for i, j in enumerate(self.joints) if j.parent == index]

    def _channel_columns(self) -> list[slice]:
        cols, start = [], 0
        for joint in self.joints:
            cols.append(slice(start, start + len(joint.channels)))
            start += len(joint.channels)
        return cols

    def local_rotations(self) -> np.ndarray:
        """(T, J, 3, 3) rotation of each joint relative to its parent, in the file's axes."""
        out = np.tile(np.eye(3), (self.n_frames, len(self.joints), 1, 1))
        for j, (joint, cols) in enumerate(zip(self.joints, self._channel_columns())):
            values = self.frames[:, cols]
            rot = [(k, _ROTATION_CHANNELS[c]) for k, c in enumerate(joint.channels)
                   if c in _ROTATION_CHANNELS]
            if rot:
                angles = torch.from_numpy(np.ascontiguousarray(values[:, [k for k, _ in rot]]))
                convention = "".join(axis for _, axis in rot)
                out[:, j] = roma.euler_to_rotmat(convention, angles, degrees=True).numpy()
        return out

    def local_translations(self) -> np.ndarray:
        """(T, J, 3) translation of each joint in its parent's frame (OFFSET or position channels)."""
        out = np.tile(np.stack([j.offset for j in self.joints]), (self.n_frames, 1, 1))
        for j, (joint, cols) in enumerate(zip(self.joints, self._channel_columns())):
            values = self.frames[:, cols]
            for k, c in enumerate(joint.channels):
                if c in _POSITION_CHANNELS:
                    out[:, j, _POSITION_CHANNELS[c]] = values[:, k]
        return out

    def world_rotations(self) -> np.ndarray:
        """(T, J, 3, 3) rotation of each joint's frame in the file's axes."""
        local = self.local_rotations()
        world = np.empty_like(local)
        for j, joint in enumerate(self.joints):  # parents precede children in a BVH file
            world[:, j] = local[:, j] if joint.parent < 0 else world[:, joint.parent] @ local[:, j]
        return world

    def world_positions(self) -> np.ndarray:
        """(T, J, 3) joint positions in the file's axes and units."""
        rot, trans = self.world_rotations(), self.local_translations()
        pos = np.empty_like(trans)
        for j, joint in enumerate(self.joints):
            p = joint.parent
            pos[:, j] = trans[:, j] if p < 0 else pos[:, p] + np.einsum(
                "tab,tb->ta", rot[:, p], trans[:, j])
        return pos

    def rest_positions(self) -> np.ndarray:
        """(J, 3) joint positions with every channel zero and the root at its OFFSET."""
        pos = np.zeros((len(self.joints), 3))
        for j, joint in enumerate(self.joints):
            pos[j] = joint.offset + (pos[joint.parent] if joint.parent >= 0 else 0.0)
        return pos


class _Tokens:
    """Whitespace tokens with their line numbers, read one by one."""

    def __init__(self, lines: Sequence[str], source: str, first_line: int = 1) -> None:
        self.items = [(tok, n) for n, line in enumerate(lines, first_line) for tok in line.split()]
        self.pos = 0
        self.source = source
        self.last_line = first_line + max(len(lines) - 1, 0)

    def peek(self) -> str | None:
        return self.items[self.pos][0] if self.pos < len(self.items) else None

    def line(self) -> int:
        return self.items[self.pos][1] if self.pos < len(self.items) else self.last_line

    def error(self, message: str, line: int | None = None) -> BVHError:
        return BVHError(self.source, self.line() if line is None else line, message)

    def next(self, what: str) -> str:
        if self.pos >= len(self.items):
            raise self.error(f"unexpected end of file, expected {what}")
        tok = self.items[self.pos][0]
        self.pos += 1
        return tok

    def expect(self, word: str) -> None:
        line = self.line()
        tok = self.next(repr(word))
        if tok != word:
            raise self.error(f"expected {word!r}, found {tok!r}", line)

    def number(self, what: str, kind: type = float) -> float:
        line = self.line()
        tok = self.next(what)
        try:
            return kind(tok)
        except ValueError:
            raise self.error(f"expected {what}, found {tok!r}", line) from None


def _parse_joint(tok: _Tokens, joints: list[BVHJoint], parent: int) -> None:
    """Reads ``<name> { OFFSET .. CHANNELS .. children }`` after ROOT/JOINT."""
    line = tok.line()
    name = tok.next("a joint name")
    if name == "{":
        raise tok.error("missing joint name", line)
    tok.expect("{")
    tok.expect("OFFSET")
    offset = np.array([tok.number("an OFFSET value") for _ in range(3)])
    channels: tuple[str, ...] = ()
    if tok.peek() == "CHANNELS":
        tok.next("CHANNELS")
        count_line = tok.line()
        count = int(tok.number("a channel count", int))
        names = []
        for _ in range(count):
            ch_line = tok.line()
            ch = tok.next("a channel name")
            if ch not in _ROTATION_CHANNELS and ch not in _POSITION_CHANNELS:
                raise tok.error(f"unknown channel {ch!r} (joint {name!r}, {count} channels "
                                f"declared on line {count_line})", ch_line)
            names.append(ch)
        channels = tuple(names)
    index = len(joints)
    joints.append(BVHJoint(name=name, parent=parent, offset=offset, channels=channels))
    while True:
        line = tok.line()
        word = tok.next("JOINT, End Site or '}'")
        if word == "}":
            return
        if word == "JOINT":
            _parse_joint(tok, joints, index)
        elif word == "End":
            tok.expect("Site")
            tok.expect("{")
            tok.expect("OFFSET")
            joints[index].end_site = np.array([tok.number("an OFFSET value") for _ in range(3)])
            tok.expect("}")
        else:
            raise tok.error(f"unexpected {word!r} in joint {name!r}", line)


def parse_bvh(text: str, source: str = "<string>") -> BVHMotion:
    """Parses BVH text; ``source`` names the file in error messages."""
    lines = text.splitlines()
    motion_at = next((i for i, line in enumerate(lines) if line.split()[:1] == ["MOTION"]), None)
    if motion_at is None:
        raise BVHError(source, len(lines), "no MOTION section")
    tok = _Tokens(lines[:motion_at], source)
    tok.expect("HIERARCHY")
    tok.expect("ROOT")
    joints: list[BVHJoint] = []
    _parse_joint(tok, joints, -1)
    if tok.peek() is not None:
        raise tok.error(f"unexpected {tok.peek()!r} after the hierarchy (one ROOT per file)")

    head = _Tokens(lines[motion_at:motion_at + 3], source, motion_at + 1)
    head.expect("MOTION")
    head.expect("Frames:")
    n_frames = int(head.number("a frame count", int))
    head.expect("Frame")
    head.expect("Time:")
    frame_time = float(head.number("a frame time"))
    first = head.line() if head.peek() is not None else motion_at + 4  # 1-based
    n_channels = sum(len(j.channels) for j in joints)
    rows = []
    for n, line in enumerate(lines[first - 1:], first):
        values = line.split()
        if not values:
            continue
        if len(rows) == n_frames:
            raise BVHError(source, n, f"more frame rows than 'Frames: {n_frames}'")
        if len(values) != n_channels:
            raise BVHError(source, n, f"frame row has {len(values)} values, the hierarchy "
                                      f"declares {n_channels} channels")
        try:
            rows.append([float(v) for v in values])
        except ValueError:
            bad = next(v for v in values if not _is_float(v))
            raise BVHError(source, n, f"bad number {bad!r} in frame row") from None
    if len(rows) != n_frames:
        raise BVHError(source, len(lines), f"found {len(rows)} frame rows, 'Frames:' says {n_frames}")
    frames = np.array(rows, dtype=np.float64).reshape(n_frames, n_channels)
    return BVHMotion(joints=joints, frame_time=frame_time, frames=frames, source=source)


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def load_bvh(path: str | Path) -> BVHMotion:
    """Reads and parses a BVH file."""
    path = Path(path)
    return parse_bvh(path.read_text(encoding="utf-8", errors="replace"), source=str(path))


# --------------------------------------------------------------------------------------------------
# Retargeting onto anny.

#: BVH joint names (after stripping prefixes such as "mixamorig:") -> anny bones they drive, per
#: side; spine and neck joints share out anny's segments instead (see ``anny_runs``).
CMU_LIMBS: dict[str, str] = {
    "UpLeg": "upperleg01", "Leg": "lowerleg01", "Foot": "foot",
    "Shoulder": "clavicle", "Arm": "upperarm01", "ForeArm": "lowerarm01", "Hand": "wrist",
}
#: anny bones a limb joint's run includes after its first bone
_LIMB_RUNS: dict[str, tuple[str, ...]] = {"clavicle": ("clavicle", "shoulder01")}
#: anny bone whose rest head the run's last bone points at (None: the head bone's own direction)
_ANNY_TARGET: dict[str, str | None] = {
    "upperleg01": "lowerleg01", "lowerleg01": "foot", "foot": "toe3-1",
    "shoulder01": "upperarm01", "upperarm01": "lowerarm01", "lowerarm01": "wrist",
    "wrist": "finger3-1",
    "spine05": "spine04", "spine04": "spine03", "spine03": "spine02", "spine02": "spine01",
    "spine01": "neck01", "neck01": "neck02", "neck02": "neck03", "neck03": "head", "head": None,
}
#: the BVH child that continues a joint's bone, when a joint has several children
_BVH_NEXT: dict[str, tuple[str, ...]] = {
    "Spine": ("Spine1",), "Spine1": ("Spine2", "Neck"),
    "Spine2": ("Spine3", "Neck"), "Spine3": ("Neck",), "LowerBack": ("Spine",),
    "Neck": ("Neck1", "Head"), "Neck1": ("Neck2", "Head"), "Neck2": ("Head",),
    "Hand": ("HandMiddle1", "FingerBase", "HandIndex1"),
}
_SPINE_NAMES = ("LowerBack", "Spine", "Spine1", "Spine2", "Spine3")
_NECK_NAMES = ("Neck", "Neck1", "Neck2")


@dataclass
class AnnyMotion:
    """A motion on anny: per-frame local rotations (root = identity) and the root's motion."""

    local_rotations: torch.Tensor  # (T, 104, 3, 3) float32, local-ref
    root_rotation: torch.Tensor  # (T, 3, 3) float32, anny axes
    root_translation: torch.Tensor  # (T, 3) float32, metres, anny axes
    frame_time: float


def _strip(name: str) -> str:
    """Drops namespace prefixes ("mixamorig:LeftArm" -> "LeftArm")."""
    return re.split(r"[:|]", name)[-1]


def _axis_vector(spec: str) -> np.ndarray:
    match = re.fullmatch(r"([+-]?)([xyz])", spec.strip().lower())
    if match is None:
        raise ValueError(f"axis must be one of x, y, z with an optional sign, got {spec!r}")
    v = np.zeros(3)
    v["xyz".index(match.group(2))] = -1.0 if match.group(1) == "-" else 1.0
    return v


def axes_to_anny(up: str = "y", forward: str = "z") -> np.ndarray:
    """(3, 3) rotation from a file's axes (up axis, facing direction) to anny's (z up, facing -y)."""
    u, f = _axis_vector(up), _axis_vector(forward)
    if abs(u @ f) > 0.5:
        raise ValueError(f"up {up!r} and forward {forward!r} must differ")
    return np.stack([np.cross(u, f), -f, u])


def _split(items: Sequence[str], parts: int) -> list[tuple[str, ...]]:
    """Consecutive runs of nearly equal length (the first runs get the extra items)."""
    sizes = [len(items) // parts + (1 if k < len(items) % parts else 0) for k in range(parts)]
    out, start = [], 0
    for size in sizes:
        out.append(tuple(items[start:start + size]))
        start += size
    return out


def anny_runs(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """BVH joint name -> anny bones it drives (in chain order), for the names present."""
    stripped = {_strip(n): n for n in names}
    runs: dict[str, tuple[str, ...]] = {}
    for group, bones in ((_SPINE_NAMES, SPINE_BONES), (_NECK_NAMES, NECK_BONES)):
        present = [n for n in group if n in stripped]
        if len(present) > len(bones):
            present = present[: len(bones)]
        for n, run in zip(present, _split(bones, len(present)) if present else []):
            runs[stripped[n]] = run
    if "Head" in stripped:
        runs[stripped["Head"]] = ("head",)
    for side, s in (("Left", "L"), ("Right", "R")):
        for suffix, bone in CMU_LIMBS.items():
            if side + suffix in stripped:
                run = _LIMB_RUNS.get(bone, (bone,))
                runs[stripped[side + suffix]] = tuple(f"{b}.{s}" for b in run)
    return runs


def _anny_direction(first: str, last: str) -> np.ndarray:
    """anny's rest direction of a run of bones: first bone's head to its target."""
    side = last[-2:] if last.endswith((".L", ".R")) else ""
    target = _ANNY_TARGET[last[:-2] if side else last]
    if target is None:
        return np.array(ANNY_HEAD_DIRECTION)
    d = rest_head(target + side) - rest_head(first)
    return d / np.linalg.norm(d)


def _bvh_direction(motion: BVHMotion, j: int, rest: np.ndarray) -> np.ndarray | None:
    """Rest direction of BVH joint j's bone, toward its continuing child (None when degenerate)."""
    kids = motion.children(j)
    prefer = _BVH_NEXT.get(_strip(motion.joints[j].name).removeprefix("Left").removeprefix("Right"), ())
    chosen = [k for p in prefer for k in kids if _strip(motion.joints[k].name).endswith(p)
              and _strip(motion.joints[k].name).removesuffix(p) in ("", "Left", "Right")]
    if chosen:
        offsets = [rest[chosen[0]] - rest[j]]
    else:
        offsets = [rest[k] - rest[j] for k in kids]
        if motion.joints[j].end_site is not None:
            offsets.append(motion.joints[j].end_site)
    if not offsets:
        return None
    d = np.mean(offsets, axis=0)
    n = np.linalg.norm(d)
    return d / n if n > 1e-9 else None


def _fraction(rot: np.ndarray, fraction: float) -> np.ndarray:
    """rot ** fraction (same axis, scaled angle), batched (..., 3, 3)."""
    if fraction == 1.0:
        return rot
    rotvec = roma.rotmat_to_rotvec(torch.from_numpy(np.ascontiguousarray(rot)))
    return roma.rotvec_to_rotmat(rotvec * fraction).numpy()


def _leg_length(motion: BVHMotion, rest: np.ndarray) -> float | None:
    idx = {_strip(n): i for i, n in enumerate(motion.names)}
    if not all(k in idx for k in ("LeftUpLeg", "LeftLeg", "LeftFoot")):
        return None
    a, b, c = (rest[idx[k]] for k in ("LeftUpLeg", "LeftLeg", "LeftFoot"))
    return float(np.linalg.norm(b - a) + np.linalg.norm(c - b))


def bvh_to_anny(motion: BVHMotion, up: str = "y", forward: str = "z",
                scale: float | None = None) -> AnnyMotion:
    """Retargets a CMU-named BVH motion onto anny (see the module docstring).

    ``up``/``forward``: the file's up axis and the direction its character faces at rest (CMU: y, z).
    ``scale``: metres per file unit; by default anny's leg length over the file's.
    """
    names = motion.names
    runs = anny_runs(names)
    if not runs:
        raise ValueError(f"{motion.source}: no joint with a CMU-style name (e.g. LeftUpLeg, Spine)")
    conv = axes_to_anny(up, forward)
    rest = motion.rest_positions()
    if scale is None:
        bvh_leg = _leg_length(motion, rest)
        anny_leg = (np.linalg.norm(rest_head("lowerleg01.L") - rest_head("upperleg01.L"))
                    + np.linalg.norm(rest_head("foot.L") - rest_head("lowerleg01.L")))
        scale = anny_leg / bvh_leg if bvh_leg else 1.0

    world = conv @ motion.world_rotations() @ conv.T  # (T, J, 3, 3) anny axes
    n_frames = motion.n_frames
    root = world[:, 0]
    root_translation = motion.world_positions()[:, 0] @ conv.T * scale

    run_of = {run[0]: (names.index(j), run) for j, run in runs.items()}
    in_run = {b: run for run in runs.values() for b in run}
    # rest alignments, parents first
    align: dict[str, np.ndarray] = {"root": np.eye(3)}
    target: dict[str, np.ndarray] = {}
    for bone in ANNY_BONE_LABELS[1:]:
        parent = ANNY_BONE_LABELS[ANNY_BONE_PARENTS[ANNY_BONE_LABELS.index(bone)]]
        q_parent = align[parent]
        if bone in run_of:
            j, run = run_of[bone]
            b = _bvh_direction(motion, j, rest)
            a = _anny_direction(run[0], run[-1])
            q = q_parent if b is None else rotation_between(q_parent @ a, conv @ b) @ q_parent
            target[bone] = world[:, j] @ q
            for member in run:
                align[member] = q
        elif bone not in in_run:
            align[bone] = q_parent

    local = np.tile(np.eye(3), (n_frames, ANNY_N_BONES, 1, 1))
    posed = {"root": root}
    for i, bone in enumerate(ANNY_BONE_LABELS[1:], 1):
        parent = ANNY_BONE_LABELS[ANNY_BONE_PARENTS[i]]
        if bone in run_of:
            run = run_of[bone][1]
            part = _fraction(np.swapaxes(posed[parent], -1, -2) @ target[bone], 1.0 / len(run))
            for member in run:
                local[:, ANNY_BONE_LABELS.index(member)] = part
        posed[bone] = posed[parent] @ local[:, i]
    return AnnyMotion(
        local_rotations=torch.from_numpy(local).float(),
        root_rotation=torch.from_numpy(root).float(),
        root_translation=torch.from_numpy(root_translation).float(),
        frame_time=motion.frame_time,
    )


def load_bvh_as_anny(path: str | Path, up: str = "y", forward: str = "z",
                     scale: float | None = None) -> AnnyMotion:
    """``bvh_to_anny(load_bvh(path))``."""
    return bvh_to_anny(load_bvh(path), up=up, forward=forward, scale=scale)
