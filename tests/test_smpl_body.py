"""SMPLBody on a written stand-in of the official SMPL pickle: layout, skinning, errors."""
from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixtures_smpl as fx  # noqa: E402

from vqhps.body.base import H36M17_NAMES, SMPL24_NAMES  # noqa: E402
from vqhps.body.smpl import SMPLBody, load_smpl_arrays  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("smpl")
    fx.write_smpl_pkl(d, "neutral", seed=0)
    return d


@pytest.fixture(scope="module")
def body(model_dir: Path) -> SMPLBody:
    return SMPLBody(model_dir)


@pytest.fixture(scope="module")
def arrays() -> dict:
    return fx.make_smpl_arrays(seed=0)


def rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def test_written_file_has_official_layout(model_dir: Path) -> None:
    with (model_dir / "SMPL_NEUTRAL.pkl").open("rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    assert raw["v_template"].shape == (6890, 3)
    assert raw["shapedirs"].shape == (6890, 3, 10)
    assert raw["posedirs"].shape == (6890, 3, 207)
    assert raw["J_regressor"].shape == (24, 6890) and hasattr(raw["J_regressor"], "toarray")
    assert raw["weights"].shape == (6890, 24)
    assert raw["kintree_table"].shape == (2, 24) and raw["kintree_table"][0, 0] == 4294967295
    assert raw["f"].shape == (13776, 3)
    np.testing.assert_allclose(raw["weights"].sum(1), 1.0)
    np.testing.assert_allclose(np.asarray(raw["J_regressor"].sum(1)).ravel(), 1.0)


def test_buffers(body: SMPLBody, arrays: dict) -> None:
    assert body.n_vertices == 6890 and body.shape_dim == 10 and body.name == "smpl"
    assert tuple(body.faces.shape) == (13776, 3)
    assert body.parents.tolist() == fx.PARENTS
    np.testing.assert_allclose(body.regressor24.numpy(), arrays["J_regressor"].toarray(), atol=1e-7)
    assert tuple(body.regressor17.shape) == (17, 6890)
    np.testing.assert_allclose(body.regressor17.sum(1).numpy(), 1.0, atol=1e-5)
    # the template is mirror-symmetric: flip is an involution mapping each vertex onto its mirror
    flip = body.vertex_flip
    assert torch.equal(flip[flip], torch.arange(6890))
    mirrored = body.template[flip] * torch.tensor([-1.0, 1.0, 1.0])
    assert torch.allclose(mirrored, body.template, atol=1e-6)
    assert body.identifier().startswith("smpl-6890-")
    assert not any(k in body.state_dict() for k in ("template", "posedirs", "shapedirs"))


def test_zero_pose_zero_shape_is_template(body: SMPLBody, arrays: dict) -> None:
    for pose in (torch.zeros(2, 72), torch.zeros(2, 24, 3), torch.eye(3).expand(2, 24, 3, 3)):
        out = body(pose, torch.zeros(2, 10))
        np.testing.assert_allclose(out.vertices[1].numpy(), arrays["v_template"], atol=1e-6)
        expected_joints = arrays["J_regressor"].toarray() @ arrays["v_template"]
        np.testing.assert_allclose(out.joints[0].numpy(), expected_joints, atol=1e-5)


def test_shape_blend(body: SMPLBody, arrays: dict) -> None:
    betas = np.random.default_rng(1).normal(size=(1, 10))
    out = body(torch.zeros(1, 72), torch.tensor(betas, dtype=torch.float32))
    expected = arrays["v_template"] + np.einsum("vcs,s->vc", arrays["shapedirs"], betas[0])
    np.testing.assert_allclose(out.vertices[0].numpy(), expected, atol=1e-5)


def test_knee_rotation_moves_exactly_its_subtree(body: SMPLBody, arrays: dict) -> None:
    knee = SMPL24_NAMES.index("left_knee")
    assert knee == 4
    rot = rot_x(math.pi / 2)
    pose = torch.zeros(1, 24, 3)
    pose[0, knee, 0] = math.pi / 2
    moved_verts = body(pose, torch.zeros(1, 10)).vertices[0].double().numpy()

    template, weights = arrays["v_template"], arrays["weights"]
    w_sub = weights[:, fx.subtree(knee)].sum(1)
    unchanged = w_sub == 0
    assert unchanged.any() and (~unchanged).any()
    np.testing.assert_allclose(moved_verts[unchanged], template[unchanged], atol=1e-7, rtol=0)  # float32 noise
    assert (np.linalg.norm(moved_verts - template, axis=1)[~unchanged] > 1e-6).all()

    # independent linear blend skinning of one rotated joint, pose correctives included
    j_knee = arrays["J_regressor"].toarray()[knee] @ template
    feature = (rot - np.eye(3)).reshape(-1)
    offsets = arrays["posedirs"][:, :, 9 * (knee - 1): 9 * knee] @ feature
    rest = template + offsets
    rotated = (rest - j_knee) @ rot.T + j_knee
    expected = (1 - w_sub)[:, None] * rest + w_sub[:, None] * rotated
    np.testing.assert_allclose(moved_verts, expected, atol=2e-5)


def test_global_orientation_rotates_about_root_joint(body: SMPLBody, arrays: dict) -> None:
    rng = np.random.default_rng(2)
    pose = torch.tensor(rng.normal(scale=0.3, size=(1, 72)), dtype=torch.float32)
    betas = torch.tensor(rng.normal(size=(1, 10)), dtype=torch.float32)
    base = body(pose, betas).vertices[0].double().numpy()
    pose_r = pose.clone()
    pose_r[0, :3] = torch.tensor([math.pi / 2, 0.0, 0.0])
    turned = body(pose_r, betas).vertices[0].double().numpy()
    shaped = arrays["v_template"] + np.einsum("vcs,s->vc", arrays["shapedirs"], betas[0].double().numpy())
    root = arrays["J_regressor"].toarray()[0] @ shaped
    # pose[0,:3] was random: undo it, then apply the 90 deg x rotation, both about the root joint
    from scipy.spatial.transform import Rotation

    r0 = Rotation.from_rotvec(pose[0, :3].double().numpy()).as_matrix()
    expected = (base - root) @ r0 @ rot_x(math.pi / 2).T + root
    np.testing.assert_allclose(turned, expected, atol=2e-5)


def test_pose_formats_agree(body: SMPLBody) -> None:
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(3)
    aa = rng.normal(scale=0.4, size=(2, 24, 3))
    mats = Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(2, 24, 3, 3)
    betas = torch.tensor(rng.normal(size=(2, 10)), dtype=torch.float32)
    a = body(torch.tensor(aa.reshape(2, 72), dtype=torch.float32), betas).vertices
    b = body(torch.tensor(aa, dtype=torch.float32), betas).vertices
    c = body(torch.tensor(mats, dtype=torch.float32), betas).vertices
    assert torch.allclose(a, b) and torch.allclose(a, c, atol=1e-5)
    with pytest.raises(ValueError, match="pose"):
        body(torch.zeros(2, 23, 3), betas)
    with pytest.raises(ValueError, match="shape"):
        body(torch.zeros(2, 72), torch.zeros(2, 7))


def test_missing_file_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQHPS_SMPL_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        SMPLBody()
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "nowhere" / "SMPL_NEUTRAL.pkl") in msg
    assert "VQHPS_SMPL_DIR" in msg and "smpl.is.tue.mpg.de" in msg
    with pytest.raises(FileNotFoundError, match="SMPL_FEMALE.pkl"):
        SMPLBody(tmp_path, gender="female")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"posedirs": None}, "posedirs"),
        ({"weights": np.full((6890, 23), 1 / 23)}, "weights"),
        ({"shapedirs": np.zeros((6890, 3, 4))}, "shapedirs"),
        ({"f": np.full((10, 3), 7000)}, "'f'"),
        ({"kintree_table": np.zeros((2, 24), np.int64)}, "kintree_table"),
        ({"v_template": "oops"}, "v_template"),
    ],
)
def test_malformed_field(arrays: dict, tmp_path: Path, change: dict, field: str) -> None:
    data = {k: v for k, v in {**arrays, **change}.items() if v is not None}
    bad = fx.write_smpl_pkl(tmp_path, "neutral", arrays=data)
    with pytest.raises(ValueError) as info:
        load_smpl_arrays(bad)
    assert field in str(info.value) and str(bad) in str(info.value)


def test_not_a_pickle(tmp_path: Path) -> None:
    bad = tmp_path / "SMPL_NEUTRAL.pkl"
    bad.write_bytes(b"PK\x03\x04 definitely not a pickle")
    with pytest.raises(ValueError, match="SMPL_NEUTRAL.pkl"):
        SMPLBody(tmp_path)
    with pytest.raises(ValueError, match="gender"):
        SMPLBody(tmp_path, gender="robot")


def test_chumpy_wrapped_file_loads(tmp_path: Path, arrays: dict) -> None:
    fx.write_smpl_pkl(tmp_path, "male", seed=0, chumpy=True)
    assert "chumpy" not in sys.modules
    male = SMPLBody(tmp_path, gender="male")
    np.testing.assert_allclose(male.template.numpy(), arrays["v_template"], atol=1e-6)
    np.testing.assert_allclose(male.lbs_weights.numpy(), arrays["weights"], atol=1e-7)


def test_h36m_regressor_file_or_fallback(model_dir: Path, body: SMPLBody, arrays: dict, tmp_path: Path) -> None:
    assert body.regressor17_source == "fallback"
    reg24 = arrays["J_regressor"].toarray()
    reg17 = body.regressor17.double().numpy()
    for name in ("pelvis", "left_knee", "right_wrist"):
        np.testing.assert_allclose(reg17[H36M17_NAMES.index(name)], reg24[SMPL24_NAMES.index(name)], atol=1e-7)
    joints17 = reg17 @ arrays["v_template"]
    head_top = joints17[H36M17_NAMES.index("head_top")]
    assert head_top[1] > (reg24 @ arrays["v_template"])[SMPL24_NAMES.index("head"), 1]

    fx.write_smpl_pkl(tmp_path, "neutral", seed=0)
    own = np.random.default_rng(4).random((17, 6890))
    own /= own.sum(1, keepdims=True)
    np.save(tmp_path / "J_regressor_h36m.npy", own)
    with_file = SMPLBody(tmp_path)
    assert with_file.regressor17_source == "file"
    np.testing.assert_allclose(with_file.regressor17.numpy(), own, atol=1e-7)
    np.save(tmp_path / "J_regressor_h36m.npy", own[:, :100])
    with pytest.raises(ValueError, match="J_regressor_h36m.npy"):
        SMPLBody(tmp_path)


def test_import_does_not_need_the_file(tmp_path: Path) -> None:
    import os
    import subprocess

    env = {**os.environ, "VQHPS_SMPL_DIR": str(tmp_path / "absent")}
    code = "import vqhps.body.smpl, vqhps.data.amass, vqhps.data.pw3d, vqhps.data.sample"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
