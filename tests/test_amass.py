"""AMASS .npz reading and canonical meshes, on written SMPL+H-format files."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixtures_smpl as fx  # noqa: E402

from vqhps.body.smpl import SMPLBody  # noqa: E402
from vqhps.data.amass import amass_canonical_meshes, find_amass_files, load_amass_npz  # noqa: E402


@pytest.fixture(scope="module")
def body(tmp_path_factory: pytest.TempPathFactory) -> SMPLBody:
    d = tmp_path_factory.mktemp("smpl")
    fx.write_smpl_pkl(d, "neutral", seed=0)
    return SMPLBody(d)


def test_load_smplh_layout(tmp_path: Path) -> None:
    path = fx.write_amass_npz(tmp_path / "seq_poses.npz", n_frames=7, seed=1)
    raw = np.load(path)
    seq = load_amass_npz(path)
    assert seq["poses"].shape == (7, 72) and seq["poses"].dtype == np.float32
    np.testing.assert_allclose(seq["poses"][:, :66], raw["poses"][:, :66], rtol=1e-6)
    assert not seq["poses"][:, 66:].any()  # SMPL hand joints zeroed, not SMPL+H finger values
    np.testing.assert_allclose(seq["betas"], raw["betas"][:10], rtol=1e-6)
    assert seq["betas"].shape == (10,) and seq["trans"].shape == (7, 3)
    assert seq["gender"] == "female" and seq["fps"] == 120.0


def test_smpl_layout_keeps_hands(tmp_path: Path) -> None:
    path = fx.write_amass_npz(tmp_path / "smpl.npz", n_frames=3, width=72)
    np.testing.assert_allclose(load_amass_npz(path)["poses"], np.load(path)["poses"], rtol=1e-6)


def test_canonical_meshes_centred_and_invariant(tmp_path: Path, body: SMPLBody) -> None:
    rng = np.random.default_rng(5)
    body_pose = rng.normal(scale=0.4, size=(6, 63))
    a = fx.write_amass_npz(tmp_path / "a.npz", n_frames=6, seed=2, body_pose=body_pose,
                           orient=np.zeros(3), trans=np.zeros((6, 3)))
    b = fx.write_amass_npz(tmp_path / "b.npz", n_frames=6, seed=2, body_pose=body_pose,
                           orient=rng.normal(size=(6, 3)), trans=rng.normal(scale=3.0, size=(6, 3)))
    meshes = amass_canonical_meshes([a, b], body, batch_size=4)
    assert meshes.shape == (12, 6890, 3) and meshes.dtype == torch.float32
    assert meshes.mean(1).abs().max() < 1e-5
    assert torch.allclose(meshes[:6], meshes[6:], atol=1e-5)
    # they are the body's own meshes (zero orientation, the file's first 10 betas), just centred
    seq = load_amass_npz(a)
    direct = body(torch.from_numpy(seq["poses"]), torch.from_numpy(seq["betas"])[None].expand(6, -1)).vertices
    assert torch.allclose(meshes[:6], direct - direct.mean(1, keepdim=True), atol=1e-5)
    assert (meshes[0] - meshes[1]).abs().max() > 1e-3  # different poses give different meshes
    strided = amass_canonical_meshes(b, body, stride=4)
    assert strided.shape[0] == 2 and torch.allclose(strided, meshes[6:][::4], atol=1e-5)


def test_find_files_skips_shape(tmp_path: Path) -> None:
    fx.write_amass_npz(tmp_path / "s1" / "walk_poses.npz", n_frames=2)
    np.savez(tmp_path / "s1" / "shape.npz", betas=np.zeros(16), gender=np.array("male"))
    assert find_amass_files(tmp_path) == [tmp_path / "s1" / "walk_poses.npz"]


@pytest.mark.parametrize(
    ("kind", "field"),
    [("not_zip", "npz"), ("truncated", "npz"), ("no_poses", "poses"), ("width", "poses"),
     ("trans", "trans"), ("no_fps", "mocap_framerate")],
)
def test_malformed_files(tmp_path: Path, kind: str, field: str) -> None:
    path = tmp_path / f"{kind}.npz"
    if kind == "not_zip":
        path.write_text("hello, not an archive")
    elif kind == "truncated":
        fx.write_amass_npz(path, n_frames=50)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "no_poses":
        fx.write_amass_npz(path, drop=("poses",))
    elif kind == "width":
        fx.write_amass_npz(path, width=100)
    elif kind == "trans":
        fx.write_amass_npz(path, n_frames=5, trans=np.zeros((4, 3)))
    else:
        fx.write_amass_npz(path, drop=("mocap_framerate",))
    with pytest.raises(ValueError) as info:
        load_amass_npz(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_amass_npz(tmp_path / "absent.npz")
