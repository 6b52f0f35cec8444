"""The image demo: reading user images, cropping, error messages, a folder run, the CLI, and that the
demo's prediction equals the evaluation pipeline's for the same crop."""
from __future__ import annotations

import json

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
    assert overlay.shape == (predictor.crop_size, predictor.crop_size, 3)
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
    assert "skipped" in capsys.readouterr().out
    assert (tmp_path / "o" / "p_overlay.png").is_file()


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
    assert overlay.shape == (predictor.crop_size, predictor.crop_size, 3)
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
