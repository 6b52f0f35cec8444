"""The image demo: reading user images, cropping, error messages, inputs (files, folders, globs), a
folder run, the overlay on the whole photo and its camera, the side view, the JSON record, file
modes, the CLI, and that the demo's prediction equals the evaluation pipeline's for the same crop."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vqhps import demo

#: one intra-op thread for this module only (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, smoke_artifacts):
    """A small, untrained VQ-HPS checkpoint matching the smoke body and fine-tuned Mesh-VQ-VAE."""
    from vqhps.body_setup import setup_body
    from vqhps.checkpoint import save_checkpoint
    from vqhps.hps_training import build_vqhps, vqhps_config, vqhps_meta
    from vqhps.vqvae_training import load_mesh_vqvae

    cfg = smoke_artifacts
    body = setup_body(cfg)
    vqvae = load_mesh_vqvae(cfg, body, "finetune")
    hcfg = vqhps_config(cfg, d_model=32, n_heads=2, enc_layers=1, dec_layers=1, mlp_hidden=32, rot_hidden=32)
    torch.manual_seed(0)
    model = build_vqhps(hcfg, body, vqvae)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_vqhps.pt"
    save_checkpoint(path, {"model": model.state_dict(), "meta": vqhps_meta(hcfg, body, vqvae, "finetune")})
    return path


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint, smoke_artifacts):
    return demo.load_predictor(tiny_checkpoint, smoke_artifacts)


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.fixture()
def rgb_image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)


@pytest.fixture()
def normal_umask():
    """The usual umask 022 for one test (files the user writes: 0644)."""
    before = os.umask(0o022)
    yield
    os.umask(before)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A photograph the project did not render, larger than the crop and not square: scikit-image's
    astronaut (512 x 512) resized to 640 x 480 and saved as a JPEG."""
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    Image.fromarray(data.astronaut()).resize((640, 480), Image.Resampling.BILINEAR).save(path, quality=92)
    return path


def _modes(folder):
    return {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}


def test_non_image_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt: not a readable image"):
        demo.read_image(path)


def test_truncated_jpeg_is_refused(tmp_path, rgb_image):
    good = _save(tmp_path / "good.jpg", rgb_image)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    assert demo.read_image(good).shape == (40, 30, 3)
    with pytest.raises(ValueError, match="bad.jpg: not a readable image"):
        demo.read_image(bad)


def test_grayscale_and_rgba_become_rgb(tmp_path, rgb_image):
    gray = _save(tmp_path / "gray.png", rgb_image[..., 0])
    rgba = _save(tmp_path / "rgba.png", np.dstack([rgb_image, np.full((40, 30), 128, np.uint8)]))
    g, a = demo.read_image(gray), demo.read_image(rgba)
    assert g.shape == a.shape == (40, 30, 3) and g.dtype == a.dtype == np.uint8
    assert np.array_equal(g[..., 0], rgb_image[..., 0]) and np.array_equal(g[..., 1], g[..., 2])
    assert np.array_equal(a, rgb_image)  # alpha dropped, colours kept


def test_tiny_image_is_refused(tmp_path):
    path = _save(tmp_path / "tiny.png", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"10x10 pixels, smaller than the minimum of 16"):
        demo.read_image(path)


def test_huge_image_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "MAX_PIXELS", 1000)
    path = _save(tmp_path / "big.png", np.zeros((40, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="over the limit"):
        demo.read_image(path)


def test_crop_boxes(rgb_image):
    with pytest.raises(ValueError, match=r"bbox 100 100 150 150 lies entirely outside the 30x40 image"):
        demo.crop(rgb_image, (100, 100, 150, 150), 16)
    # whole image: a square around the centre, the short side padded black
    patch, box = demo.crop(rgb_image, None, 40)
    assert np.allclose(box, [-5.5, -0.5, 34.5, 39.5])
    assert patch.shape == (40, 40, 3) and (patch[:, :4] == 0).all() and (patch[:, -4:] == 0).all()
    assert np.array_equal(patch[:, 5:35], rgb_image)
    # a box partly outside is padded; a non-square box is made square around its centre
    patch, box = demo.crop(rgb_image, (20, -10.5, 39, 9.5), 20)
    assert np.allclose(box, [19.5, -10.5, 39.5, 9.5]) and (patch[:10] == 0).all() and (patch[:, 10:] == 0).all()


def test_overlay_camera_matches_weak_perspective():
    cam, size = np.array([0.8, 0.1, -0.2]), 64
    K, t = demo.overlay_camera(cam, size)
    X = np.array([[0.3, -0.5, 0.0], [-0.2, 0.4, 0.0]])
    p = (X + t) @ K.T
    pixels = p[:, :2] / p[:, 2:]
    unit = cam[0] * X[:, :2] + cam[1:]
    assert np.allclose(pixels, (unit + 1) * size / 2 - 0.5)


def test_image_camera_puts_crop_points_at_hand_computed_pixels():
    """A box of side 200 at (100, 50) resized to a 64-pixel crop, camera [0.8, 0.1, -0.2]: the point
    X = (0.5, 0.25, 0) is at crop units s * X + t = (0.5, 0.0), i.e. crop pixel ((0.5 + 1) * 32 - 0.5,
    (0 + 1) * 32 - 0.5) = (47.5, 31.5), i.e. full-image pixel 100 + 48 * 200 / 64 = 250 and
    50 + 32 * 200 / 64 = 150 (the box centre (200, 150) plus units * 200 / 2). -X is at units
    (-0.3, -0.4): pixel (200 - 30, 150 - 40) = (170, 110)."""
    from vqhps.data.sample import project_points

    cam, bbox, size = np.array([0.8, 0.1, -0.2]), (100.0, 50.0, 300.0, 250.0), 64
    K, t = demo.image_camera(cam, bbox, size)
    assert np.allclose(K, [[1600.0, 0, 200.0], [0, 1600.0, 150.0], [0, 0, 1]])  # f = z * s * L / 2, box centre
    X = np.array([[0.5, 0.25, 0.0], [-0.5, -0.25, 0.0]])
    assert np.allclose(project_points(X + t, K), [[250.0, 150.0], [170.0, 110.0]])
    # in the crop: (47.5, 31.5) and ((-0.3 + 1) * 32 - 0.5, (-0.4 + 1) * 32 - 0.5); 100 + 22.4 * 200 / 64 = 170
    K_crop, _ = demo.overlay_camera(cam, size)
    assert np.allclose(project_points(X + t, K_crop), [[47.5, 31.5], [21.9, 18.7]])
    # for the whole-image box of a square image of the crop's size the two cameras coincide
    assert np.allclose(demo.image_camera(cam, demo.whole_image_box(size, size), size)[0], K_crop)


def test_overlay_draws_at_those_pixels_on_the_whole_image():
    """Two small spheres at X and -X (vertex mean 0) rendered through the photo overlay land at the
    hand-computed pixels of the test above, in an image larger than the box and not square."""
    import trimesh

    sphere = trimesh.creation.icosphere(3, radius=0.05)
    n = len(sphere.vertices)
    centres = np.array([[0.5, 0.25, 0.0], [-0.5, -0.25, 0.0]])
    pred = {"cam": np.array([0.8, 0.1, -0.2]), "bbox": np.array([100.0, 50.0, 300.0, 250.0]),
            "crop": np.zeros((64, 64, 3), np.uint8),
            "vertices": np.concatenate([sphere.vertices + c for c in centres])}
    faces = np.concatenate([sphere.faces, sphere.faces + n])
    image = np.zeros((300, 400, 3), np.uint8)
    overlay = demo.render_on_image(pred, image, faces)
    assert overlay.shape == image.shape and not image.any()  # drawn on a copy
    ys, xs = np.nonzero(overlay.max(-1) > 0)
    for expected, side in (((250.0, 150.0), xs > 210), ((170.0, 110.0), xs < 210)):
        assert abs(xs[side].mean() - expected[0]) < 0.5 and abs(ys[side].mean() - expected[1]) < 0.5
        assert xs[side].max() - xs[side].min() < 12  # radius 0.05 m * f 1600 / depth 20 = 4 px
    # a mesh off the image leaves it unchanged
    pred["cam"] = np.array([0.8, 5.0, 0.0])
    assert np.array_equal(demo.render_on_image(pred, image, faces), image)


def test_expand_inputs_files_folders_and_globs(tmp_path, rgb_image):
    for name in ("a.jpg", "b.png", "photos/x.jpg", "photos/y.jpg", "photos/z.png", "folder/c.png", "folder/D.JPG",
                 "folder/.hidden.png", "folder/sub/e.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _save(tmp_path / name, rgb_image)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    t = str(tmp_path)
    got = demo.expand_inputs([f"{t}/a.jpg", f"{t}/b.png", f"{t}/photos/*.jpg", f"{t}/folder/", f"{t}/a.jpg",
                              f"{t}/photos/x.jpg", f"{t}/photos/*"])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "a.jpg", "b.png", "photos/x.jpg", "photos/y.jpg", "folder/D.JPG", "folder/c.png", "photos/z.png"]
    with pytest.raises(ValueError) as err:
        demo.expand_inputs([f"{t}/a.jpg", f"{t}/missing.jpg", f"{t}/photos/*.gif", f"{t}/empty"])
    message = str(err.value)
    assert f"{t}/missing.jpg: no such file or folder" in message
    assert f"{t}/photos/*.gif: the pattern matches no image file" in message
    assert f"{t}/empty: a folder without image files" in message and "a.jpg" not in message.replace("missing.jpg", "")


def test_unique_stems():
    used: set[str] = set()
    stems = [demo.unique_stem(demo.Path(p), used) for p in ("a/x.jpg", "b/x.jpg", "c/x.jpg", "x.png", "y.jpg")]
    assert stems == ["x", "x_jpg", "x_jpg_2", "x_png", "y"]


def test_checkpoint_record_reads_step_epoch_and_backbone(tmp_path, smoke_cfg):
    from vqhps.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "run.pt", {"model": {}, "step": 30, "meta": {
        "steps_per_epoch": 12, "backbone": "resnet50", "backbone_weights": None}})
    assert demo.checkpoint_record(path, smoke_cfg) == {
        "checkpoint": {"path": str(path.resolve()), "step": 30, "epoch": 2.5},
        "backbone": {"name": "resnet50", "weights": "scratch"}}
    bare = save_checkpoint(tmp_path / "bare.pt", {"model": {}, "meta": {}})
    record = demo.checkpoint_record(bare, smoke_cfg)
    assert record["checkpoint"]["step"] is None and record["checkpoint"]["epoch"] is None
    assert record["backbone"]["name"] == smoke_cfg.vqhps.backbone


def test_photo_gives_full_size_overlay_side_view_record_and_0644(tmp_path, predictor, photo, tiny_checkpoint,
                                                                 normal_umask):
    """A 640 x 480 JPEG the project did not render, larger than the 64-pixel crop: the overlay has the
    photo's size and differs from it only around the projected mesh; a side view; the JSON says what
    made it; every file is 0644."""
    import platform

    import trimesh

    out = tmp_path / "out"
    report = demo.run_demo([photo], predictor, out, progress=False)
    assert {p.name for p in report["ok"][0][1]} == {
        "astronaut.obj", "astronaut.glb", "astronaut_overlay.png", "astronaut_side.png", "astronaut.json"}
    assert set(_modes(out).values()) == {"0o644"}, _modes(out)
    with Image.open(out / "astronaut_overlay.png") as img:
        assert img.size == (640, 480)
    with Image.open(out / "astronaut_side.png") as img:
        side = np.asarray(img.convert("RGB"))
    assert side.shape == (demo.SIDE_VIEW_SIZE, demo.SIDE_VIEW_SIZE, 3)
    assert (side[0, 0] == 255).all() and (side != 255).any()  # a body on a white background

    record = json.loads((out / "astronaut.json").read_text())
    assert record["image_size"] == [640, 480] and record["bbox_source"] == "whole_image"
    assert record["bbox"] == [-0.5, -80.5, 639.5, 559.5]  # 640-pixel square around the centre
    assert record["model"]["checkpoint"] == {"path": str(tiny_checkpoint.resolve()), "step": None, "epoch": None}
    assert record["model"]["backbone"] == {"name": predictor.cfg.vqhps.backbone, "weights": "imagenet"}
    v = record["versions"]
    assert v["torch"] == torch.__version__ and v["python"] == platform.python_version()
    assert v["vqhps_commit"] is None or len(v["vqhps_commit"]) == 40

    # the recorded camera puts the mesh where the weak-perspective camera does, in photo pixels: the box
    # centre plus crop units * side / 2, scaled by z / (z + X_z) off the depth z = OVERLAY_DEPTH
    from vqhps.data.sample import project_points

    X = trimesh.load(out / "astronaut.obj", process=False).vertices
    X = X - X.mean(0)
    cam, K = record["camera"]["weak_perspective"], np.array(record["camera"]["overlay_K"])
    pixels = project_points(X + record["camera"]["overlay_translation"], K)
    units = cam[0] * X[:, :2] + cam[1:]
    z = demo.OVERLAY_DEPTH
    assert np.allclose(pixels, np.array([319.5, 239.5]) + units * 640 / 2 * (z / (z + X[:, 2:])), atol=1e-3)
    # the photo changes only inside the mesh's projected outline (a 3-pixel border for blending)
    changed = np.abs(demo.read_image(out / "astronaut_overlay.png").astype(int) - demo.read_image(photo)).max(-1) > 2
    ys, xs = np.nonzero(changed)
    assert len(xs) > 0
    assert xs.min() >= pixels[:, 0].min() - 3 and xs.max() <= pixels[:, 0].max() + 3
    assert ys.min() >= pixels[:, 1].min() - 3 and ys.max() <= pixels[:, 1].max() + 3


def test_missing_checkpoint_names_path_and_command(tmp_path, smoke_cfg):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*python -m vqhps train --profile smoke"):
        demo.load_predictor(missing, smoke_cfg)


def test_mismatched_checkpoint_is_refused(tmp_path, tiny_checkpoint, smoke_artifacts):
    from vqhps.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint

    payload = load_checkpoint(tiny_checkpoint)
    payload["meta"]["vqvae_fingerprint"] = "0" * 16
    other = save_checkpoint(tmp_path / "other.pt", payload)
    with pytest.raises(CheckpointMismatch, match="vqvae_fingerprint"):
        demo.load_predictor(other, smoke_artifacts)


def test_folder_run_skips_bad_files(tmp_path, predictor, rgb_image):
    folder = tmp_path / "in"
    folder.mkdir()
    _save(folder / "a.png", rgb_image)
    _save(folder / "b.jpg", rgb_image[..., 0])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    report = demo.run_demo([folder], predictor, tmp_path / "out", progress=False)
    assert [p.name for p, _ in report["failed"]] == ["broken.jpg"]
    assert "not a readable image" in report["failed"][0][1]
    assert sorted(p.name for p, _ in report["ok"]) == ["a.png", "b.jpg"]
    for stem in ("a", "b"):
        for name in (f"{stem}.obj", f"{stem}.glb", f"{stem}_overlay.png", f"{stem}.json"):
            assert (tmp_path / "out" / name).stat().st_size > 0
        record = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert len(record["token_ids"]) == predictor.vqvae.n_tokens
        assert np.allclose(np.array(record["rotation"]) @ np.array(record["rotation"]).T, np.eye(3), atol=1e-5)
    overlay = np.asarray(Image.open(tmp_path / "out" / "a_overlay.png"))
    assert overlay.shape == rgb_image.shape  # the whole image at its own size, not the crop
    assert not list((tmp_path / "out").glob(".*tmp"))  # nothing half-written left behind
    # the gray image's outputs have the same shapes as the colour one's
    import trimesh

    a, b = (trimesh.load(tmp_path / "out" / f"{s}.obj", process=False) for s in "ab")
    assert a.vertices.shape == b.vertices.shape == (predictor.body.n_vertices, 3)


def test_demo_matches_evaluation_prediction(predictor, smoke_artifacts):
    """A benchmark test crop fed to the demo as an image (its box = the whole crop, an identity
    crop) gives the same mesh as hps_training's evaluation path, in the crop's camera (the demo knows
    no intrinsics; evaluation turns it into the full frame's camera and keeps it as vertices_crop)."""
    from vqhps.data import synthetic
    from vqhps.hps_training import predict_split, vqhps_predictor

    cfg = smoke_artifacts
    arrays = {k: v[:2] for k, v in synthetic.load_split(cfg, "test").items()}
    expected = predict_split(vqhps_predictor(predictor.vqvae, predictor.body)(predictor.model), arrays,
                             predictor.body, cfg, torch.device("cpu"), progress=False)
    S = arrays["image"].shape[1]
    for i in range(2):
        got = predictor.predict(arrays["image"][i], bbox=(-0.5, -0.5, S - 0.5, S - 0.5))
        assert np.array_equal(got["crop"], arrays["image"][i])
        assert np.allclose(got["vertices"], expected["vertices_crop"][i].numpy(), atol=1e-5)
        assert np.array_equal(got["token_ids"], expected["ids"][i].numpy())


def test_cli(tmp_path, tiny_checkpoint, rgb_image, capsys):
    from vqhps.cli import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert main(["demo", str(bad), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "bad.png: not a readable image" in capsys.readouterr().err
    assert main(["demo", str(bad), "--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "x.pt" in capsys.readouterr().err
    folder = tmp_path / "in"
    folder.mkdir()
    _save(folder / "p.png", rgb_image)
    (folder / "q.png").write_bytes(b"nope")
    assert main(["demo", str(folder), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"),
                 "--bbox", "0", "0", "29", "39"]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "whole image" not in printed
    assert (tmp_path / "o" / "p_overlay.png").is_file()
    assert json.loads((tmp_path / "o" / "p.json").read_text())["bbox_source"] == "given"


def test_cli_several_paths_and_globs(tmp_path, tiny_checkpoint, rgb_image, normal_umask, capsys):
    """Files, a quoted glob and a folder in one call, with repeats: each image once, names kept apart,
    the whole-image crop said and recorded, every file 0644."""
    from vqhps.cli import main

    for name in ("a.jpg", "b.png", "photos/p1.jpg", "photos/p2.jpg", "folder/a.png", "folder/f.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _save(tmp_path / name, rgb_image)
    t, out = str(tmp_path), tmp_path / "o"
    assert main(["demo", f"{t}/a.jpg", f"{t}/b.png", f"{t}/photos/*.jpg", f"{t}/folder", f"{t}/photos/p1.jpg",
                 "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no --bbox: using the whole image" in printed and "6 image(s) done, 0 skipped" in printed
    stems = ("a", "b", "p1", "p2", "a_png", "f")
    assert {p.name for p in out.iterdir()} == {f"{s}{e}" for s in stems
                                             for e in (".obj", ".glb", ".json", "_overlay.png", "_side.png")}
    assert set(_modes(out).values()) == {"0o644"}
    records = {s: json.loads((out / f"{s}.json").read_text()) for s in stems}
    assert records["a_png"]["image"] == f"{t}/folder/a.png"
    assert {r["bbox_source"] for r in records.values()} == {"whole_image"}


def test_cli_input_matching_nothing_fails_and_writes_nothing(tmp_path, tiny_checkpoint, rgb_image, capsys):
    from vqhps.cli import main

    good = _save(tmp_path / "good.png", rgb_image)
    out = tmp_path / "o"
    assert main(["demo", str(good), str(tmp_path / "missing.jpg"), str(tmp_path / "nope" / "*.jpg"),
                 "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing.jpg: no such file or folder" in err and "*.jpg: the pattern matches no image file" in err
    assert not out.exists()


def test_samples_add_the_token_spread(tmp_path, predictor, rgb_image, monkeypatch):
    path = _save(tmp_path / "s.png", rgb_image)
    plain = predictor.predict(rgb_image)
    assert "vertex_spread" not in plain
    report = demo.run_demo([path], predictor, tmp_path / "out", progress=False, samples=3)
    assert {"s_spread.png", "s_spread.glb", "s.json"} <= {p.name for p in report["ok"][0][1]}
    u = json.loads((tmp_path / "out" / "s.json").read_text())["uncertainty"]
    spread = np.array(u["vertex_spread_mm"])
    assert u["samples"] == 3 and spread.shape == (predictor.body.n_vertices,) and (spread >= 0).all()
    assert u["spread_mm"] == pytest.approx(spread.mean(), abs=1e-3)
    overlay = np.asarray(Image.open(tmp_path / "out" / "s_spread.png"))
    assert overlay.shape == rgb_image.shape
    # seeded: the same image draws the same samples; the argmax prediction does not depend on them
    again = predictor.predict(rgb_image, samples=3)
    assert np.allclose(again["vertex_spread"], spread, atol=1e-3)
    assert np.array_equal(again["token_ids"], plain["token_ids"]) and np.array_equal(again["vertices"], plain["vertices"])
    # at temperature 0 every sample is the argmax: no spread
    monkeypatch.setattr(predictor.cfg.uncertainty, "temperature", 0.0)
    assert (predictor.predict(rgb_image, samples=3)["vertex_spread"] == 0).all()


def test_cli_samples(tmp_path, tiny_checkpoint, rgb_image, capsys):
    from vqhps.cli import main

    image = _save(tmp_path / "p.png", rgb_image)
    args = ["demo", str(image), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")]
    assert main([*args, "--samples", "-1"]) == 2
    assert "--samples" in capsys.readouterr().err
    assert main([*args, "--samples", "2", "--set", "uncertainty.top_k=5"]) == 0
    record = json.loads((tmp_path / "o" / "p.json").read_text())
    assert record["uncertainty"]["samples"] == 2 and record["uncertainty"]["top_k"] == 5
    assert (tmp_path / "o" / "p_spread.png").is_file()


def test_demo_example_figure(tmp_path, predictor, smoke_artifacts):
    from vqhps.data import synthetic

    arrays = {k: v[:3] for k, v in synthetic.load_split(smoke_artifacts, "test").items()}
    path = demo.demo_example(predictor, arrays, 2, samples=2, results_dir=tmp_path)
    assert path == tmp_path / "figures" / "demo_example.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 2 * img.size[1]  # three panels side by side
    # the input is the benchmark crop itself, and the demo's outputs sit next to it
    assert np.array_equal(demo.read_image(tmp_path / "demo_example" / "test_00002.png"), arrays["image"][2])
    assert (tmp_path / "demo_example" / "test_00002_overlay.png").is_file()


def test_evaluate_cli_writes_the_evaluation_codes_metrics(tiny_checkpoint, predictor, smoke_artifacts, capsys):
    """`python -m vqhps evaluate --name N` reports what evaluate_split computes for checkpoint N, and
    names the training command when the checkpoint is missing."""
    import shutil

    import pandas as pd

    from vqhps.cli import main
    from vqhps.data import synthetic
    from vqhps.hps_training import evaluate_split, vqhps_checkpoint, vqhps_predictor

    cfg = smoke_artifacts
    assert main(["evaluate", "--profile", "smoke", "--name", "no_such_run"]) == 2
    assert "train --profile smoke --name no_such_run" in capsys.readouterr().err
    path = vqhps_checkpoint(cfg, "tiny_eval")
    table = cfg.results_dir / "tables" / "eval_tiny_eval_val_fp32.csv"
    shutil.copy(tiny_checkpoint, path)
    try:
        assert main(["evaluate", "--profile", "smoke", "--name", "tiny_eval", "--split", "val",
                     "--set", "runtime.progress=false"]) == 0
        written = pd.read_csv(table, index_col=0)
    finally:
        path.unlink()
        for suffix in (".csv", ".md"):
            table.with_suffix(suffix).unlink(missing_ok=True)
    _, expected = evaluate_split(vqhps_predictor(predictor.vqvae, predictor.body)(predictor.model),
                                 synthetic.load_split(cfg, "val"), predictor.body, cfg, predictor.device, progress=False)
    for column in ("PVE", "MPJPE", "PA-MPJPE"):
        assert written.loc["full", column] == pytest.approx(expected.loc["full", column], rel=1e-5)
    assert set(written["precision"]) == {"fp32"} and set(written["checkpoint"]) == {"tiny_eval.pt"}
