"""Table 2 ablations: each run's settings are what its row says, the 3D loss trains the mesh branch
through the soft decoding only, without reprojection nothing trains the camera, the pre-train-only
Mesh-VQ-VAE gives other tokens, tiny runs train/resume/refuse the wrong Mesh-VQ-VAE (library and
CLI), Table 2's layout and units (oracles with hand-computed errors), and Fig. 5 is a real PNG."""
from __future__ import annotations

import copy
import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vqhps import ablations as A
from vqhps import hps_training as H
from vqhps.checkpoint import CheckpointMismatch, load_checkpoint
from vqhps.config import load_config
from vqhps.data import synthetic
from vqhps.losses import vertex_l2
from vqhps.metrics import METRIC_COLUMNS
from vqhps.models.vqhps import soft_decode, vqhps_losses
from vqhps.vqvae_training import load_mesh_vqvae

SMALL = {"vqhps.d_model": 32, "vqhps.n_heads": 2, "vqhps.mlp_hidden": 64, "vqhps.dropout": 0.0,
         "vqhps.rot_hidden": 32, "vqhps.batch_size": 2}
CPU = torch.device("cpu")


#: one intra-op thread (conftest.one_thread): two threads thrash on the shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(tmp_path):
    cfg = load_config("smoke", **SMALL)
    cfg.paths.results = tmp_path / "results"
    cfg.runtime.progress = False
    return cfg


@pytest.fixture(scope="module")
def vqvaes(smoke_artifacts, body):
    """Both smoke Mesh-VQ-VAE stages from their default location (notebook 01 or the fixture)."""
    return {stage: load_mesh_vqvae(smoke_artifacts, body, stage) for stage in ("finetune", "pretrain")}


@pytest.fixture(scope="module")
def splits(smoke_artifacts):
    return {s: synthetic.load_split(smoke_artifacts, s) for s in ("train", "test")}


@pytest.fixture(scope="module")
def batch(splits, body, vqvaes, smoke_cfg):
    arrays = {k: v[:2] for k, v in splits["train"].items()}
    b = next(H.iterate_split(arrays, body, smoke_cfg, CPU, batch_size=2, progress=False))
    b["token_ids"] = vqvaes["finetune"].encode(b["canonical"])
    return b


def tiny_model(cfg, body, vqvae, **overrides):
    torch.manual_seed(0)
    return H.build_vqhps(H.vqhps_config(cfg, **overrides), body, vqvae).train()


# ------------------------------------------------------------------------------------ settings
def test_each_run_changes_only_what_its_row_says(tmp_path):
    cfg = small_cfg(tmp_path)
    cfg.ablation.epochs = 2
    main = dataclasses.asdict(cfg.vqhps)
    expect = {"vqhps_ablation_schedule": ({}, "finetune"),
              "vqhps_3d_loss": ({"loss": "3d"}, "finetune"),
              "vqhps_no_reprojection": ({"use_reprojection": False}, "finetune"),
              "vqhps_pretrain_vqvae": ({}, "pretrain")}
    assert list(A.RUNS) == list(expect) and A.RUNS[A.REFERENCE.name] is A.REFERENCE
    assert set(A.ABLATIONS) == set(expect) - {A.REFERENCE.name}
    for name, (changes, stage) in expect.items():
        run = A.ablation(name)
        hcfg = dataclasses.asdict(H.vqhps_config(cfg, **A.training_overrides(cfg, name)))
        differ = {k: v for k, v in hcfg.items() if main[k] != v}
        assert differ == {**changes, "epochs": 2}, name
        assert run.vqvae_stage == stage
    paths = {H.vqhps_checkpoint(cfg, n) for n in (A.FULL_MODEL, "vqhps_rot", *A.RUNS)}
    assert len(paths) == len(A.RUNS) + 2  # nothing overwrites notebook 03's checkpoints
    cfg.ablation.epochs = None
    assert A.ablation_epochs(cfg) == cfg.vqhps.epochs
    with pytest.raises(ValueError, match="vqhps_3d_loss"):
        A.ablation("vqhps_3d")


def test_without_reprojection_only_rotation_and_tokens_train(tmp_path, body, vqvaes, batch):
    cfg = small_cfg(tmp_path)
    grads = {}
    for name in ("vqhps_ablation_schedule", "vqhps_no_reprojection"):
        hcfg = H.vqhps_config(cfg, **A.training_overrides(cfg, name))
        model = tiny_model(cfg, body, vqvaes["finetune"])
        losses = vqhps_losses(model(batch["image"], vqvaes["finetune"], body), batch, vqvaes["finetune"], body, hcfg)
        losses["total"].backward()
        grads[name] = model.rot_head.out.bias.grad[6:].clone()  # the camera (s, tx, ty) outputs
        if not hcfg.use_reprojection:
            assert not losses["reproj"].requires_grad and losses["reproj"] > 0  # reported, not trained
            assert torch.allclose(losses["total"], losses["ce"] + hcfg.rot_weight * losses["rot"])
    # the reprojection is the only loss that sees the camera
    assert grads["vqhps_ablation_schedule"].abs().sum() > 0
    assert torch.count_nonzero(grads["vqhps_no_reprojection"]) == 0


def test_3d_loss_reaches_the_mesh_branch_through_the_soft_decoding(tmp_path, body, vqvaes, batch):
    cfg = small_cfg(tmp_path)
    vqvae = vqvaes["finetune"]
    hcfg = H.vqhps_config(cfg, **A.training_overrides(cfg, "vqhps_3d_loss"))
    model = tiny_model(cfg, body, vqvae, loss="3d")
    model.eval()  # two identical forwards: no dropout, no stochastic depth, fixed BatchNorm statistics
    out = model(batch["image"], vqvae, body)
    losses = vqhps_losses(out, batch, vqvae, body, hcfg)
    assert not losses["ce"].requires_grad  # the cross-entropy is reported, not trained
    losses["total"].backward()
    mesh_params = [p for p in model.mesh_branch_parameters() if p.grad is not None]
    full = [p.grad.clone() for p in mesh_params]
    assert full and all(torch.isfinite(g).all() for g in full)
    assert model.mesh.head[-1].weight.grad.abs().sum() > 0
    assert sum(g.abs().sum() for g in full[:5]) > 0  # down into the mesh backbone's first layers
    # the mesh branch's gradient is exactly that of the vertex loss of the soft-decoded mesh
    model.zero_grad()
    again = model(batch["image"], vqvae, body)
    vertex_l2(soft_decode(again["logits"], vqvae), batch["canonical"]).backward()
    for g, p in zip(full, mesh_params):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_pretrain_only_mesh_vqvae_gives_other_tokens(vqvaes, batch):
    ids = {stage: v.encode(batch["canonical"]) for stage, v in vqvaes.items()}
    assert ids["pretrain"].shape == ids["finetune"].shape
    assert (ids["pretrain"] != ids["finetune"]).float().mean() > 0.1
    assert H.vqvae_fingerprint(vqvaes["pretrain"]) != H.vqvae_fingerprint(vqvaes["finetune"])


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained(tmp_path_factory, body, vqvaes, splits):
    """notebook 03's VQ-HPS and every Table 2 run, 2 steps each on 4 images: (cfg, results)."""
    cfg = small_cfg(tmp_path_factory.mktemp("ablations"))
    cfg.ablation.epochs = 1
    arrays = {k: v[:4] for k, v in splits["train"].items()}
    kwargs = dict(train_arrays=arrays)
    results = {A.FULL_MODEL: H.train_vqhps(cfg, body, vqvaes["finetune"], name=A.FULL_MODEL, epochs=1,
                                           validate=False, **kwargs)[1]}
    for name in A.RUNS:
        if name == "vqhps_pretrain_vqvae":  # interrupted after one step, then resumed
            first = A.train_ablation(cfg, body, name, stop_after=1, vqvaes=vqvaes, **kwargs)[1]
            assert first.history[-1]["step"] == 1
        results[name] = A.train_ablation(cfg, body, name, vqvaes=vqvaes, **kwargs)[1]
    return cfg, results


def test_runs_train_under_their_own_names_with_their_settings(trained, body, vqvaes):
    cfg, results = trained
    assert results["vqhps_pretrain_vqvae"].resumed_from == 1
    for name, result in results.items():
        assert result.checkpoint == H.vqhps_checkpoint(cfg, name) and result.history[-1]["step"] == 2
        meta = load_checkpoint(result.checkpoint)["meta"]
        stage = "finetune" if name == A.FULL_MODEL else A.ablation(name).vqvae_stage
        assert meta["vqvae_stage"] == stage
        assert meta["vqvae_fingerprint"] == H.vqvae_fingerprint(vqvaes[stage])
    # the runs on the fine-tuned Mesh-VQ-VAE share one encoded token table, the pre-trained one has its own
    assert len(list(H.token_cache_dir(cfg).glob("*.pt"))) == 2
    assert "vertex" in results["vqhps_3d_loss"].history[-1]
    assert not any(k.startswith("val_") for k in results["vqhps_3d_loss"].history[-1])  # test split only
    assert load_checkpoint(results["vqhps_3d_loss"].checkpoint)["meta"]["config"]["loss"] == "3d"
    assert not load_checkpoint(results["vqhps_no_reprojection"].checkpoint)["meta"]["config"]["use_reprojection"]
    # tokens of the pre-trained Mesh-VQ-VAE mean nothing to the fine-tuned one's decoder
    with pytest.raises(CheckpointMismatch, match="pretrain"):
        H.load_vqhps(results["vqhps_pretrain_vqvae"].checkpoint, cfg, body, vqvaes["finetune"])
    assert A.schedule_differences(cfg) == {}  # the tiny "main run" had the ablations' single epoch
    assert "exactly as notebook 03" in A.schedule_note(cfg)
    longer = copy.deepcopy(cfg)
    longer.ablation.epochs = 2
    assert A.schedule_differences(longer) == {"epochs": (1, 2)}
    assert "epochs 1 (ablations: 2)" in A.schedule_note(longer)


def test_cli_trains_an_ablation_by_name(tmp_path, monkeypatch, smoke_artifacts):
    from vqhps.cli import main

    ckpts = tmp_path / "smoke" / "checkpoints"
    ckpts.mkdir(parents=True)
    for stage in ("finetune", "pretrain"):
        shutil.copy(smoke_artifacts.results_dir / "checkpoints" / f"mesh_vqvae_{stage}.pt", ckpts)
    monkeypatch.setenv("VQHPS_RESULTS_DIR", str(tmp_path))
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    assert main(["train", "--profile", "smoke", "--name", "vqhps_no_reprojection", "--stop-after", "1", *sets,
                 "--set", "runtime.progress=false"]) == 0
    meta = load_checkpoint(ckpts / "vqhps_no_reprojection.pt")["meta"]
    assert meta["config"]["use_reprojection"] is False and meta["config"]["epochs"] == 1
    assert not (ckpts / "vqhps.pt").exists()


# ------------------------------------------------------------------------------------ Table 2
def _scaled_oracle(factor: float):
    """Predicts the true oriented mesh scaled by ``factor`` about its vertex mean."""

    def model_fn(batch):
        gt = batch["canonical"].float() @ batch["root_rot"].float().transpose(-1, -2)
        centre = gt.mean(1, keepdim=True)
        return {"vertices": centre + factor * (gt - centre), "rotmat": batch["root_rot"].float()}

    return model_fn


def test_table2_layout_units_and_worst_ablation(smoke_cfg, body, splits):
    test = {k: v[:6] for k, v in splits["test"].items()}
    test["valid"] = np.array([True, False, True, True, False, True])
    factors = {A.FULL_LABEL: 1.0, A.REFERENCE.label: 1.01, "3D loss": 1.2, "No reprojection": 1.02,
               "Mesh-VQ-VAE": 1.05}
    table, per_sample = A.evaluate_ablations(smoke_cfg, body, CPU, test_arrays=test, progress=False,
                                             models={k: _scaled_oracle(f) for k, f in factors.items()})
    assert list(table.index.names) == ["method", "subset"] and list(table.columns) == list(METRIC_COLUMNS)
    assert list(table.index.get_level_values("method").unique()) == list(factors)
    assert set(per_sample["method"]) == set(factors) and len(per_sample) == 6 * len(factors)
    # scaling by f about the vertex mean moves every vertex (and, rows summing to one, every joint)
    # by (f - 1) times its distance to that mean: in mm
    batch = next(H.iterate_split(test, body, smoke_cfg, CPU, batch_size=6, progress=False))
    gt = batch["canonical"].double()
    centre = gt.mean(1, keepdim=True)
    radius_v = (gt - centre).norm(dim=-1).mean(1).numpy() * 1000
    joints = torch.einsum("jv,bvc->bjc", body.regressor17.double().cpu(), gt)
    radius_j = (joints - centre).norm(dim=-1).mean(1).numpy() * 1000
    for label, f in factors.items():
        for subset, rows in (("full", slice(None)), ("valid", test["valid"])):
            assert table.loc[(label, subset), "PVE"] == pytest.approx((f - 1) * radius_v[rows].mean(), abs=0.02)
            assert table.loc[(label, subset), "MPJPE"] == pytest.approx((f - 1) * radius_j[rows].mean(), abs=0.02)
            assert table.loc[(label, subset), "PA-MPJPE"] == pytest.approx(0.0, abs=0.02)  # a similarity
    assert '"3D loss"' in A.hurts_most(table) and f'"{A.REFERENCE.label}"' in A.hurts_most(table)
    paper = A.with_paper(table)
    assert list(paper.columns) == ["PVE", "PVE paper", "MPJPE", "MPJPE paper", "PA-MPJPE", "PA-MPJPE paper"]
    assert paper.loc[("3D loss", "full"), "PVE paper"] > paper.loc[("VQ-HPS", "full"), "PVE paper"] > 0
    assert np.isnan(paper.loc[(A.REFERENCE.label, "full"), "PVE paper"])


# ------------------------------------------------------------------------------------ Fig. 5
def test_comparison_picks_follow_the_fixed_rule():
    valid = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    arrays = {"valid": valid, "image": np.zeros((10, 2, 2, 3), np.uint8)}
    picks = A.comparison_picks(arrays, 3)
    assert picks == [1, 5, 9] and all(valid[picks])  # first, middle and last valid samples
    assert A.comparison_picks({**arrays, "valid": np.zeros(10, bool)}, 2) == [0, 9]


def test_loss_comparison_figure_is_a_png(tmp_path, trained, body, vqvaes, splits):
    from vqhps.figures import save_figure

    cfg, _ = trained
    models = A.load_table2_models(cfg, body, CPU, vqvaes)
    picks = A.comparison_picks(splits["test"], 2)
    chosen = {"3D loss": models["3D loss"], "cross-entropy": models[A.REFERENCE.label]}
    preds, gt = A.canonical_predictions(chosen, splits["test"], picks, body, cfg, CPU)
    assert all(p.shape == gt.shape == (2, body.n_vertices, 3) for p in preds.values())
    errors = A.canonical_pve_mm(gt + 0.01, gt)
    np.testing.assert_allclose(errors, 0.0, atol=1e-3)  # a translation is no error (mm)
    fig = A.loss_comparison_figure(splits["test"]["image"][picks], preds, gt, body.faces.cpu().numpy(), size=96)
    path = save_figure(fig, tmp_path, "05_3d_loss_vs_ce")
    assert path.is_file() and path.stat().st_size > 1000
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 1.5 * image.shape[0]  # 2 rows of 4 panels
    assert image.std() > 10  # not a blank canvas
