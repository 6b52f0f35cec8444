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


# ------------------------------------------------------------------ appearance: front/back cues, labels untouched
def _renderer(body, size):
    from vqhps.data.synthetic import ShardRenderer

    return ShardRenderer(body, size)


def test_renders_are_deterministic(tiny_cfg, body):
    """Same seed, split and shard: identical image bytes and labels (every appearance draw comes from
    the shard's generator); another appearance seed gives other colours."""
    from vqhps.data.synthetic import GENERATOR_VERSION

    spec = make_spec(tiny_cfg, "val", body.identifier())
    assert spec.version == GENERATOR_VERSION >= 3
    renderer = _renderer(body, tiny_cfg.data.crop_size)
    try:
        a, b = renderer.render_shard(spec, 0), renderer.render_shard(spec, 0)
        c0, c1 = (renderer.appearance.colors(np.random.default_rng(s)) for s in (5, 5))
        c2 = renderer.appearance.colors(np.random.default_rng(6))
    finally:
        renderer.close()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert c0.tobytes() == c1.tobytes() and c0.tobytes() != c2.tobytes()
    assert c0.shape == (body.n_vertices + body.eye_index.numel(), 4) and c0.dtype == np.uint8


def test_eyes_are_seen_from_the_front_and_hidden_from_the_back(body):
    """Iris and pupil vertices pass the depth test from the front, none from the back."""
    renderer = _renderer(body, 256)
    try:
        rest = body.rest_pose(1).numpy()[0]
        front, back = renderer.views(rest, np.full(body.shape_dim, 0.5, np.float32), (0.0, 180.0), seed=0)
        gaze = renderer.appearance.eye_class > 0
    finally:
        renderer.close()

    def visible(view):
        cam = view["eyes"][gaze] @ view["rot"].T + view["trans"]
        px = np.round(project_points(cam, view["K"])).astype(int)
        return np.abs(view["depth"][px[:, 1], px[:, 0]] - cam[:, 2]) < 0.004

    assert gaze.sum() >= 8
    assert visible(front).mean() > 0.8
    assert not visible(back).any()


def test_front_and_back_differ_more_than_with_part_colours(body):
    """Yaw 0 against 180 of one pose: the colour histograms of the head's and the torso's image
    regions differ more with the appearance model than with one colour per body part (the old
    outfits, taken as each part's median colour of the same appearance)."""
    from vqhps.data.poses import PoseSampler

    def histogram(view, idx):
        px = project_points(view["canonical"][idx] @ view["rot"].T + view["trans"], view["K"])
        (x0, y0), (x1, y1) = np.floor(px.min(0)).astype(int), np.ceil(px.max(0)).astype(int)
        box = np.zeros_like(view["mask"])
        box[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
        q = view["image"][view["mask"] & box] // 64
        h = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64)
        return h / h.sum()

    pose = PoseSampler(seed=3).sample(1)[0][0]
    shape = np.full(body.shape_dim, 0.5, np.float32)
    renderer = _renderer(body, 128)
    app = renderer.appearance
    regions = {"head": app.head.idx, "torso": app.trunk.idx}
    dist = {(kind, name): [] for kind in ("new", "parts") for name in regions}
    parts = np.concatenate([app.parts, np.zeros(app.n_eyes, np.int64)])  # eyes: the head's colour
    try:
        for seed in range(6):
            colors = app.colors(np.random.default_rng(seed))
            per_part = colors.copy()
            for p in np.unique(app.parts):
                per_part[parts == p] = np.median(colors[:app.n_body][app.parts == p], 0)
            for kind, c in (("new", colors), ("parts", per_part)):
                front, back = renderer.views(pose, shape, (0.0, 180.0), colors=c)
                for name, idx in regions.items():
                    dist[kind, name].append(np.abs(histogram(front, idx) - histogram(back, idx)).sum() / 2)
    finally:
        renderer.close()
    mean = {k: float(np.mean(v)) for k, v in dist.items()}
    assert mean["new", "head"] > 2.0 * mean["parts", "head"], mean
    assert mean["new", "torso"] > 1.4 * mean["parts", "torso"], mean


def test_appearance_leaves_the_labels_alone(tiny_cfg, body):
    """The drawn mesh adds the eyeballs; the labels stay the body surface: the renderer's canonical
    meshes are exactly the training targets, each rendered sample validates, its 2D joints are the
    projection of the targets' joints."""
    from vqhps.data.sample import validate_sample
    from vqhps.data.synthetic import shard_parameters

    spec = make_spec(tiny_cfg, "test", body.identifier())
    crop = tiny_cfg.data.crop_size
    renderer = _renderer(body, crop)
    try:
        params = shard_parameters(spec, 0)[1]
        canonical, eyes = renderer.pose_meshes(params["pose"], params["shape"])
        a = renderer.render_shard(spec, 0)
    finally:
        renderer.close()
    target = canonical_targets(body, torch.as_tensor(a["pose"]), torch.as_tensor(a["shape"])).numpy()
    np.testing.assert_array_equal(canonical, target)
    assert eyes.shape == (len(target), body.eye_index.numel(), 3)
    head = target[:, renderer.appearance.head.idx].mean(1)
    assert np.linalg.norm(eyes.mean(1) - head, axis=-1).max() < 0.12  # the eyeballs moved with the head
    for i in range(len(target)):
        verts_cam = (target[i] @ a["root_rot"][i].T + a["trans"][i]).astype(np.float32)
        validate_sample({"image": a["image"][i], "joints2d_24": a["joints2d_24"][i], "joints2d_17": a["joints2d_17"][i],
                         "root_rot": a["root_rot"][i], "canonical": target[i], "verts_cam": verts_cam,
                         "K": a["K"][i], "bbox": a["bbox"][i], "valid": a["valid"][i]})
        j24 = body.regressor24.numpy() @ verts_cam.astype(np.float64)
        proj = apply_affine(project_points(j24, a["K"][i].astype(np.float64)), crop_affine(a["bbox"][i], crop))
        assert np.abs(proj - a["joints2d_24"][i]).max() < 0.5
