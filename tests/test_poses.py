"""Procedural pose library: joint limits, angle <-> rotation maps, sampler, and posed anny geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vqhps.data import poses as P

REQUIRED_POSES = (
    "stand", "t_pose", "a_pose", "walk_left", "walk_right", "run_left", "run_right", "sit",
    "crouch", "kneel", "reach_up", "reach_forward", "wave", "jump", "lie", "bend_forward", "throw",
    "kick", "squat", "lunge", "arms_crossed", "hands_on_hips", "phone_call", "stretch_side",
)



def pose_anny(model, rotations: torch.Tensor, phenotype: torch.Tensor | None = None) -> dict:
    """Bone heads (B, 104, 3), bone rotations (B, 104, 3, 3) and rest rotations of posed anny."""
    rotations = rotations.reshape(-1, P.ANNY_N_BONES, 3, 3).float()
    batch = rotations.shape[0]
    transforms = torch.eye(4).repeat(batch, P.ANNY_N_BONES, 1, 1)
    transforms[..., :3, :3] = rotations
    if phenotype is None:
        phenotype = torch.full((batch, 6), 0.5)
    with torch.no_grad():
        out = model(pose_parameters=transforms, phenotype_kwargs=phenotype)
    return {"heads": out["bone_poses"][..., :3, 3].double().numpy(),
            "rot": out["bone_poses"][..., :3, :3].double().numpy(),
            "rest_rot": out["rest_bone_poses"][..., :3, :3].double().numpy()}


def head_of(heads: np.ndarray, bone: str) -> np.ndarray:
    return heads[..., P.ANNY_BONE_LABELS.index(bone), :]


def angle_deg(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def key_heads(model, *names: str) -> np.ndarray:
    rots = torch.stack([P.angles_to_local_rotations(P.KEY_POSES[n]) for n in names])
    return pose_anny(model, rots)["heads"]


# ------------------------------------------------------------------------------------------------
# Tables and limits.


def test_skeleton_tables_match_anny(anny_model):
    assert tuple(anny_model.bone_labels) == P.ANNY_BONE_LABELS
    assert tuple(int(p) for p in anny_model.bone_parents) == P.ANNY_BONE_PARENTS
    heads = pose_anny(anny_model, torch.eye(3).expand(P.ANNY_N_BONES, 3, 3))["heads"][0]
    for bone in list(P.ANNY_REST_HEADS) + ["wrist.R", "foot.R", "finger2-1.R"]:
        np.testing.assert_allclose(P.rest_head(bone), head_of(heads, bone), atol=2e-3, err_msg=bone)


def test_articulated_bones_are_body_bones():
    assert len(P.ARTICULATED_BONES) == P.N_JOINTS == len(set(P.ARTICULATED_BONES))
    for bone in P.ARTICULATED_BONES:
        assert bone in P.ANNY_BONE_LABELS
        assert not any(s in bone for s in ("finger", "toe", "eye", "metacarpal", "root"))
    for bone in ("upperleg01.L", "lowerleg01.R", "foot.L", "spine05", "spine01", "clavicle.R",
                 "upperarm01.L", "lowerarm01.R", "wrist.L", "neck01", "head"):
        assert bone in P.ARTICULATED_BONES


def test_limits_are_anatomical():
    lim = P.JOINT_LIMITS
    assert lim.lower.shape == lim.upper.shape == (P.N_JOINTS, 3)
    assert (lim.upper >= lim.lower).all()
    for side in "LR":
        for hinge in ("lowerleg01", "lowerarm01"):  # knee and elbow flex one way only
            j = P.JOINT_INDEX[f"{hinge}.{side}"]
            assert lim.lower[j, 0] == 0 and lim.upper[j, 0] >= 120
        shoulder, spine = P.JOINT_INDEX[f"upperarm01.{side}"], P.JOINT_INDEX["spine03"]
        assert lim.span[shoulder].min() > 2 * lim.span[spine].max()
    midline = np.array(P.JOINT_SIDES) == ""
    np.testing.assert_array_equal(lim.lower[midline, 1:], -lim.upper[midline, 1:])
    np.testing.assert_array_equal(lim.lower, lim.lower[P.MIRROR_INDEX])
    angles = np.random.default_rng(0).normal(scale=200.0, size=(5, P.N_JOINTS, 3))
    assert lim.contains(lim.clip(angles)).all()
    assert not lim.contains(angles).any()


def test_key_poses_within_limits():
    assert len(P.KEY_POSES) >= 20
    assert set(REQUIRED_POSES) <= set(P.KEY_POSES)
    for name, angles in P.KEY_POSES.items():
        assert angles.shape == (P.N_JOINTS, 3)
        worst = P.JOINT_LIMITS.violation(angles).max()
        assert worst == 0.0, f"{name} leaves the joint limits by {worst:.1f} degrees"
    distinct = {tuple(np.round(a, 3).ravel()) for a in P.KEY_POSES.values()}
    assert len(distinct) == len(P.KEY_POSES)


# ------------------------------------------------------------------------------------------------
# Angles <-> rotations.


def test_rotations_are_proper_and_identity_elsewhere():
    rng = np.random.default_rng(1)
    angles = rng.uniform(P.JOINT_LIMITS.lower, P.JOINT_LIMITS.upper, size=(16, P.N_JOINTS, 3))
    angles = np.concatenate([angles, np.stack(list(P.KEY_POSES.values()))])
    rot = P.angles_to_local_rotations(angles).double()
    assert rot.shape == (len(angles), P.ANNY_N_BONES, 3, 3)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye.expand_as(rot), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(rot.shape[:2], dtype=torch.float64),
                          atol=1e-5)
    still = [i for i, b in enumerate(P.ANNY_BONE_LABELS) if b not in P.ARTICULATED_BONES]
    assert 0 in still and P.ANNY_BONE_LABELS.index("finger2-1.L") in still
    assert torch.equal(rot[:, still], eye.expand(len(angles), len(still), 3, 3))
    moved = (rot[:16, [P.ANNY_BONE_LABELS.index(b) for b in P.ARTICULATED_BONES]] - eye).abs()
    assert moved.amax(dim=(-1, -2)).gt(1e-3).all()


def test_angles_round_trip():
    rng = np.random.default_rng(2)
    box = np.minimum(np.maximum(np.abs(P.JOINT_LIMITS.lower), P.JOINT_LIMITS.upper), 80.0)
    angles = rng.uniform(-box, box, size=(32, P.N_JOINTS, 3))
    angles = np.where(P.JOINT_LIMITS.span > 0, angles, 0.0)
    back = P.local_rotations_to_angles(P.angles_to_local_rotations(angles, dtype=torch.float64))
    np.testing.assert_allclose(back, angles, atol=1e-6)
    # beyond +-90 degrees of abduction the triple changes but the rotation does not
    raised = P.angles_to_local_rotations(P.KEY_POSES["reach_up"], dtype=torch.float64)
    again = P.angles_to_local_rotations(P.local_rotations_to_angles(raised), dtype=torch.float64)
    assert torch.allclose(again, raised, atol=1e-9)


def test_anatomical_position_for_any_phenotype(anny_model):
    zeros = P.angles_to_local_rotations(np.zeros((4, P.N_JOINTS, 3)))
    phenotype = torch.tensor([[0.5] * 6, [0.0] * 6, [1.0] * 6, [0.2, 0.9, 0.1, 0.8, 0.3, 0.6]])
    heads = pose_anny(anny_model, zeros, phenotype)["heads"]
    for side in "LR":
        sh, el, wr = (head_of(heads, f"{b}.{side}") for b in ("upperarm01", "lowerarm01", "wrist"))
        hip, knee, ankle = (head_of(heads, f"{b}.{side}") for b in ("upperleg01", "lowerleg01", "foot"))
        down = np.array([0.0, 0.0, -1.0])  # offsets measured at phenotype 0.5; others within 6 deg
        assert (angle_deg(el - sh, down) < 6).all() and (angle_deg(wr - el, down) < 6).all()
        assert (angle_deg(knee - hip, down) < 6).all() and (angle_deg(ankle - knee, down) < 6).all()
        assert angle_deg(el - sh, down)[0] < 1 and angle_deg(knee - hip, down)[0] < 1


# ------------------------------------------------------------------------------------------------
# Posed geometry.


def test_stand_lowers_the_arms(anny_model):
    heads = key_heads(anny_model, "stand")[0]
    rest = pose_anny(anny_model, torch.eye(3).expand(P.ANNY_N_BONES, 3, 3))["heads"][0]
    for side in "LR":
        shoulder, wrist = head_of(heads, f"upperarm01.{side}"), head_of(heads, f"wrist.{side}")
        assert wrist[2] < shoulder[2] - 0.3
        assert abs(wrist[0]) < abs(head_of(rest, f"wrist.{side}")[0]) - 0.1  # closer in than rest


def test_t_pose_arms_horizontal_and_wide(anny_model):
    heads = key_heads(anny_model, "t_pose")[0]
    shoulders = [head_of(heads, f"upperarm01.{s}") for s in "LR"]
    wrists = [head_of(heads, f"wrist.{s}") for s in "LR"]
    for shoulder, wrist in zip(shoulders, wrists):
        assert abs(wrist[2] - shoulder[2]) < 0.05
    span = np.linalg.norm(wrists[0] - wrists[1])
    assert span > 3.0 * np.linalg.norm(shoulders[0] - shoulders[1])
    assert wrists[0][0] > 0.4 and wrists[1][0] < -0.4  # left arm toward +x


def test_sit_bends_the_knees(anny_model):
    heads = key_heads(anny_model, "sit")[0]
    for side in "LR":
        hip, knee, ankle = (head_of(heads, f"{b}.{side}") for b in ("upperleg01", "lowerleg01", "foot"))
        assert angle_deg(hip - knee, ankle - knee) < 120
        assert knee[1] < hip[1] - 0.2  # thighs forward (-y)


def test_reach_up_hand_above_head(anny_model):
    heads = key_heads(anny_model, "reach_up")[0]
    top = head_of(heads, "head")[2]
    assert max(head_of(heads, "wrist.L")[2], head_of(heads, "wrist.R")[2]) > top + 0.1


def test_knee_flexion_moves_the_ankle_backward(anny_model):
    base = P.KEY_POSES["stand"]
    batch = []
    for flex in (0.0, 30.0, 60.0, 90.0, 140.0, 150.0):
        angles = base.copy()
        for side in "LR":
            angles[P.JOINT_INDEX[f"lowerleg01.{side}"], 0] = flex
        batch.append(angles)
    heads = pose_anny(anny_model, P.angles_to_local_rotations(np.stack(batch)))["heads"]
    for side in "LR":
        ankle_y = head_of(heads, f"foot.{side}")[:, 1] - head_of(heads, f"lowerleg01.{side}")[:, 1]
        ankle_z = head_of(heads, f"foot.{side}")[:, 2]
        assert abs(ankle_y[0]) < 0.02 and (ankle_y[1:] > 0.1).all(), ankle_y
        assert (np.diff(ankle_y[:4]) > 0.02).all() and (np.diff(ankle_z) > 0).all()
    clipped = P.JOINT_LIMITS.clip(np.full((P.N_JOINTS, 3), -20.0))
    assert clipped[P.JOINT_INDEX["lowerleg01.L"], 0] == 0.0


def test_sampled_knees_and_elbows_bend_the_anatomical_way(anny_model):
    rot, info = P.PoseSampler(seed=3).sample(48)
    out = pose_anny(anny_model, rot)
    neutral = pose_anny(anny_model, P.angles_to_local_rotations(np.zeros((P.N_JOINTS, 3))))
    angles = info["angles"]
    for side in "LR":
        for upper, lower, end, sign in (("upperleg01", "lowerleg01", "foot", 1.0),
                                        ("upperarm01", "lowerarm01", "wrist", -1.0)):
            i = P.ANNY_BONE_LABELS.index(f"{upper}.{side}")
            # the proximal bone's motion since the anatomical position, applied to +y (backward)
            skin = out["rot"][:, i] @ np.swapaxes(out["rest_rot"][:, i], -1, -2)
            skin0 = neutral["rot"][0, i] @ neutral["rest_rot"][0, i].T
            back = (skin @ skin0.T) @ np.array([0.0, 1.0, 0.0])
            distal = head_of(out["heads"], f"{end}.{side}") - head_of(out["heads"], f"{lower}.{side}")
            along = sign * (distal * back).sum(-1)  # knees bend backward, elbows forward
            flex = angles[:, P.JOINT_INDEX[f"{lower}.{side}"], 0]
            assert (along > -0.02).all()
            assert (along[flex > 30] > 0.05).all()


# ------------------------------------------------------------------------------------------------
# Mirroring.


def test_mirror_twice_is_identity():
    rng = np.random.default_rng(4)
    angles = rng.normal(scale=30.0, size=(8, P.N_JOINTS, 3))
    np.testing.assert_array_equal(P.mirror_angles(P.mirror_angles(angles)), angles)
    for name, a in P.KEY_POSES.items():
        np.testing.assert_array_equal(P.mirror_angles(P.mirror_angles(a)), a, err_msg=name)
    assert not np.allclose(P.mirror_angles(P.KEY_POSES["wave"]), P.KEY_POSES["wave"])


def test_mirror_is_the_reflected_body(anny_model):
    names = ["wave", "throw", "look_back", "stretch_side", "walk_left"]
    angles = np.stack([P.KEY_POSES[n] for n in names])
    both = np.concatenate([angles, P.mirror_angles(angles)])
    heads = pose_anny(anny_model, P.angles_to_local_rotations(both))["heads"]
    original, mirrored = heads[: len(names)], heads[len(names):]
    swap = [P.ANNY_BONE_LABELS.index(b[:-2] + (".R" if b.endswith(".L") else ".L"))
            if b.endswith((".L", ".R")) else i for i, b in enumerate(P.ANNY_BONE_LABELS)]
    reflected = original[:, swap] * np.array([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(mirrored, reflected, atol=0.01)
    wave = heads[0]
    assert head_of(wave, "wrist.R")[2] > head_of(wave, "upperarm01.R")[2] > head_of(wave, "wrist.L")[2]
    flipped = heads[len(names)]
    assert head_of(flipped, "wrist.L")[2] > head_of(flipped, "upperarm01.L")[2] > head_of(flipped, "wrist.R")[2]


# ------------------------------------------------------------------------------------------------
# Sampler.


def test_sampler_is_deterministic_per_seed():
    rot_a, info_a = P.PoseSampler(seed=7).sample(16)
    rot_b, info_b = P.PoseSampler(seed=7).sample(16)
    rot_c, _ = P.PoseSampler(seed=8).sample(16)
    assert rot_a.shape == (16, P.ANNY_N_BONES, 3, 3) and rot_a.dtype == torch.float32
    assert torch.equal(rot_a, rot_b)
    for key in info_a:
        np.testing.assert_array_equal(info_a[key], info_b[key])
    assert (rot_a - rot_c).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    sampler = P.PoseSampler(seed=7)
    first, _ = sampler.sample(16)
    second, _ = sampler.sample(16)
    assert torch.equal(first, rot_a) and not torch.equal(second, rot_a)


def test_sampler_output_is_valid_and_varied():
    sampler = P.PoseSampler(seed=5)
    rot, info = sampler.sample(200)
    angles = info["angles"]
    assert angles.shape == (200, P.N_JOINTS, 3)
    assert P.JOINT_LIMITS.contains(angles, tol=1e-3).all()
    assert torch.allclose(rot, P.angles_to_local_rotations(angles), atol=1e-4)
    assert 0.3 < info["mirrored"].mean() < 0.7
    assert 0.1 < info["part_mixed"].mean() < 0.5
    assert len(set(info["pose_a"]) | set(info["pose_b"])) > 20
    assert ((info["weight"] >= 0) & (info["weight"] <= 1)).all()
    assert angles.std(axis=0).mean() > 5.0
    eye = torch.eye(3)
    assert torch.equal(rot[:, 0], eye.expand(200, 3, 3))
    root_pitch = P.root_pitch_rotation(info["root_pitch"])
    np.testing.assert_allclose(np.linalg.det(root_pitch), 1.0, atol=1e-6)


def test_key_pose_lookup():
    sampler = P.PoseSampler(seed=0)
    stand = sampler.key_pose("stand")
    assert stand.shape == (P.ANNY_N_BONES, 3, 3)
    assert torch.equal(stand, P.angles_to_local_rotations(P.KEY_POSES["stand"]))
    with pytest.raises(KeyError):
        sampler.key_pose("moonwalk")
    only = P.PoseSampler(seed=0, key_poses=["sit", "squat"], noise=0.0, mirror_prob=0.0,
                         part_mix_prob=0.0)
    _, info = only.sample(10)
    assert set(info["pose_a"]) | set(info["pose_b"]) <= {"sit", "squat"}
    knees = info["angles"][:, P.JOINT_INDEX["lowerleg01.L"], 0]
    assert (knees >= 90 - 1e-4).all() and (knees <= 130 + 1e-4).all()
