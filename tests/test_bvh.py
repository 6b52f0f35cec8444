"""BVH parsing and retargeting of a CMU-named skeleton onto anny."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vqhps.data import bvh
from vqhps.data import poses as P

# A small CMU-style skeleton (y up, facing +z, T-pose rest, centimetre-like units).
SKELETON = [
    ("Hips", None, (0, 90, 0)),
    ("LHipJoint", "Hips", (0, 0, 0)), ("LeftUpLeg", "LHipJoint", (9, -3, 0)),
    ("LeftLeg", "LeftUpLeg", (0, -40, 0)), ("LeftFoot", "LeftLeg", (0, -40, 0)),
    ("LeftToeBase", "LeftFoot", (0, -5, 12)),
    ("RHipJoint", "Hips", (0, 0, 0)), ("RightUpLeg", "RHipJoint", (-9, -3, 0)),
    ("RightLeg", "RightUpLeg", (0, -40, 0)), ("RightFoot", "RightLeg", (0, -40, 0)),
    ("RightToeBase", "RightFoot", (0, -5, 12)),
    ("LowerBack", "Hips", (0, 2, 0)), ("Spine", "LowerBack", (0, 15, 0)),
    ("Spine1", "Spine", (0, 15, 0)), ("Neck", "Spine1", (0, 18, 0)), ("Neck1", "Neck", (0, 5, 0)),
    ("Head", "Neck1", (0, 5, 0)),
    ("LeftShoulder", "Spine1", (3, 16, 0)), ("LeftArm", "LeftShoulder", (14, 0, 0)),
    ("LeftForeArm", "LeftArm", (27, 0, 0)), ("LeftHand", "LeftForeArm", (25, 0, 0)),
    ("RightShoulder", "Spine1", (-3, 16, 0)), ("RightArm", "RightShoulder", (-14, 0, 0)),
    ("RightForeArm", "RightArm", (-27, 0, 0)), ("RightHand", "RightForeArm", (-25, 0, 0)),
]
END_SITES = {"LeftToeBase": (0, 0, 4), "RightToeBase": (0, 0, 4), "Head": (0, 15, 0),
             "LeftHand": (10, 0, 0), "RightHand": (-10, 0, 0)}
ROOT_CHANNELS = "Xposition Yposition Zposition Zrotation Xrotation Yrotation"
JOINT_CHANNELS = "Zrotation Xrotation Yrotation"


def write_bvh(values: dict[str, np.ndarray], n_frames: int) -> str:
    """BVH text; ``values[name]`` is (T, 3) Z, X, Y rotations, ``values["Hips_pos"]`` (T, 3)."""
    lines = ["HIERARCHY"]

    def emit(name: str, parent: str | None, offset: tuple, depth: int) -> None:
        pad = "  " * depth
        lines.append(f"{pad}{'ROOT' if parent is None else 'JOINT'} {name}")
        lines.append(pad + "{")
        lines.append(f"{pad}  OFFSET {offset[0]:.2f} {offset[1]:.2f} {offset[2]:.2f}")
        channels = ROOT_CHANNELS if parent is None else JOINT_CHANNELS
        lines.append(f"{pad}  CHANNELS {len(channels.split())} {channels}")
        for child, child_parent, child_offset in SKELETON:
            if child_parent == name:
                emit(child, name, child_offset, depth + 1)
        if name in END_SITES:
            end = END_SITES[name]
            lines.extend([f"{pad}  End Site", pad + "  {",
                          f"{pad}    OFFSET {end[0]} {end[1]} {end[2]}", pad + "  }"])
        lines.append(pad + "}")

    emit(*SKELETON[0], 0)
    lines += ["MOTION", f"Frames: {n_frames}", "Frame Time: 0.033333"]
    position = values.get("Hips_pos", np.tile([0.0, 90.0, 0.0], (n_frames, 1)))
    for t in range(n_frames):
        row = list(position[t])
        for name, _, _ in SKELETON:
            row += list(values.get(name, np.zeros((n_frames, 3)))[t])
        lines.append(" ".join(f"{v:.4f}" for v in row))
    return "\n".join(lines) + "\n"



def bone_heads(model, rotations: torch.Tensor) -> np.ndarray:
    """(T, 104, 3) bone heads of anny (phenotype 0.5) posed with local rotations."""
    transforms = torch.eye(4).repeat(rotations.shape[0], P.ANNY_N_BONES, 1, 1)
    transforms[..., :3, :3] = rotations
    with torch.no_grad():
        out = model(pose_parameters=transforms,
                    phenotype_kwargs=torch.full((rotations.shape[0], 6), 0.5))
    return out["bone_poses"][..., :3, 3].double().numpy()


def head(heads: np.ndarray, bone: str) -> np.ndarray:
    return heads[..., P.ANNY_BONE_LABELS.index(bone), :]


def bend(heads: np.ndarray, a: str, b: str, c: str) -> np.ndarray:
    """Angle (degrees) between segments a->b and b->c: 0 for a straight limb."""
    u, v = head(heads, b) - head(heads, a), head(heads, c) - head(heads, b)
    cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


# ------------------------------------------------------------------------------------------------
# Parsing.


def test_parses_hierarchy_and_motion(tmp_path):
    elbow = np.array([[0, 0, 0], [0, 0, -45], [0, 0, -90]], dtype=float)
    path = tmp_path / "three.bvh"
    path.write_text(write_bvh({"LeftForeArm": elbow}, 3))
    motion = bvh.load_bvh(path)
    assert motion.names == [name for name, _, _ in SKELETON]
    assert motion.n_frames == 3 and motion.frames.shape == (3, 6 + 3 * (len(SKELETON) - 1))
    assert motion.frame_time == pytest.approx(0.033333)
    assert motion.joints[0].channels == tuple(ROOT_CHANNELS.split())
    assert motion.joints[motion.names.index("Head")].end_site is not None
    assert motion.joints[motion.names.index("LeftLeg")].parent == motion.names.index("LeftUpLeg")
    rest = motion.rest_positions()
    np.testing.assert_allclose(rest[motion.names.index("LeftHand")], [3 + 14 + 27 + 25, 90 + 2 + 30 + 16, 0])
    pos = motion.world_positions()
    hand, fore = motion.names.index("LeftHand"), motion.names.index("LeftForeArm")
    np.testing.assert_allclose(pos[0, hand] - pos[0, fore], [25, 0, 0], atol=1e-9)
    np.testing.assert_allclose(pos[2, hand] - pos[2, fore], [0, 0, 25], atol=1e-9)  # Y -90: x -> +z


def test_euler_channel_order():
    text = write_bvh({"LeftArm": np.array([[30.0, 50.0, 70.0]])}, 1)  # Z, X, Y values
    motion = bvh.parse_bvh(text)
    rot = motion.local_rotations()[0, motion.names.index("LeftArm")]

    def axis_rot(axis: int, deg: float) -> np.ndarray:
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m if axis != 1 else m.T  # keep the right-hand rule about y

    expected = axis_rot(2, 30.0) @ axis_rot(0, 50.0) @ axis_rot(1, 70.0)
    np.testing.assert_allclose(rot, expected, atol=1e-9)
    reordered = text.replace(f"CHANNELS 3 {JOINT_CHANNELS}", "CHANNELS 3 Xrotation Yrotation Zrotation")
    rot2 = bvh.parse_bvh(reordered).local_rotations()[0, motion.names.index("LeftArm")]
    np.testing.assert_allclose(rot2, axis_rot(0, 30.0) @ axis_rot(1, 50.0) @ axis_rot(2, 70.0),
                               atol=1e-9)


@pytest.mark.parametrize("breakage, line, words", [
    (lambda t: t.replace("OFFSET 14.00 0.00 0.00", "OFFSET 14.00 zero 0.00"), "OFFSET 14.00 zero",
     "OFFSET value"),
    (lambda t: t.replace("CHANNELS 3 Zrotation Xrotation", "CHANNELS 3 Zrotation Xrot", 1),
     "Zrotation Xrot ", "unknown channel"),
    (lambda t: t.replace("Frames: 2\nFrame Time: 0.033333\n", "Frames: 2\nFrame Time: 0.033333\n1 2 3\n"),
     "1 2 3", "frame row has 3 values"),
    (lambda t: t.rstrip("\n").rsplit("\n", 1)[0] + "\n" + t.rstrip("\n").rsplit("\n", 1)[1].replace(
        "0.0000", "nan?", 1) + "\n", "nan?", "bad number"),
    (lambda t: t.replace("JOINT Neck1", "JIONT Neck1"), "JIONT Neck1", "unexpected 'JIONT'"),
])
def test_malformed_bvh_names_file_and_line(breakage, line, words):
    text = breakage(write_bvh({}, 2))
    expected_line = next(n for n, row in enumerate(text.splitlines(), 1) if line in row)
    with pytest.raises(bvh.BVHError) as err:
        bvh.parse_bvh(text, source="walk.bvh")
    assert str(err.value).startswith(f"walk.bvh:{expected_line}:"), str(err.value)
    assert words in str(err.value)
    assert err.value.line == expected_line


def test_malformed_file_errors_name_the_path(tmp_path):
    path = tmp_path / "short.bvh"
    path.write_text(write_bvh({}, 2).replace("Frames: 2", "Frames: 5"))
    with pytest.raises(bvh.BVHError, match=r"short\.bvh:\d+: found 2 frame rows"):
        bvh.load_bvh(path)
    (tmp_path / "none.bvh").write_text("HIERARCHY\nROOT Hips\n{\n")
    with pytest.raises(bvh.BVHError, match="none.bvh:3: no MOTION"):
        bvh.load_bvh(tmp_path / "none.bvh")


# ------------------------------------------------------------------------------------------------
# Retargeting.


def test_elbow_rotation_bends_anny_elbow(anny_model):
    elbow = np.array([[0, 0, 0], [0, 0, -90], [0, 0, -45]], dtype=float)  # Y: forward flexion
    motion = bvh.bvh_to_anny(bvh.parse_bvh(write_bvh({"LeftForeArm": elbow}, 3)))
    assert motion.local_rotations.shape == (3, P.ANNY_N_BONES, 3, 3)
    heads = bone_heads(anny_model, motion.local_rotations)
    angles = bend(heads, "upperarm01.L", "lowerarm01.L", "wrist.L")
    np.testing.assert_allclose(angles, [0, 90, 45], atol=2.0)
    right = bend(heads, "upperarm01.R", "lowerarm01.R", "wrist.R")
    np.testing.assert_allclose(right, [0, 0, 0], atol=2.0)
    forearm = head(heads, "wrist.L")[1] - head(heads, "lowerarm01.L")[1]
    assert forearm[1] < -0.2  # CMU's +z (front) is anny's -y


def test_t_pose_and_unrotated_body(anny_model):
    motion = bvh.bvh_to_anny(bvh.parse_bvh(write_bvh({}, 2)))
    heads = bone_heads(anny_model, motion.local_rotations)[0]
    for side, sign in (("L", 1), ("R", -1)):
        shoulder, wrist = head(heads, f"upperarm01.{side}"), head(heads, f"wrist.{side}")
        assert abs(wrist[2] - shoulder[2]) < 0.03 and sign * (wrist[0] - shoulder[0]) > 0.4
        assert bend(heads, f"upperleg01.{side}", f"lowerleg01.{side}", f"foot.{side}") < 2
        assert head(heads, f"foot.{side}")[2] < head(heads, f"lowerleg01.{side}")[2] - 0.3
    assert head(heads, "head")[2] > head(heads, "spine01")[2] + 0.2
    still = [i for i, b in enumerate(P.ANNY_BONE_LABELS) if "finger" in b or "toe" in b or b == "root"]
    assert torch.allclose(motion.local_rotations[:, still], torch.eye(3).expand(2, len(still), 3, 3))


def test_knee_and_root_motion(anny_model):
    knee = np.array([[0, 0, 0], [0, 60, 0]], dtype=float)  # X +60: shin swings back (-z in CMU)
    hips = np.array([[0, 0, 0], [0, 0, 90]], dtype=float)  # Y 90: turn to face +x
    position = np.array([[0.0, 90.0, 0.0], [10.0, 95.0, 20.0]])
    motion = bvh.bvh_to_anny(bvh.parse_bvh(write_bvh(
        {"LeftLeg": knee, "Hips": hips, "Hips_pos": position}, 2)))
    heads = bone_heads(anny_model, motion.local_rotations)
    assert bend(heads, "upperleg01.L", "lowerleg01.L", "foot.L")[1] == pytest.approx(60, abs=2)
    assert head(heads, "foot.L")[1, 1] - head(heads, "lowerleg01.L")[1, 1] > 0.2  # ankle behind
    torch.testing.assert_close(motion.root_rotation[0], torch.eye(3))
    turned = motion.root_rotation[1] @ torch.tensor([0.0, -1.0, 0.0])  # anny's facing direction
    torch.testing.assert_close(turned, torch.tensor([1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    scale = float(motion.root_translation[0, 2]) / 90.0
    leg = np.linalg.norm(P.rest_head("lowerleg01.L") - P.rest_head("upperleg01.L")) + np.linalg.norm(
        P.rest_head("foot.L") - P.rest_head("lowerleg01.L"))
    assert scale == pytest.approx(leg / 80.0, rel=1e-4)
    torch.testing.assert_close(motion.root_translation[1], torch.tensor([10.0, -20.0, 95.0]) * scale)


def test_name_prefixes_and_spine_split():
    names = ["mixamorig:Hips", "mixamorig:Spine", "mixamorig:Spine1", "mixamorig:Spine2",
             "mixamorig:Neck", "mixamorig:Head", "mixamorig:LeftArm"]
    runs = bvh.anny_runs(names)
    assert runs["mixamorig:Spine"] == ("spine05", "spine04")
    assert runs["mixamorig:Spine2"] == ("spine01",)
    assert runs["mixamorig:Neck"] == ("neck01", "neck02", "neck03")
    assert runs["mixamorig:LeftArm"] == ("upperarm01.L",)
    cmu = bvh.anny_runs([name for name, _, _ in SKELETON])
    spine = [b for n in ("LowerBack", "Spine", "Spine1") for b in cmu[n]]
    assert spine == list(P.SPINE_BONES) and cmu["LeftShoulder"] == ("clavicle.L", "shoulder01.L")
    with pytest.raises(ValueError):
        bvh.axes_to_anny("y", "y")
    np.testing.assert_allclose(bvh.axes_to_anny("y", "z") @ [0, 0, 1], [0, -1, 0])


def test_spine_rotation_is_spread_not_multiplied(anny_model):
    lower_back = np.array([[0, 0, 0], [0, 20, 0]], dtype=float)  # X +20 in CMU: bend forward
    motion = bvh.bvh_to_anny(bvh.parse_bvh(write_bvh({"LowerBack": lower_back}, 2)))
    heads = bone_heads(anny_model, motion.local_rotations)
    chest = head(heads, "neck01") - head(heads, "spine03")
    cos = chest[0] @ chest[1] / np.linalg.norm(chest[0]) / np.linalg.norm(chest[1])
    assert np.degrees(np.arccos(cos)) == pytest.approx(20.0, abs=1.0)
    assert chest[1, 1] < chest[0, 1]  # the chest tips forward, toward anny's -y
    lumbar = [P.ANNY_BONE_LABELS.index(b) for b in ("spine05", "spine04")]
    torch.testing.assert_close(motion.local_rotations[1, lumbar[0]], motion.local_rotations[1, lumbar[1]])
