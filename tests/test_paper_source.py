"""The paper source (``data.source=paper``) on stand-in files in the real formats (``fixtures_smpl``):
an SMPL model, two AMASS sequences, a 3DPW sequence per split with JPEG frames and an H36M regressor.

Checked: the body follows the source; the H36M regressor is required; the 3DPW crops' labels are
exact, augmented or not (the camera-frame mesh is the canonical mesh rotated by ``root_rot`` and
moved by ``trans``, the 2D joints its joints' projection); crops are rebuilt when an input or a
setting changes; the AMASS table; SMPL's vertex parts; and every notebook, 00 to 06, end to end."""
from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fixtures_smpl as fx  # noqa: E402

from vqhps.config import STUDY_OVERRIDES_ENV, environment, load_config  # noqa: E402

#: every notebook at a size a 2-core CPU runs in about a minute (pytest --durations shows it): tiny networks, 32-px crops, a few
#: steps; the notebooks themselves run unchanged
SMOKE_PAPER_SET = ("data.source=paper data.crop_size=32 data.amass_stride=4 data.pw3d_stride=1 vqvae.pretrain_steps=4 "
                   "vqvae.finetune_steps=4 vqvae.batch_size=4 vqvae.channels=4,8,16 vqvae.readout_hidden=0 "
                   "vqhps.batch_size=16 vqhps.epochs=1 vqhps.lr_step_epochs=1 vqhps.d_model=32 vqhps.n_heads=2 "
                   "vqhps.mlp_hidden=64 vqhps.rot_hidden=64 baselines.epochs=1 uncertainty.samples=2 "
                   "vqhps.backbone_weights=none runtime.progress=false")
PX_TOL = 0.5
MESH_TOL_M = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def paper_root(tmp_path_factory):
    """Stand-in paper files and a throw-away data / results / cache folder, named by the environment
    (as a user's shell would) for the whole module."""
    root = tmp_path_factory.mktemp("paper")
    dirs = fx.write_paper_files(root)
    env = {"VQHPS_SMPL_DIR": str(dirs["smpl"]), "VQHPS_AMASS_DIR": str(dirs["amass"]),
           "VQHPS_3DPW_DIR": str(dirs["3dpw"]), "VQHPS_DATA_DIR": str(root / "data"),
           "VQHPS_RESULTS_DIR": str(root / "results"), "VQHPS_CACHE_DIR": str(root / "cache"),
           STUDY_OVERRIDES_ENV: SMOKE_PAPER_SET}
    with environment(env):
        yield root


@pytest.fixture(scope="module")
def cfg(paper_root):
    return load_config("smoke")


@pytest.fixture(scope="module")
def smpl(cfg):
    from vqhps.body import load_body

    return load_body(cfg)


@pytest.fixture(scope="module")
def crops(cfg, smpl):
    """The three cropped splits, made by a pool of two workers (the path a GPU machine takes)."""
    from vqhps.data import pw3d_crops

    pw3d_crops.build_splits(cfg, workers=2, progress=False)
    return {s: pw3d_crops.load_split(cfg, s) for s in ("train", "val", "test")}


# ------------------------------------------------------------------------------------------- config
def test_the_body_follows_the_source(paper_root):
    cfg = load_config("smoke")
    assert (cfg.data.source, cfg.body.model, cfg.run_name) == ("paper", "smpl", "smoke_paper")
    with environment({STUDY_OVERRIDES_ENV: ""}):
        assert load_config("smoke").body.model == "anny"
        with pytest.raises(ValueError, match="body.model=anny contradicts data.source=paper"):
            load_config("smoke", **{"data.source": "paper", "body.model": "anny"})


def test_paper_source_needs_the_h36m_regressor(paper_root, tmp_path):
    from vqhps.body import load_body

    bare = tmp_path / "smpl"
    bare.mkdir()
    (bare / "SMPL_NEUTRAL.pkl").write_bytes((paper_root / "smpl" / "SMPL_NEUTRAL.pkl").read_bytes())
    cfg = load_config("smoke", **{"paths.smpl_dir": bare})
    with pytest.raises(FileNotFoundError, match="J_regressor_h36m.npy"):
        load_body(cfg)
    synthetic_smpl = load_config("smoke", **{"paths.smpl_dir": bare, "data.source": "synthetic"})
    synthetic_smpl.body.model = "smpl"  # outside the paper's protocol the fallback regressor stays allowed
    assert load_body(synthetic_smpl).regressor17_source == "fallback"


# ------------------------------------------------------------------------------------------- labels
def _sequence(cfg, split: str):
    from vqhps.data import pw3d_crops

    (path,) = pw3d_crops.sequence_files(cfg, split)
    with path.open("rb") as fh:
        return pickle.load(fh, encoding="latin1")


def _camera_mesh_from_3dpw(raw: dict, person: int, t: int, body) -> np.ndarray:
    """3DPW's camera-frame mesh straight from the pickle: R_c (SMPL(pose, betas) + trans) + t_c."""
    pose = torch.tensor(raw["poses"][person][t], dtype=torch.float32)[None]
    betas = torch.tensor(raw["betas"][person][:10], dtype=torch.float32)[None]
    world = body(pose, betas).vertices[0].double().numpy() + raw["trans"][person][t]
    ext = raw["cam_poses"][t]
    return world @ ext[:3, :3].T + ext[:3, 3]


def _projected_joints(verts: torch.Tensor, bbox: torch.Tensor, K: torch.Tensor, regressor: torch.Tensor,
                      size: int) -> torch.Tensor:
    """Crop pixels of the regressor joints of camera-frame meshes (B, V, 3), through K and the box."""
    from vqhps.data.datasets import crop_intrinsics

    joints = torch.einsum("jv,bvc->bjc", regressor.double(), verts.double())
    uvw = joints @ crop_intrinsics(bbox, K, size).double().transpose(1, 2)
    return uvw[..., :2] / uvw[..., 2:]


def test_stored_labels_are_exact(cfg, smpl, crops):
    """Every stored crop of every split: the canonical mesh (posed from the stored pose and shape, as
    training does) rotated by root_rot and moved by trans is 3DPW's own camera-frame mesh within
    1e-5 m, and the stored 2D joints are its joints' projection within 0.5 px."""
    from vqhps.data.datasets import canonical_targets

    for split, arrays in crops.items():
        raw = _sequence(cfg, split)
        assert len(arrays["image"]) == 2 * len(raw["img_frame_ids"])  # every frame, both people
        np.testing.assert_array_equal(arrays["valid"], [bool(raw["campose_valid"][p][f // 2])
                                                        for f, p in zip(arrays["frame"], arrays["person"])])
        canonical = canonical_targets(smpl, torch.as_tensor(arrays["pose"]), torch.as_tensor(arrays["shape"]))
        verts = canonical.double() @ torch.as_tensor(arrays["root_rot"]).double().transpose(1, 2) \
            + torch.as_tensor(arrays["trans"]).double()[:, None]
        for i, (frame, person) in enumerate(zip(arrays["frame"], arrays["person"])):
            expected = _camera_mesh_from_3dpw(raw, int(person), int(frame) // 2, smpl)
            assert np.abs(verts[i].numpy() - expected).max() < MESH_TOL_M, (split, i)
        bbox, K = torch.as_tensor(arrays["bbox"]), torch.as_tensor(arrays["K"])
        size = arrays["image"].shape[1]
        for n, reg in ((24, smpl.regressor24), (17, smpl.regressor17)):
            err = (_projected_joints(verts, bbox, K, reg, size) - torch.as_tensor(arrays[f"joints2d_{n}"])).abs()
            assert err.max() < PX_TOL, (split, n, float(err.max()))
        assert arrays["image"].dtype == np.uint8 and arrays["image"].shape[1:] == (cfg.data.crop_size,) * 2 + (3,)


def test_augmented_labels_are_exact(smpl, crops):
    """After flips, +-60 deg rolls and +-25% scales (``prepare_batch``, the training path): the 2D joints
    are the projection of (augmented canonical @ root_rot.T + trans) through K and the augmented box,
    and that mesh is the original camera-frame mesh mirrored (flips) and rolled about the crop's ray."""
    from vqhps.data.datasets import MIRROR_X, Augmentation, BenchmarkDataset, prepare_batch, unit_to_pixels
    from vqhps.geometry import crop_camera_rotation

    arrays = crops["train"]
    raw = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in BenchmarkDataset.KEYS
           if k in arrays and k != "subject"}
    plain = prepare_batch(raw, smpl, CPU)
    aug = prepare_batch(raw, smpl, CPU, aug=Augmentation(flip_prob=0.5, rot_prob=1.0, rot_deg=60.0, scale=0.25,
                                                         blur_prob=0.0, color_jitter=0.0),
                        generator=torch.Generator().manual_seed(0), flip_index24=smpl.joint_flip24,
                        flip_index17=smpl.joint_flip17)
    assert aug["flipped"].any() and not aug["flipped"].all()
    size = arrays["image"].shape[1]
    verts = {name: b["canonical"].double() @ b["root_rot"].double().transpose(1, 2) + b["trans"].double()[:, None]
             for name, b in (("plain", plain), ("aug", aug))}
    for n, reg in ((24, smpl.regressor24), (17, smpl.regressor17)):
        key = "joints2d" if n == 24 else "joints2d_17"
        for name, b in (("plain", plain), ("aug", aug)):
            err = (_projected_joints(verts[name], b["bbox"], b["K"], reg, size) - unit_to_pixels(b[key], size)).abs()
            assert err.max() < PX_TOL, (name, n, float(err.max()))
    # the augmented camera-frame mesh is the original one mirrored (vertices relabelled), then turned by
    # a roll Q about the augmented crop's ray: Rc^T Q Rc is a rotation about z
    m = MIRROR_X.double()
    mirrored = torch.where(aug["flipped"].view(-1, 1, 1), (verts["plain"][:, smpl.vertex_flip] @ m), verts["plain"])
    flip_rot = torch.where(aug["flipped"].view(-1, 1, 1), m @ plain["root_rot"].double() @ m, plain["root_rot"].double())
    q = aug["root_rot"].double() @ flip_rot.transpose(1, 2)
    rc = crop_camera_rotation(aug["bbox"], aug["K"]).double()
    roll = rc.transpose(1, 2) @ q @ rc
    torch.testing.assert_close(roll[:, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(len(q), 3),
                               atol=1e-5, rtol=0)
    assert (roll[:, 0, 0] < 1 - 1e-3).any()  # the rolls are not all the identity
    assert (verts["aug"] - mirrored @ q.transpose(1, 2)).abs().max() < MESH_TOL_M


def test_crops_are_rebuilt_when_an_input_or_setting_changes(cfg, smpl, crops, tmp_path):
    from vqhps.data import pw3d_crops
    from vqhps.data.synthetic import CorruptShardError, shard_path

    root = pw3d_crops.crops_root(cfg)
    shard = shard_path(root, "val", 0)
    shard.write_bytes(b"broken")
    with pytest.raises(CorruptShardError, match="missing or corrupt"):
        pw3d_crops.load_split(cfg, "val")
    before = {s: shard_path(root, s, 0).stat().st_mtime_ns for s in ("train", "test")}
    pw3d_crops.build_splits(cfg, ("train", "val", "test"), workers=0, progress=False)
    assert {s: shard_path(root, s, 0).stat().st_mtime_ns for s in ("train", "test")} == before  # kept
    np.testing.assert_array_equal(pw3d_crops.load_split(cfg, "val")["image"], crops["val"]["image"])

    bigger = load_config("smoke", **{"data.crop_size": 40})
    with pytest.raises(CorruptShardError, match="no manifest matches"):
        pw3d_crops.load_split(bigger, "val")
    (path,) = pw3d_crops.sequence_files(cfg, "val")
    fx.rewrite_pickle(path, path, campose_valid=[np.zeros(3, np.int64), np.ones(3, np.int64)])
    with pytest.raises(CorruptShardError, match="no manifest matches"):
        pw3d_crops.load_split(cfg, "val")
    pw3d_crops.build_splits(cfg, ("val",), workers=0, progress=False)
    np.testing.assert_array_equal(pw3d_crops.load_split(cfg, "val")["valid"], np.tile([False, True], 3))


# ------------------------------------------------------------------------------------------- AMASS, parts
def test_amass_table_and_pretraining_stream(cfg, smpl):
    from vqhps.data import amass_corpus, source

    table = amass_corpus.load_corpus(cfg, progress=False)
    stride = cfg.data.amass_stride
    assert len(table["pose"]) == 2 * len(range(0, 60, stride))  # two motion files, shape.npz left out
    assert table["pose"].shape[1:] == (72,) and table["shape"].shape[1:] == (10,)
    assert not table["pose"][:, :3].any()  # canonical: no global orientation
    walk = np.load(cfg.paths.amass_dir / "BMLrub" / "s2" / "walk_poses.npz")["poses"][::stride]  # first, sorted
    np.testing.assert_allclose(table["pose"][:len(walk), 3:], walk[:, 3:], atol=1e-6)
    stream = source.PretrainStream(cfg, smpl, 4, CPU)
    first, again = stream.batch(0), source.PretrainStream(cfg, smpl, 4, CPU).batch(0)
    assert first.shape == (4, 6890, 3)
    torch.testing.assert_close(first, again)  # seeded
    assert first.mean(1).abs().max() < 1e-5  # centred on the vertex mean


def test_smpl_vertex_parts_follow_the_skinning(smpl):
    from vqhps.body.base import SMPL24_NAMES
    from vqhps.data import source

    parts = source.vertex_parts(smpl)
    assert parts.shape == (smpl.n_vertices,) and set(parts) == set(range(len(source.PART_NAMES)))
    dominant = smpl.lbs_weights.argmax(1).numpy()
    assert (parts[dominant == SMPL24_NAMES.index("left_knee")] == source.PART_NAMES.index("lower_leg")).all()
    assert (parts[dominant == SMPL24_NAMES.index("head")] == source.PART_NAMES.index("head")).all()


# ------------------------------------------------------------------------------------------- notebooks
def test_every_notebook_runs_on_the_paper_files(cfg, paper_root):
    """Notebooks 00-06 through the inline runner with source=paper: Tables 1-2, the hierarchy table and
    the figures are written, the report names the data."""
    from vqhps.reproduce import reproduce

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    assert reproduce("smoke", runner="inline") == 0
    elapsed = time.perf_counter() - start
    out = cfg.results_dir
    assert out.name == "smoke_paper"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [k[:2] for k in manifest["notebooks"]] == ["00", "01", "02", "03", "04", "05", "06"]
    assert all(v["status"] == "ok" for v in manifest["notebooks"].values())
    table1, table2 = pd.read_csv(out / "tables" / "table1.csv"), pd.read_csv(out / "tables" / "table2.csv")
    assert {"HMR", "CLIFF", "FastMETRO", "VQ-HPS", "VQ-HPS-rot"} <= set(table1["method"])
    assert set(table2["subset"]) == {"full", "valid"} and table2[["PVE", "MPJPE", "PA-MPJPE"]].notna().all().all()
    levels = pd.read_csv(out / "tables" / "hierarchy_levels.csv")
    assert levels["vertices"].tolist() == levels["paper_vertices"].tolist() == [6890, 1925, 400, 54]
    assert pd.read_csv(out / "tables" / "data_source.csv")["source"].tolist() == ["paper"]
    for fig in ("00_samples", "00_amass_meshes", "01_mesh_vqvae_curves", "02_reconstruction_heatmaps",
                "03_learning_curves", "04_qualitative", "05_3d_loss_vs_ce", "06_worst_cases"):
        assert (out / "figures" / f"{fig}.png").is_file(), fig
    report = (out / "REPORT.md").read_text()
    assert "3DPW crops" in report and "like for like" in report
    print(f"notebooks 00-06 on the paper source: {elapsed:.0f} s "
          f"({ {k[:2]: v['wall_s'] for k, v in manifest['notebooks'].items()} })")
