"""Table 1 machinery: baselines trained by VQ-HPS's loop resume exactly, their predictions share
VQ-HPS's frame in the evaluation, foreign checkpoints are refused, the paper's tables and Table 1
carry the expected columns and units, and Fig. 4 is written. Tiny models (tests/test_baselines.py's
SMALL), one thread, a few steps on the smoke benchmark."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vqhps import baseline_training as bt
from vqhps import figures, figures_eval, paper
from vqhps import hps_training as H
from vqhps.checkpoint import CheckpointMismatch
from vqhps.config import load_config
from vqhps.data import synthetic
from vqhps.models.body_params import oriented_targets
from vqhps.geometry import rotation_angle_deg

CPU = torch.device("cpu")
SMALL = {"vqhps.d_model": 32, "vqhps.n_heads": 2, "vqhps.mlp_hidden": 64, "vqhps.dropout": 0.0}
RUN = dict(epochs=2, batch_size=4, lr_step_epochs=1, lr=1e-4)  # 8 images: 2 steps per epoch, 4 steps


#: one intra-op thread (conftest.one_thread): two threads thrash on the shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def subset(arrays: dict, n: int, start: int = 0) -> dict:
    return {k: v[start:start + n] for k, v in arrays.items()}


def small_cfg(tmp_path, log_every: int = 1):
    cfg = load_config("smoke", **SMALL)
    cfg.paths.results = tmp_path / "results"
    cfg.runtime.log_every, cfg.runtime.progress = log_every, False
    return cfg


@pytest.fixture(scope="module")
def splits(smoke_artifacts):
    return {s: synthetic.load_split(smoke_artifacts, s) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, body, splits):
    """CLIFF (the baseline with the most inputs) trained 4 steps with validation on 4 images."""
    cfg = small_cfg(tmp_path_factory.mktemp("cliff_run"), log_every=2)
    kwargs = dict(train_arrays=subset(splits["train"], 8), val_arrays=subset(splits["val"], 4), **RUN)
    model, result = bt.train_baseline(cfg, body, "cliff", **kwargs)
    return cfg, model, result, kwargs


# ------------------------------------------------------------------------------------ training
def test_interrupted_and_resumed_baseline_equals_uninterrupted(tmp_path, body, trained):
    _, full_model, full, kwargs = trained
    assert full.checkpoint.name == "cliff.pt" and full.history[-1]["step"] == 4
    assert sum("val_PVE" in r for r in full.history) == 2  # one validation per epoch
    assert {"loss", "pve_mm", "rot_err_deg", "reproj_full"} <= set(full.history[-1])
    cfg = small_cfg(tmp_path, log_every=2)
    _, part = bt.train_baseline(cfg, body, "cliff", stop_after=2, **kwargs)
    assert part.history[-1]["step"] == 2
    model, resumed = bt.train_baseline(cfg, body, "cliff", **kwargs)
    assert resumed.resumed_from == 2
    for key, value in full_model.state_dict().items():
        assert torch.allclose(value.float(), model.state_dict()[key].float(), atol=1e-6), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    for a, b in zip(strip(resumed.history), strip(full.history), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    again, done = bt.train_baseline(cfg, body, "cliff", **kwargs)  # finished: returns the weights at once
    assert done.wall_s == 0 and torch.equal(again.state_dict()["regressor.out.weight"],
                                            model.state_dict()["regressor.out.weight"])


def test_baselines_use_vqhps_recipe_and_their_own_epochs():
    cfg = load_config("smoke")
    assert bt.baseline_config(cfg).epochs == cfg.baselines.epochs
    cfg.baselines.epochs = None
    same = bt.baseline_config(cfg)
    assert same == cfg.vqhps  # optimiser, batch, augmentation settings and epochs: VQ-HPS's
    assert load_config("full").baselines.epochs is None
    assert bt.baseline_config(cfg, epochs=5).epochs == 5
    with pytest.raises(ValueError, match="unknown VQHPSConfig field"):
        bt.baseline_config(cfg, learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown baseline 'metro'"):
        bt.build_baseline("metro", cfg, None)


def test_load_round_trip_and_refusals(tmp_path, body, trained):
    cfg, model, result, kwargs = trained
    loaded = bt.load_baseline(result.checkpoint, cfg, body)
    assert isinstance(loaded, bt.BASELINES["cliff"]) and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # a study's models share one backbone: another one in the configuration is refused on load
    other_cfg = copy.deepcopy(cfg)
    other_cfg.vqhps.backbone = "resnet50"
    with pytest.raises(CheckpointMismatch, match=f"trained with backbone='{cfg.vqhps.backbone}'.*resnet50"):
        bt.load_baseline(result.checkpoint, other_cfg, body)
    # other settings: the run is refused with the field named, never silently resumed
    with pytest.raises(CheckpointMismatch, match=r"recipe\.lr.*delete"):
        bt.train_baseline(cfg, body, "cliff", **{**kwargs, "lr": 5e-4})
    # a checkpoint of another kind or architecture is refused on load
    state = torch.load(result.checkpoint, weights_only=False)
    state["meta"]["architecture"]["hidden"] = 7
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointMismatch, match="architecture.hidden"):
        bt.load_baseline(bad, cfg, body)
    state["meta"] = {**state["meta"], "kind": "vqhps"}
    torch.save(state, bad)
    with pytest.raises(CheckpointMismatch, match="not a baseline checkpoint"):
        bt.load_baseline(bad, cfg, body)


# ------------------------------------------------------------------------------------ prediction
class _Oracle(torch.nn.Module):
    """A 'baseline' whose forward returns the ground-truth oriented mesh scaled by ``scale`` about its
    centroid and shifted (a scale error of known size; the shift must not count)."""

    def __init__(self, batch_source: dict, scale: float):
        super().__init__()
        self.source, self.scale = batch_source, scale

    def forward(self, images, bbox_info=None):
        gt = oriented_targets(self.source["batch"])
        centred = gt - gt.mean(1, keepdim=True)
        return {"vertices": centred * self.scale + torch.tensor([0.5, -2.0, 7.0]),
                "cam": torch.ones(len(gt), 3), "rotmat": self.source["batch"]["root_rot"].float()}


def test_predictor_frame_matches_evaluation(smoke_cfg, body, splits):
    """The ground truth through the baseline predictor gives ~0 mm; a 1% scale error gives exactly 1%
    of the centred vertices' mean norm as PVE (so the metrics are in mm and the frames agree)."""
    test = subset(splits["test"], 6)
    source: dict = {}
    for scale in (1.0, 1.01):
        fn = bt.baseline_predictor()(_Oracle(source, scale))

        def model_fn(batch, fn=fn):
            source["batch"] = batch
            return fn(batch)

        per_sample, summary = H.evaluate_split(model_fn, test, body, smoke_cfg, CPU, batch_size=4, progress=False)
        if scale == 1.0:
            assert per_sample[["PVE", "MPJPE", "PA-MPJPE", "rot_err_deg"]].abs().max().max() < 1e-2
        else:
            batch = next(H.iterate_split(test, body, smoke_cfg, CPU, batch_size=6, progress=False))
            gt = oriented_targets(batch)
            expected = 1000 * 0.01 * (gt - gt.mean(1, keepdim=True)).norm(dim=-1).mean(1)
            np.testing.assert_allclose(per_sample["PVE"].to_numpy(), expected.numpy(), rtol=1e-3)
            assert per_sample["PA-MPJPE"].max() < 1e-2  # a similarity alignment removes a scale


@pytest.mark.parametrize("name", list(bt.BASELINES))
def test_predictor_outputs_of_each_baseline(smoke_cfg, body, splits, name):
    cfg = load_config("smoke", **SMALL)
    torch.manual_seed(0)
    model = bt.build_baseline(name, cfg, body).eval()
    batch = next(H.iterate_split(subset(splits["test"], 2), body, cfg, CPU, batch_size=2, progress=False))
    with torch.no_grad():
        out = bt.baseline_predictor()(model)(batch)
    assert out["vertices"].shape == (2, body.n_vertices, 3) and out["cam"].shape == (2, 3)
    torch.testing.assert_close(out["vertices"].mean(1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    assert ("rotmat" in out) == (name != "fastmetro")
    if "rotmat" in out:  # oriented = canonical @ R^T, VQ-HPS's convention
        torch.testing.assert_close(out["vertices"], out["canonical"] @ out["rotmat"].transpose(1, 2))


# ------------------------------------------------------------------------------------ tables
def test_paper_tables_columns_units_and_rows():
    for name, rows in (("table1", ["HMR", "Cliff", "FastMetro", "VQ-HPS (ours)", "VQ-HPS-rot (ours)"]),
                       ("table2", ["VQ-HPS", "3D loss", "No reprojection", "Mesh-VQ-VAE"])):
        t = paper.paper_table(name)
        assert list(t.columns) == ["PVE", "MPJPE", "PA-MPJPE"] and t.attrs["units"] == "mm"
        assert list(t.index.names) == ["method", "subset"]
        assert list(dict.fromkeys(t.index.get_level_values("method"))) == rows
        assert (t["PA-MPJPE"] < t["MPJPE"]).all() and (t["MPJPE"] < t["PVE"]).all()  # as in any HPS table
        assert t.to_numpy().min() > 50 and t.to_numpy().max() < 300  # millimetres, not metres
    # Table 2's VQ-HPS row is Table 1's footnote (full test set)
    assert paper.TABLE2.loc[("VQ-HPS", "full")].equals(paper.TABLE1.loc[("VQ-HPS (ours)", "full")])


def test_with_paper_columns_places_paper_numbers_beside_ours():
    ours = pd.DataFrame({"PVE": [1.0, 2.0, 3.0], "MPJPE": [4.0, 5.0, 6.0], "PA-MPJPE": [7.0, 8.0, 9.0]},
                        index=pd.MultiIndex.from_tuples([("HMR", "valid"), ("HMR", "full"), ("floor", "valid")],
                                                        names=["method", "subset"]))
    out = paper.with_paper_columns(ours, "table1", {"HMR": "HMR"})
    assert list(out.columns) == ["PVE", "PVE paper", "MPJPE", "MPJPE paper", "PA-MPJPE", "PA-MPJPE paper"]
    assert out.loc[("HMR", "valid"), "PVE paper"] == 209.34 and out.loc[("HMR", "valid"), "PVE"] == 1.0
    assert out.loc[("HMR", "full")].filter(like="paper").isna().all()  # the paper has HMR on valid only
    assert out.loc[("floor", "valid")].filter(like="paper").isna().all()
    with pytest.raises(ValueError, match="not rows of the paper's table1"):
        paper.with_paper_columns(ours, "table1", {"HMR": "HMR [25]"})


def test_table1_columns_and_units(smoke_cfg, body, splits):
    test = subset(splits["test"], 6)

    def exact(batch):
        return {"vertices": oriented_targets(batch), "rotmat": batch["root_rot"]}

    _, summary = H.evaluate_split(exact, test, body, smoke_cfg, CPU, progress=False)
    table = bt.table1({name: summary for name in ("HMR", "VQ-HPS", "Mesh-VQ-VAE floor")})
    assert list(table.columns) == ["PVE", "PVE paper", "MPJPE", "MPJPE paper", "PA-MPJPE", "PA-MPJPE paper",
                                   "rot_err_deg", "rot_err_median_deg", "rot_flip_share"]
    assert table.attrs["units"] == "mm"
    assert table.loc[("VQ-HPS", "full"), "MPJPE paper"] == 157.49
    assert table.loc[("VQ-HPS", "valid"), "PVE paper"] == 163.88
    assert table.loc[("Mesh-VQ-VAE floor", "valid")].filter(like="paper").isna().all()
    assert table[["PVE", "MPJPE", "PA-MPJPE", "rot_err_deg", "rot_err_median_deg"]].abs().max().max() < 0.01
    assert (table["rot_flip_share"] == 0).all()


def test_table1_has_the_mean_body_row_and_rotation_columns(smoke_cfg, body, splits, monkeypatch):
    """table1_predictors adds the mean body (the training split's mean mesh at its mean rotation, no
    paper value) after the floor; a method without a rotation gets NaN rotation columns."""
    monkeypatch.setattr(H, "vqhps_checkpoint", lambda cfg, run: Path(__file__))  # any existing file
    monkeypatch.setattr(H, "load_vqhps", lambda *a, **k: None)  # never called by these model_fns here
    train = subset(splits["train"], 16)
    methods = bt.table1_predictors(smoke_cfg, body, None, {}, CPU, train_arrays=train)
    assert list(methods) == ["VQ-HPS", "VQ-HPS-rot", "Mesh-VQ-VAE floor", "mean body"]
    assert bt.REFERENCE_METHODS == ("Mesh-VQ-VAE floor", "mean body")

    def exact(batch):
        return {"vertices": oriented_targets(batch), "rotmat": batch["root_rot"]}

    def no_rotation(batch):  # FastMETRO-like: vertices only
        return {"vertices": oriented_targets(batch)}

    test = subset(splits["test"], 6)
    _, summaries = bt.evaluate_methods({"HMR": exact, "FastMETRO": no_rotation, "mean body": methods["mean body"]},
                                       test, body, smoke_cfg, CPU)
    table = bt.table1(summaries)
    assert ("mean body", "full") in table.index and ("mean body", "valid") in table.index
    assert table.loc["mean body"].filter(like="paper").isna().all().all()
    assert (table.loc["mean body", "PVE"] > table.loc["HMR", "PVE"] + 10).all()  # an exact model beats it
    assert table.loc["mean body", ["rot_err_deg", "rot_err_median_deg", "rot_flip_share"]].notna().all().all()
    assert table.loc["FastMETRO", ["rot_err_deg", "rot_err_median_deg", "rot_flip_share"]].isna().all().all()
    R = torch.as_tensor(test["root_rot"]).double()
    mean_R = H.mean_root_rotation(train).expand_as(R)
    errors = rotation_angle_deg(mean_R, R).numpy()
    assert table.loc[("mean body", "full"), "rot_err_median_deg"] == pytest.approx(np.median(errors), abs=0.01)
    assert table.loc[("mean body", "full"), "rot_flip_share"] == pytest.approx((errors > 90).mean(), abs=1e-3)


# ------------------------------------------------------------------------------------ figures
def test_pick_at_quantiles_hand_computed():
    values = [50.0, 10.0, np.nan, 40.0, 20.0, 30.0]  # sorted: 10 (1), 20 (4), 30 (5), 40 (3), 50 (0)
    assert figures_eval.pick_at_quantiles(values, (0.0, 0.5, 1.0)) == [1, 5, 0]
    assert figures_eval.pick_at_quantiles(values, (0.1, 0.3, 0.7, 0.9)) == [1, 4, 3, 0]
    with pytest.raises(ValueError, match="fewer than"):
        figures_eval.pick_at_quantiles([1.0, np.nan], (0.2, 0.8))


def test_qualitative_figure_file(tmp_path, body, splits, trained):
    cfg, model, _, _ = trained
    test = subset(splits["test"], 4)
    methods = {"CLIFF": bt.baseline_predictor()(model)}
    picks = [2, 0]
    preds, truth = figures_eval.predict_samples(methods, test, picks, body, cfg, CPU)
    assert preds["CLIFF"]["vertices"].shape == truth["vertices"].shape == (2, body.n_vertices, 3)
    fig = figures_eval.qualitative_figure(test["image"][picks], preds, truth, body.faces.cpu().numpy(),
                                          row_titles=["a", "b"], pve={"CLIFF": [1.0, 2.0]}, display=64, panel=1.5)
    path = figures.save_figure(fig, tmp_path, "04_qualitative", dpi=100)
    assert path.is_file() and path.stat().st_size > 10_000
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
    # 3 columns (image, CLIFF, ground truth) x 2 rows of 1.5-inch panels at 100 dpi, give or take margins
    assert 0.8 * 450 < width < 1.1 * 450 and 0.8 * 300 < height < 1.2 * 300
    with Image.open(path) as img:
        assert np.asarray(img.convert("L")).std() > 10  # images were drawn, not a blank canvas



def test_cli_trains_a_baseline_under_another_name_and_evaluates_it(tmp_path, body, splits, monkeypatch):
    """`train --name hmr --checkpoint-name S` writes S.pt (hmr.pt untouched), and `evaluate --name S`
    reports what evaluate_split computes for that baseline."""
    from vqhps.cli import main

    monkeypatch.setenv("VQHPS_RESULTS_DIR", str(tmp_path))
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")] + ["--set", "runtime.progress=false"]
    assert main(["train", "--profile", "smoke", "--name", "hmr", "--checkpoint-name", "hmr_fp32",
                 "--stop-after", "1", *sets]) == 0
    ckpts = tmp_path / "smoke" / "checkpoints"
    assert (ckpts / "hmr_fp32.pt").is_file() and not (ckpts / "hmr.pt").exists()
    assert main(["evaluate", "--profile", "smoke", "--name", "hmr_fp32", "--split", "val", *sets]) == 0
    written = pd.read_csv(tmp_path / "smoke" / "tables" / "eval_hmr_fp32_val_fp32.csv", index_col=0)
    cfg = load_config("smoke", **SMALL)
    model = bt.load_baseline(ckpts / "hmr_fp32.pt", cfg, body, CPU)
    _, expected = H.evaluate_split(bt.baseline_predictor()(model), splits["val"], body, cfg, CPU, progress=False)
    for column in ("PVE", "MPJPE", "PA-MPJPE", "rot_err_deg"):
        assert written.loc["full", column] == pytest.approx(expected.loc["full", column], rel=1e-5)


@pytest.mark.parametrize("name", ["hmr", "cliff", "fastmetro"])
def test_a_baseline_training_step_makes_no_tensor_from_host_data(name, body, splits, no_host_data):
    """What capturing the step in a CUDA graph (runtime.cuda_graph) needs: after the first step, a
    step only uses tensors already on its device."""
    from vqhps.train import train_step

    cfg = load_config("smoke", **SMALL)
    batch_fn = H.benchmark_batches(cfg, subset(splits["train"], 8), body, torch.device("cpu"), batch_size=4)
    torch.manual_seed(0)
    model = bt.build_baseline(name, cfg, body)
    optimizer, loss_fn = torch.optim.AdamW(model.parameters(), lr=1e-4), bt.baseline_loss_fn()
    train_step(model, model, optimizer, None, batch_fn(0), loss_fn, 0, amp=False)
    batch = batch_fn(1)
    with no_host_data():
        losses = train_step(model, model, optimizer, None, batch, loss_fn, 1, amp=False)
    assert torch.isfinite(losses["loss"])


def graphed_baseline_steps(name: str, body, train: dict, device: torch.device, steps: int = 5):
    """(step function, last losses) after ``steps`` steps of baseline ``name`` on ``device`` through
    ``make_train_step(cuda_graph=True)``, a warning on fallback raised as an error."""
    import warnings

    from vqhps.train import make_train_step

    cfg = load_config("smoke", **SMALL)
    batch_fn = H.benchmark_batches(cfg, subset(train, 8), body, device, batch_size=4)
    torch.manual_seed(0)
    model = bt.build_baseline(name, cfg, body).to(device)
    # the optimizer and schedule training builds (fused AdamW on CUDA, its StepLR through the graph)
    optimizer, scheduler = H.schedule_optimizer(model.named_parameters(), H.Schedule.of(bt.baseline_config(cfg)),
                                                batch_fn.steps_per_epoch, device)
    step = make_train_step(model, model, optimizer, scheduler, bt.baseline_loss_fn(), cfg.runtime, cuda_graph=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="training step not captured")
        for s in range(steps):
            losses = step(batch_fn(s), s)
    return step, losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist only on a GPU")
@pytest.mark.parametrize("name", ["hmr", "cliff", "fastmetro"])
def test_a_baseline_training_step_is_captured_in_a_cuda_graph(name, body, splits):
    """The GPU side of the test above: a host constant moved to the device inside the step (which the
    CPU cannot see) would make the capture fall back to eager steps."""
    import copy

    from vqhps.train import replays_graph

    step, losses = graphed_baseline_steps(name, copy.deepcopy(body).cuda(), splits["train"], torch.device("cuda"))
    assert replays_graph(step) and torch.isfinite(losses["loss"])
