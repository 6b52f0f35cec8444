"""3DPW sequence reading and samples, on a written sequence pickle with JPEG frames; the shared sample
schema and its crop/projection helpers."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).parent))
import fixtures_smpl as fx  # noqa: E402

from vqhps.body.smpl import SMPLBody  # noqa: E402
from vqhps.data.pw3d import load_pw3d_sequence, pw3d_samples  # noqa: E402
from vqhps.data.sample import apply_affine, crop_and_resize, project_points, validate_sample  # noqa: E402

CROP = 64


@pytest.fixture(scope="module")
def body(tmp_path_factory: pytest.TempPathFactory) -> SMPLBody:
    d = tmp_path_factory.mktemp("smpl")
    fx.write_smpl_pkl(d, "neutral", seed=0)
    return SMPLBody(d)


@pytest.fixture(scope="module")
def pw3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    return fx.write_pw3d(tmp_path_factory.mktemp("3dpw"), n_frames=3, n_people=2)


@pytest.fixture(scope="module")
def samples(pw3d: tuple[Path, Path, dict], body: SMPLBody) -> list[dict]:
    pkl, image_root, _ = pw3d
    return list(pw3d_samples(pkl, image_root, body, crop_size=CROP, batch_size=2))


def test_load_sequence(pw3d: tuple[Path, Path, dict]) -> None:
    pkl, image_root, data = pw3d
    seq = load_pw3d_sequence(pkl)
    assert seq.sequence == "downtown_fake_00" and seq.n_frames == 3 and seq.n_people == 2
    assert seq.genders == ["male", "female"]
    np.testing.assert_allclose(seq.poses[1], data["poses"][1], rtol=1e-6)
    assert seq.image_path(image_root, 2) == image_root / "downtown_fake_00" / "image_00004.jpg"


def test_samples_follow_schema_and_geometry(samples: list[dict], pw3d: tuple[Path, Path, dict],
                                            body: SMPLBody) -> None:
    _, _, data = pw3d
    assert len(samples) == 6
    K = data["cam_intrinsics"]
    for s in samples:
        validate_sample(s)
        p, t = s["person"], s["frame"] // 2
        # camera-frame mesh straight from the 3DPW parameters
        pose = torch.tensor(data["poses"][p][t], dtype=torch.float32)[None]
        betas = torch.tensor(data["betas"][p], dtype=torch.float32)[None]
        world = body(pose, betas).vertices[0].double().numpy() + data["trans"][p][t]
        ext = data["cam_poses"][t]
        np.testing.assert_allclose(s["verts_cam"], world @ ext[:3, :3].T + ext[:3, 3], atol=1e-5)
        # convention: verts_cam = canonical @ root_rot.T + translation (vertex mean)
        rebuilt = s["canonical"] @ s["root_rot"].T + s["verts_cam"].mean(0)
        np.testing.assert_allclose(rebuilt, s["verts_cam"], atol=1e-5)
        root = ext[:3, :3] @ Rotation.from_rotvec(data["poses"][p][t, :3]).as_matrix()
        np.testing.assert_allclose(s["root_rot"], root, atol=1e-6)
        # 2D joints: projection of the camera-frame joints through K, then the crop's affine
        x0, y0, x1, y1 = s["bbox"].astype(np.float64)
        scale = CROP / (x1 - x0)
        for n, joints3d in ((24, body.joints24), (17, body.joints17)):
            j3 = joints3d(torch.tensor(s["verts_cam"])[None])[0].double().numpy()
            uvw = j3 @ K.T
            full = uvw[:, :2] / uvw[:, 2:]
            crop = (full - [x0, y0]) * scale - 0.5
            np.testing.assert_allclose(s[f"joints2d_{n}"], crop, atol=1e-2)  # brief: 0.5 px; exact here
        # the box is square, encloses the projected mesh with a 1.2 margin
        proj = project_points(s["verts_cam"].astype(np.float64), K)
        extent = (proj.max(0) - proj.min(0)).max()
        assert np.isclose(x1 - x0, 1.2 * extent, rtol=1e-4) and np.isclose(y1 - y0, 1.2 * extent, rtol=1e-4)
        assert proj.min() > min(x0, y0) and (proj[:, 0].max() < x1) and (proj[:, 1].max() < y1)


def test_valid_and_images(samples: list[dict], pw3d: tuple[Path, Path, dict]) -> None:
    _, _, data = pw3d
    for s in samples:
        t = s["frame"] // 2
        assert bool(s["valid"]) == bool(data["campose_valid"][s["person"]][t])
        assert s["image"].shape == (CROP, CROP, 3) and s["image"].dtype == np.uint8
        # frame t is filled with grey 40 + 50 t; the crop's centre lies inside the frame
        assert abs(int(s["image"][CROP // 2, CROP // 2, 0]) - (40 + 50 * t)) <= 3
    assert {bool(s["valid"]) for s in samples} == {True, False}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cam_poses": None}, "cam_poses"),
        ({"cam_poses": np.zeros((3, 3, 4))}, "cam_poses"),
        ({"poses": [np.zeros((3, 72)), np.zeros((3, 69))]}, "poses[1]"),
        ({"trans": [np.zeros((2, 3)), np.zeros((3, 3))]}, "trans[0]"),
        ({"betas": [np.zeros(10)]}, "betas"),
        ({"cam_intrinsics": np.eye(4)}, "cam_intrinsics"),
        ({"campose_valid": [np.ones(3), np.ones(5)]}, "campose_valid[1]"),
    ],
)
def test_malformed_sequence(pw3d: tuple[Path, Path, dict], tmp_path: Path, change: dict, field: str) -> None:
    bad = fx.rewrite_pickle(pw3d[0], tmp_path / "bad.pkl", **change)
    with pytest.raises(ValueError) as info:
        load_pw3d_sequence(bad)
    assert field in str(info.value) and str(bad) in str(info.value)


def test_unreadable_and_missing(tmp_path: Path, pw3d: tuple[Path, Path, dict], body: SMPLBody) -> None:
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="junk.pkl"):
        load_pw3d_sequence(junk)
    with pytest.raises(FileNotFoundError, match="nothing.pkl"):
        load_pw3d_sequence(tmp_path / "nothing.pkl")
    pkl, image_root, _ = pw3d
    empty_root = tmp_path / "images"
    with pytest.raises(FileNotFoundError) as info:
        pw3d_samples(pkl, empty_root, body)
    assert str(empty_root / "downtown_fake_00" / "image_00000.jpg") in str(info.value)


def test_crop_and_resize_alignment() -> None:
    h, w = 40, 60
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.repeat((xx + 2 * yy).astype(np.uint8)[..., None], 3, axis=2)  # linear ramp
    for bbox, size in (((10.3, 5.7, 30.3, 25.7), 20), ((10.3, 5.7, 30.3, 25.7), 57), ((2.2, 1.1, 42.2, 41.1), 13)):
        crop, affine = crop_and_resize(image, np.array(bbox), size)
        inverse = np.linalg.inv(np.vstack([affine, [0.0, 0.0, 1.0]]))[:2]
        vv, uu = np.mgrid[0:size, 0:size]
        full = apply_affine(np.stack([uu.ravel(), vv.ravel()], 1).astype(np.float64), inverse)
        # each crop pixel holds the ramp's value at the full-frame point it maps to (away from the
        # frame's border, where the resampling filter would reach the black padding)
        reach = (bbox[2] - bbox[0]) / size + 1.0
        inside = ((full >= reach) & (full <= np.array([w - 1, h - 1]) - reach)).all(1)
        assert inside.mean() > 0.5
        np.testing.assert_allclose(crop[..., 0].ravel()[inside], full[inside, 0] + 2 * full[inside, 1], atol=1.0)
    crop, _ = crop_and_resize(image, np.array([-30.0, -30.0, -10.0, -10.0]), 8)
    assert not crop.any()  # fully outside the frame: black padding


def test_validate_sample_names_the_key(samples: list[dict]) -> None:
    good = samples[0]
    cases = {
        "image": good["image"][:10],
        "joints2d_17": good["joints2d_17"].astype(np.float64),
        "root_rot": good["root_rot"] * 2,
        "canonical": good["canonical"] + 0.1,
        "verts_cam": good["verts_cam"] + np.float32(0.05) * np.arange(good["verts_cam"].shape[0],
                                                                         dtype=np.float32)[:, None] / 6890,
        "bbox": good["bbox"] + np.array([0, 0, 5, 0], np.float32),
        "K": None,
    }
    for key, value in cases.items():
        bad = dict(good)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        with pytest.raises(ValueError, match=f"'{key}'"):
            validate_sample(bad)
