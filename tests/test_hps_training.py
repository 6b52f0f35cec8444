"""VQ-HPS training and evaluation on the smoke benchmark: deterministic batches, learning on a few
images, exact resume, the evaluation protocol (oracles with known errors), the Mesh-VQ-VAE floor,
VQ-HPS-rot keeping VQ-HPS's canonical mesh, and refusal of foreign checkpoints."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from vqhps.checkpoint import CheckpointMismatch
from vqhps.config import load_config
from vqhps.data import synthetic
from vqhps import hps_training as H
from vqhps.vqvae_training import load_mesh_vqvae

CPU = torch.device("cpu")


def subset(arrays: dict, n: int, start: int = 0) -> dict:
    return {k: v[start:start + n] for k, v in arrays.items()}


def tiny_cfg(tmp_path, log_every: int = 2):
    cfg = load_config("smoke")
    cfg.paths.results = tmp_path / "results"
    cfg.runtime.log_every, cfg.runtime.progress = log_every, False
    return cfg


@pytest.fixture(scope="module")
def vqvae(smoke_artifacts, body):
    """The smoke Mesh-VQ-VAE from its default location (made by notebook 01 or the fixture)."""
    smoke_cfg = smoke_artifacts
    return load_mesh_vqvae(smoke_cfg, body, "finetune")


@pytest.fixture(scope="module")
def splits(smoke_artifacts):
    smoke_cfg = smoke_artifacts
    return {s: synthetic.load_split(smoke_cfg, s) for s in ("train", "val", "test")}


RUN = dict(epochs=3, batch_size=4, lr_step_epochs=2, lr=1e-3)  # 8 images: 2 steps per epoch, 6 steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory, body, vqvae, splits):
    """A 6-step run with per-epoch validation on 4 images: (cfg, model, result, arguments)."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("full_run"))
    kwargs = dict(train_arrays=subset(splits["train"], 8), val_arrays=subset(splits["val"], 4), **RUN)
    model, result = H.train_vqhps(cfg, body, vqvae, name="run", **kwargs)
    return cfg, model, result, kwargs


def test_batches_are_a_pure_function_of_the_step(smoke_cfg, body, splits):
    train = splits["train"]
    fn = H.benchmark_batches(smoke_cfg, train, body, CPU, augment=True, batch_size=4)
    assert fn.steps_per_epoch == len(train["image"]) // 4
    first = fn(3)
    fn(7)  # the prefetched step 4 is discarded, step 8 is prefetched
    again, fresh = fn(3), H.benchmark_batches(smoke_cfg, train, body, CPU, batch_size=4, prefetch=False)(3)
    for key, value in first.items():
        assert torch.equal(value, again[key]) and torch.equal(value, fresh[key]), key
    assert not torch.equal(first["index"], fn(4)["index"])
    plain = H.benchmark_batches(smoke_cfg, train, body, CPU, augment=False, batch_size=4)(3)
    assert torch.equal(plain["index"], first["index"])
    assert not torch.equal(plain["image"], first["image"])  # the augmentation did something
    assert plain["canonical"].shape == (4, body.template.shape[0], 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-GPU synchronisation exists only with a GPU")
def test_preparing_an_augmented_batch_never_waits_for_the_gpu(smoke_cfg, body, splits):
    """A batch is prepared while the previous training step still runs on the GPU: any read-back
    (``.item()``, ``bool(tensor)``, a blocking copy) would stall that queue, so none may happen."""
    device = torch.device("cuda")
    gpu_body = copy.deepcopy(body).to(device)
    fn = H.benchmark_batches(smoke_cfg, splits["train"], gpu_body, device, augment=True, batch_size=8, meshes=False)
    fn(0)  # the first call allocates and warms up
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = fn(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert batch["image"].is_cuda and batch["flipped"].is_cuda


def test_token_table_holds_the_targets_of_every_augmented_batch(smoke_cfg, body, vqvae, splits):
    """Looked up by sample index and flip, the precomputed targets are the token ids the Mesh-VQ-VAE
    gives the batch's own (augmented, possibly mirrored) ground-truth meshes."""
    train = subset(splits["train"], 16)
    table = H.token_table(vqvae, body, train, CPU, batch_size=5)
    assert table.shape == (16, 2, vqvae.n_tokens) and table.dtype == torch.long
    batch = H.benchmark_batches(smoke_cfg, train, body, CPU, augment=True, batch_size=16, prefetch=False)(1)
    assert batch["flipped"].any() and not batch["flipped"].all()
    looked_up = table[batch["index"], batch["flipped"].long()]
    assert torch.equal(looked_up, vqvae.encode(batch["canonical"].float()))
    assert not torch.equal(table[:, 0], table[:, 1])  # a mirrored body is another mesh
    lean = H.benchmark_batches(smoke_cfg, train, body, CPU, augment=True, batch_size=16, prefetch=False, meshes=False)(1)
    assert "canonical" not in lean and torch.equal(lean["image"], batch["image"])


def test_token_cross_entropy_and_rotation_error_fall_on_a_few_images(tmp_path, body, vqvae, splits):
    cfg = tiny_cfg(tmp_path, log_every=4)
    _, result = H.train_vqhps(cfg, body, vqvae, name="overfit", train_arrays=subset(splits["train"], 4),
                              augment=False, validate=False, epochs=20, batch_size=4, lr=1e-3, lr_step_epochs=100)
    first, last = result.history[0], result.history[-1]
    assert last["step"] == 20
    assert last["ce"] < first["ce"] - 0.5
    assert last["rot_err_deg"] < 0.6 * first["rot_err_deg"]
    assert last["token_acc"] > first["token_acc"]


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, body, vqvae, trained):
    _, full_model, full, kwargs = trained
    cfg = tiny_cfg(tmp_path)
    _, part = H.train_vqhps(cfg, body, vqvae, name="run", stop_after=4, **kwargs)
    assert part.history[-1]["step"] == 4
    model, resumed = H.train_vqhps(cfg, body, vqvae, name="run", **kwargs)
    assert resumed.resumed_from == 4
    for key, value in full_model.state_dict().items():
        assert torch.allclose(value.float(), model.state_dict()[key].float(), atol=1e-6), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    for a, b in zip(strip(resumed.history), strip(full.history), strict=True):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert sum("val_PVE" in r for r in full.history) == 3  # one validation per epoch


def test_a_finished_run_reloads_without_encoding_its_token_targets(body, vqvae, trained, monkeypatch):
    cfg, model, result, kwargs = trained
    monkeypatch.setattr(H, "token_table", lambda *a, **k: pytest.fail("a finished run encoded its targets"))
    again, again_result = H.train_vqhps(cfg, body, vqvae, name="run", **kwargs)
    assert again_result.history[-1]["step"] == result.history[-1]["step"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_evaluation_protocol_on_oracles(smoke_cfg, body, splits):
    test = subset(splits["test"], 8)
    shift = torch.tensor([0.3, -1.0, 4.0])

    def oracle(batch):  # the ground-truth oriented mesh, translated: every error is zero
        return {"vertices": batch["canonical"] @ batch["root_rot"].transpose(1, 2) + shift, "rotmat": batch["root_rot"]}

    def unrotated(batch):  # the right canonical mesh with no rotation: only a rotation away
        return {"vertices": batch["canonical"]}

    per_sample, summary = H.evaluate_split(oracle, test, body, smoke_cfg, CPU, batch_size=3, progress=False)
    assert list(summary.index) == ["full", "valid"]
    assert {"PVE", "MPJPE", "PA-MPJPE"} <= set(summary.columns)
    assert len(per_sample) == 8 and list(per_sample["index"]) == list(range(8))
    assert np.array_equal(per_sample["valid"].to_numpy(), test["valid"])
    assert np.array_equal(per_sample["yaw"].to_numpy(), test["yaw"])
    assert per_sample[["PVE", "MPJPE", "PA-MPJPE", "rot_err_deg"]].abs().max().max() < 1e-2
    per_sample, summary = H.evaluate_split(unrotated, test, body, smoke_cfg, CPU, progress=False)
    assert (per_sample["PVE"] > 50).all() and (per_sample["PA-MPJPE"] < 1e-2).all()
    assert per_sample["rot_err_deg"].isna().all()


def test_metrics_table_floor_below_untrained_model(smoke_cfg, body, vqvae, splits):
    test = subset(splits["test"], 8)
    torch.manual_seed(0)
    untrained = H.build_vqhps(smoke_cfg.vqhps, body, vqvae).eval()
    _, floor = H.evaluate_split(H.vqvae_floor_predictor(vqvae), test, body, smoke_cfg, CPU, progress=False)
    per_sample, net = H.evaluate_split(H.vqhps_predictor(vqvae, body)(untrained), test, body, smoke_cfg, CPU,
                                       progress=False)
    table = H.metrics_table({"floor": floor, "untrained": net})
    assert list(table.columns) == ["PVE", "MPJPE", "PA-MPJPE"]
    assert list(table.index) == [("floor", "full"), ("floor", "valid"), ("untrained", "full"), ("untrained", "valid")]
    assert (table["PA-MPJPE"] <= table["MPJPE"]).all()
    for col in ("PVE", "MPJPE", "PA-MPJPE"):
        assert floor.loc["full", col] < net.loc["full", col]
    assert floor.loc["full", "rot_err_deg"] < 1e-3


def test_vqhps_rot_trains_the_refiner_only(tmp_path, body, vqvae, splits, trained):
    cfg, base, _, kwargs = trained
    rot, result = H.train_vqhps_rot(cfg, body, vqvae, base, train_arrays=kwargs["train_arrays"], validate=False,
                                    refine_epochs=1, batch_size=4)
    assert result.history[-1]["step"] == 2
    base_state, rot_state = base.state_dict(), rot.state_dict()
    for key, value in rot_state.items():
        if key.startswith("refiner."):
            continue
        assert torch.equal(value, base_state[key]), key  # weights and batch-norm statistics untouched
    assert rot_state["refiner.out.weight"].abs().sum() > 0  # zero-initialised, moved by training
    test = subset(splits["test"], 4)
    p0 = H.predict_split(H.vqhps_predictor(vqvae, body)(base), test, body, cfg, CPU, progress=False)
    p1 = H.predict_split(H.vqhps_predictor(vqvae, body)(rot), test, body, cfg, CPU, progress=False)
    assert torch.equal(p0["canonical"], p1["canonical"]) and torch.equal(p0["rotmat"], p1["rotmat_initial"])
    assert not torch.allclose(p0["rotmat"], p1["rotmat"])


def test_checkpoint_made_for_another_mesh_vqvae_is_refused(body, vqvae, trained):
    cfg, model, result, _ = trained
    loaded = H.load_vqhps(result.checkpoint, cfg, body, vqvae)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    other = copy.copy(vqvae)
    other.hierarchy_hash = "0123456789abcdef"
    with pytest.raises(CheckpointMismatch, match="hierarchy_hash"):
        H.load_vqhps(result.checkpoint, cfg, body, other)
    pretrained = load_mesh_vqvae(load_config("smoke"), body, "pretrain")
    with pytest.raises(CheckpointMismatch, match="vqvae_fingerprint"):
        H.load_vqhps(result.checkpoint, cfg, body, pretrained)
    for key, value in (("backbone", "resnet50"), ("backbone_weights", None)):
        other_cfg = copy.deepcopy(cfg)
        setattr(other_cfg.vqhps, key, value)
        with pytest.raises(CheckpointMismatch, match=f"trained with {key}=.*this configuration has {key}="):
            H.load_vqhps(result.checkpoint, other_cfg, body, vqvae)


def test_resuming_with_other_settings_is_refused(body, vqvae, trained):
    cfg, _, result, kwargs = trained
    with pytest.raises(CheckpointMismatch, match=r"recipe\.lr.*delete"):
        H.train_vqhps(cfg, body, vqvae, name="run", **{**kwargs, "lr": 5e-4})
    with pytest.raises(ValueError, match="unknown VQHPSConfig field"):
        H.train_vqhps(cfg, body, vqvae, name="run", learning_rate=1e-3)


def test_a_training_step_makes_no_tensor_from_host_data(smoke_cfg, body, vqvae, no_host_data):
    """What capturing the step in a CUDA graph (runtime.cuda_graph) needs: after the first steps (the
    token table, lazy set-up), a step only uses tensors already on its device."""
    from vqhps.bench import vqhps_training_rig

    rig = vqhps_training_rig(smoke_cfg, body, vqvae, CPU, global_batch=4, n_images=8)
    for step in range(2):
        rig.step(rig.batch_fn(step), step)
    batch = rig.batch_fn(2)
    keys = set(batch)
    with no_host_data():
        losses = rig.step(batch, 2)
    assert torch.isfinite(losses["loss"]) and not losses["loss"].requires_grad
    # a captured graph reads its static batch: the step must not add keys to it (the token targets)
    assert set(batch) == keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist only on a GPU")
def test_a_training_step_is_captured_in_a_cuda_graph(smoke_cfg, body, vqvae):
    """The GPU side of the test above: after its eager warm-up the step replays one CUDA graph, with
    no fallback warning (a host constant moved to the device would cause one)."""
    import copy
    import warnings

    from vqhps.bench import vqhps_training_rig
    from vqhps.train import replays_graph

    cuda = torch.device("cuda")
    gpu_body = copy.deepcopy(body).to(cuda)
    rig = vqhps_training_rig(smoke_cfg, gpu_body, copy.deepcopy(vqvae).to(cuda), cuda, global_batch=4, n_images=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="training step not captured")
        for step in range(6):
            losses = rig.step(rig.batch_fn(step), step)
    assert replays_graph(rig.step) and torch.isfinite(losses["loss"])


# ------------------------------------------------------------------ "learned nothing" references
def _rot_z(deg: float) -> torch.Tensor:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def test_mean_body_of_two_samples_is_their_average_mesh_at_their_mean_rotation(body, splits):
    """Two training samples turned by +-40 deg about z from Q: their chordal mean is Q (the mean matrix
    diag(cos 40, cos 40, 1) Q has Q as its rotation factor); the mesh is the average of their two."""
    from vqhps.data.datasets import canonical_targets
    from vqhps.geometry import axis_angle_to_matrix, project_to_so3

    Q = axis_angle_to_matrix(torch.tensor([0.3, -1.2, 0.5], dtype=torch.float64))
    two = subset(splits["train"], 2)
    two["root_rot"] = torch.stack((_rot_z(40) @ Q, _rot_z(-40) @ Q)).float().numpy()
    meshes = canonical_targets(body, torch.as_tensor(two["pose"]), torch.as_tensor(two["shape"])).double()
    average = (meshes[0] + meshes[1]) / 2
    torch.testing.assert_close(H.mean_root_rotation(two), Q, atol=1e-6, rtol=0)
    model_fn = H.mean_body_predictor(body, two, CPU, batch_size=1)
    out = model_fn({"image": torch.zeros(3, 3, 8, 8)})  # the image is ignored: 3 identical predictions
    assert out["vertices"].shape == (3, body.n_vertices, 3)
    for i in range(3):
        torch.testing.assert_close(out["canonical"][i].double(), average, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["rotmat"][i].double(), Q, atol=1e-6, rtol=0)
        torch.testing.assert_close(out["vertices"][i].double(), average @ Q.T, atol=1e-5, rtol=0)
    # stored rotations: the SO(3) projection of their mean matrix (det +1, orthonormal, not the mean itself)
    stored = subset(splits["train"], 2)
    R = torch.as_tensor(stored["root_rot"]).double()
    mean_R = H.mean_root_rotation(stored)
    torch.testing.assert_close(mean_R, project_to_so3(R.mean(0)))
    torch.testing.assert_close(mean_R @ mean_R.T, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)
    assert abs(torch.linalg.det(mean_R).item() - 1) < 1e-9
    # batching does not change the mean mesh
    five = subset(splits["train"], 5)
    torch.testing.assert_close(H.mean_canonical_mesh(body, five, CPU, batch_size=2),
                               H.mean_canonical_mesh(body, five, CPU, batch_size=5), atol=1e-6, rtol=0)


def test_rotation_columns_on_a_hand_made_per_sample_frame():
    per_sample = pd.DataFrame({"PVE": [1.0] * 5, "MPJPE": [1.0] * 5, "PA-MPJPE": [1.0] * 5,
                               "rot_err_deg": [10.0, 100.0, 170.0, 90.0, 50.0],
                               "valid": [True, True, False, False, True]})
    summary = H.summarise_with_rotation(per_sample)
    assert set(H.ROTATION_COLUMNS) == {"rot_err_deg", "rot_err_median_deg", "rot_flip_share"}
    full, valid = summary.loc["full"], summary.loc["valid"]
    assert full["rot_err_deg"] == pytest.approx(84.0) and full["rot_err_median_deg"] == pytest.approx(90.0)
    assert full["rot_flip_share"] == pytest.approx(2 / 5)  # 100 and 170; exactly 90 is not a flip
    assert valid["rot_err_deg"] == pytest.approx(160 / 3) and valid["rot_err_median_deg"] == pytest.approx(50.0)
    assert valid["rot_flip_share"] == pytest.approx(1 / 3)
    table = H.metrics_table({"m": summary}, H.ROTATION_COLUMNS)
    assert table.loc[("m", "valid"), "rot_flip_share"] == 0.333 and table.loc[("m", "valid"), "rot_err_deg"] == 53.33
    no_rotation = H.summarise_with_rotation(per_sample.assign(rot_err_deg=np.nan))
    assert no_rotation[list(H.ROTATION_COLUMNS)].isna().all().all()


def test_marginal_token_entropy_hand_computed():
    # position 0 always code 3: 0 nats; position 1 uniform over 4 codes: ln 4; position 2 two codes: ln 2
    table = torch.tensor([[3, 0, 5], [3, 1, 5], [3, 2, 7], [3, 3, 7]])
    assert H.marginal_token_entropy(table[:, :1]) == 0.0
    assert H.marginal_token_entropy(table[:, 1:2]) == pytest.approx(np.log(4))
    assert H.marginal_token_entropy(table) == pytest.approx((0 + np.log(4) + np.log(2)) / 3)
    assert H.marginal_token_entropy(table.numpy()) == H.marginal_token_entropy(table)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        H.marginal_token_entropy(table[None])


def test_token_ce_summary_reads_the_last_validation_ce():
    curves = pd.DataFrame({"run": ["VQ-HPS"] * 4 + ["VQ-HPS-rot"], "step": [1, 2, 3, 4, 5],
                           "val_token_ce": [np.nan, 3.0, np.nan, 2.5, np.nan]})
    row = H.token_ce_summary(curves, 4.0).loc["VQ-HPS"]
    assert row["val_token_ce_nats"] == 2.5 and row["margin_nats"] == pytest.approx(1.5) and row["margin_ge_1_nat"]
    assert not H.token_ce_summary(curves, 3.0).loc["VQ-HPS", "margin_ge_1_nat"]


def test_validation_logs_the_token_cross_entropy_of_the_final_model(body, vqvae, trained):
    """val_token_ce, logged with val_PVE after each epoch, is the cross-entropy of the model's logits
    against the Mesh-VQ-VAE's ids of the validation meshes (recomputed here for the last one)."""
    cfg, model, result, kwargs = trained
    rows = [r for r in result.history if "val_PVE" in r]
    assert len(rows) == 3 and all(np.isfinite(r["val_token_ce"]) and r["val_token_ce"] > 0 for r in rows)
    val = kwargs["val_arrays"]
    ids = H.token_table(vqvae, body, val, CPU)[:, 0]
    with torch.no_grad():
        logits = torch.cat([model(b["image"])["logits"] for b in H.iterate_split(val, body, cfg, CPU, progress=False)])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))
    assert rows[-1]["val_token_ce"] == pytest.approx(expected.item(), rel=1e-4)
    assert {"val_rot_err_median_deg", "val_rot_flip_share"} <= set(rows[-1])


def test_learning_curves_draw_validation_ce_and_the_entropy_line():
    import matplotlib

    matplotlib.use("Agg")
    curves = pd.DataFrame({"run": ["VQ-HPS"] * 3, "step": [1, 2, 3], "ce": [5.0, 4.0, 3.0],
                           "val_token_ce": [np.nan, 4.5, 3.5]})
    fig = H.learning_curves_figure(curves, references={"val_token_ce": {"marginal entropy": 4.2}})
    ce_axis = fig.axes[0]
    labels = [line.get_label() for line in ce_axis.get_lines()]
    assert labels == ["VQ-HPS ce", "VQ-HPS val_token_ce", "marginal entropy (4.20)"]
    assert list(ce_axis.get_lines()[1].get_ydata()) == [4.5, 3.5]
    assert set(ce_axis.get_lines()[2].get_ydata()) == {4.2}
    assert all(len(ax.get_lines()) == 0 for ax in fig.axes[1:])  # the other panels: no such column, no line
