"""The rendered benchmark: labels agree with the geometry, splits are disjoint, shards are checked."""
import numpy as np
import pytest
import torch

from vqhps.data.datasets import Augmentation, _geometric, canonical_targets
from vqhps.data.sample import apply_affine, crop_affine, project_points
from vqhps.data.synthetic import (CorruptShardError, build_split, build_splits, check_split, load_split, make_spec,
                                  shard_path, subject_pool)


@pytest.fixture()
def built(tiny_cfg, body):
    for split in ("train", "test"):
        build_split(tiny_cfg, split, workers=0, progress=False)
    return tiny_cfg


def test_joints2d_are_the_projection_of_the_3d_joints(built, body):
    a = load_split(built, "train")
    canon = canonical_targets(body, torch.as_tensor(a["pose"]), torch.as_tensor(a["shape"])).numpy()
    for i in range(len(canon)):
        verts_cam = canon[i] @ a["root_rot"][i].T + a["trans"][i]
        j3d = body.regressor24.numpy() @ verts_cam
        full = project_points(j3d, a["K"][i].astype(np.float64))
        crop = apply_affine(full, crop_affine(a["bbox"][i], built.data.crop_size))
        assert np.abs(crop - a["joints2d_24"][i]).max() < 0.5


def test_canonical_mesh_rotated_and_translated_is_the_camera_mesh(built, body):
    """verts_cam = R canonical + t to 1e-5 m, and that mesh is what the image shows."""
    a = load_split(built, "train")
    pose, shape = torch.as_tensor(a["pose"]), torch.as_tensor(a["shape"])
    posed = body(pose, shape).vertices.double().numpy()  # not centred, not rotated
    canon = canonical_targets(body, pose, shape).double().numpy()
    for i in range(len(canon)):
        verts_cam = canon[i] @ a["root_rot"][i].T.astype(np.float64) + a["trans"][i]
        direct = (posed[i] - posed[i].mean(0)) @ a["root_rot"][i].T.astype(np.float64) + a["trans"][i]
        assert np.abs(verts_cam - direct).max() < 1e-5
        assert np.abs(verts_cam.mean(0) - a["trans"][i]).max() < 1e-5
        # the projected mesh fills the label's box as the crop shows it
        proj = apply_affine(project_points(verts_cam.astype(np.float64), a["K"][i].astype(np.float64)),
                            crop_affine(a["bbox"][i], built.data.crop_size))
        span = proj.max(0) - proj.min(0)
        assert np.isclose(span.max(), built.data.crop_size / 1.2, rtol=0.02)


def test_rotation_matrices_are_proper(built):
    r = load_split(built, "train")["root_rot"].astype(np.float64)
    assert np.allclose(r @ r.transpose(0, 2, 1), np.eye(3), atol=1e-5)
    assert np.allclose(np.linalg.det(r), 1.0, atol=1e-5)


def test_test_subjects_never_appear_in_train(smoke_cfg):
    train_ids, train_ph = subject_pool("train", smoke_cfg.data.n_train, smoke_cfg.data.seed)
    test_ids, test_ph = subject_pool("test", smoke_cfg.data.n_test, smoke_cfg.data.seed)
    assert not set(train_ids) & set(test_ids)
    dist = np.abs(train_ph[:, None] - test_ph[None]).max(-1)
    assert dist.min() > 1e-4


def test_test_backgrounds_are_unseen():
    from vqhps.data.backgrounds import sources

    assert not set(sources("train")) & set(sources("test"))
    assert sources("val") == sources("train")


def test_corrupt_shard_is_detected_and_rebuilt_identically(built, body):
    spec = make_spec(built, "train", body.identifier())
    path = shard_path(built.data_dir / "benchmark", "train", 1)
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert check_split(built.data_dir / "benchmark", spec) == [1]
    with pytest.raises(CorruptShardError, match="shards \\[1\\]"):
        load_split(built, "train")
    build_split(built, "train", workers=0, progress=False)
    assert path.read_bytes() == original


def test_changed_settings_invalidate_the_split(built, body):
    built.data.occluder_prob = 0.9
    spec = make_spec(built, "train", body.identifier())
    assert check_split(built.data_dir / "benchmark", spec) == list(range(spec.n_shards))


def test_flipping_twice_restores_the_labels(built, body):
    a = load_split(built, "train")
    images = torch.as_tensor(a["image"]).permute(0, 3, 1, 2).float() / 255
    j24, j17 = torch.as_tensor(a["joints2d_24"]), torch.as_tensor(a["joints2d_17"])
    rot = torch.as_tensor(a["root_rot"])
    b = len(images)
    ones, zeros = torch.ones(b, dtype=torch.bool), torch.zeros(b)
    args = (ones, zeros, torch.ones(b), body.joint_flip24, body.joint_flip17)
    once = _geometric(images, j24, j17, rot, *args)
    twice = _geometric(*once, *args)
    assert torch.allclose(twice[0], images, atol=1e-5)
    for x, y in zip(twice[1:], (j24, j17, rot)):
        assert torch.allclose(x, y, atol=1e-4)
    # a flipped label is still a consistent label: the mirrored mesh projects onto the mirrored joints
    assert not torch.allclose(once[1], j24)


def test_flipped_targets_match_flipped_labels(built, body):
    """Mirrored canonical mesh, mirrored rotation: its joints' x-order flips as the image does."""
    a = load_split(built, "train")
    pose, shape = torch.as_tensor(a["pose"]), torch.as_tensor(a["shape"])
    flipped = torch.ones(len(pose), dtype=torch.bool)
    canon = canonical_targets(body, pose, shape)
    mirrored = canonical_targets(body, pose, shape, flipped)
    j = body.joints24(canon)
    jm = body.joints24(mirrored)
    assert torch.allclose(jm[:, body.joint_flip24] * torch.tensor([-1.0, 1, 1]), j, atol=3e-3)
    assert Augmentation().rot_prob == 0.4


def test_split_meshes_are_known_without_rendering(built):
    from vqhps.data.synthetic import split_meshes

    a = load_split(built, "test")
    m = split_meshes(built, "test")
    assert np.array_equal(m["pose"], a["pose"]) and np.array_equal(m["shape"], a["shape"])
    assert np.array_equal(m["subject"], a["subject"])


def test_worker_pool_renders_the_same_splits_as_one_process(tiny_cfg, tmp_path):
    """Two spawned render workers sharing the shards of two splits write exactly what one process writes."""
    import copy

    pooled = copy.deepcopy(tiny_cfg)
    pooled.paths.data = tmp_path / "pooled"
    build_splits(tiny_cfg, ("val", "test"), workers=0, progress=False)
    build_splits(pooled, ("val", "test"), workers=2, progress=False)
    for split in ("val", "test"):
        a, b = load_split(tiny_cfg, split), load_split(pooled, split)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split}/{k}")
