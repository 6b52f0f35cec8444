"""Token-sampling uncertainty and the failure-case analysis: sampling follows the tempered softmax,
the spread is the mean distance to the mean (mm), Spearman's rho has its textbook values and
invariances, the written analysis quotes its inputs, and the figures are written."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from vqhps import failures, figures_eval, hps_training as hps, uncertainty as unc
from vqhps.config import UncertaintyConfig

#: one intra-op thread for this module only (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- sampling
def test_zero_temperature_and_top1_give_the_argmax():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    argmax = logits.argmax(-1)
    for kwargs in ({"temperature": 0.0}, {"top_k": 1}, {"temperature": 2.0, "top_k": 1}):
        ids = unc.sample_tokens(logits, 4, **kwargs)
        assert ids.shape == (4, 3, 5) and ids.dtype == torch.long
        assert torch.equal(ids, argmax.expand(4, 3, 5))


@pytest.mark.parametrize("temperature, p1", [(1.0, 0.75), (2.0, math.sqrt(3) / (1 + math.sqrt(3))), (0.5, 0.9)])
def test_frequencies_follow_the_tempered_softmax(temperature, p1):
    # two codes with logits 0 and ln 3: softmax(l / T) gives code 1 the probability 3^(1/T) / (1 + 3^(1/T))
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    k = 40_000
    ids = unc.sample_tokens(logits, k, temperature, generator=torch.Generator().manual_seed(0))
    freq = ids.float().mean().item()
    assert abs(freq - p1) < 4 * math.sqrt(p1 * (1 - p1) / k) + 1e-3


def test_top_k_keeps_only_the_likeliest_codes():
    # logits ln 1, ln 2, ln 3 and top_k = 2: code 0 is never drawn, codes 1 and 2 with 2/5 and 3/5
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0]]]))
    ids = unc.sample_tokens(logits, 40_000, top_k=2, generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(ids.flatten(), minlength=3).double() / ids.numel()
    assert counts[0] == 0
    assert abs(counts[2].item() - 0.6) < 0.01


def test_sampling_is_seeded_and_runs_in_fp32_on_half_logits():
    logits = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    a = unc.sample_tokens(logits, 5, generator=torch.Generator().manual_seed(7))
    b = unc.sample_tokens(logits, 5, generator=torch.Generator().manual_seed(7))
    c = unc.sample_tokens(logits, 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    half = unc.sample_tokens(logits.bfloat16(), 5, generator=torch.Generator().manual_seed(7))
    assert half.shape == (5, 2, 6)


def test_bad_sampling_arguments_are_refused():
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="at least 1"):
        unc.sample_tokens(logits, 0)
    with pytest.raises(ValueError, match="temperature"):
        unc.sample_tokens(logits, 2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"\(B, N, S\)"):
        unc.sample_tokens(torch.zeros(2, 3), 2)


# ---------------------------------------------------------------------------------------- spread
def test_spread_is_zero_for_identical_samples():
    mesh = torch.randn(1, 2, 10, 3)
    assert torch.equal(unc.vertex_spread(mesh.expand(5, 2, 10, 3)), torch.zeros(2, 10, dtype=torch.float64))
    # a rigid shift of one sample is removed by the centring
    shifted = torch.cat([mesh, mesh + torch.tensor([0.1, -0.2, 0.3])])
    assert torch.allclose(unc.vertex_spread(shifted), torch.zeros(2, 10, dtype=torch.float64), atol=1e-3)  # float32 input


#: two 2-vertex meshes: after centring A = (-1,0,0), (1,0,0) and B = (0,-1,0), (0,1,0) metres
MESH_A = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
MESH_B = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])


def test_spread_hand_computed():
    # mean of the centred meshes: (-0.5, -0.5, 0) and (0.5, 0.5, 0); every sample is sqrt(0.5) m from it
    spread = unc.vertex_spread(torch.stack([MESH_A, MESH_B])[:, None])
    assert torch.allclose(spread, torch.full((1, 2), 1000 * math.sqrt(0.5), dtype=torch.float64))
    # without centring, vertex 0 does not move and vertex 1 is sqrt(2) m from its mean
    raw = unc.vertex_spread(torch.stack([MESH_A, MESH_B])[:, None], centre=False)
    assert torch.allclose(raw, torch.tensor([[0.0, 1000 * math.sqrt(2.0)]], dtype=torch.float64))


class _TwoMeshVQVAE:
    """A one-token 'Mesh-VQ-VAE' whose code 0 decodes to MESH_A and every other code to MESH_B."""

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where((ids[:, :1, None] == 0), MESH_A, MESH_B)


def test_token_spread_decodes_every_sample_of_every_image():
    # image 0: codes 0 and 1 equally likely; image 1: always code 1 (its spread must be exactly 0)
    logits = torch.tensor([[[0.0, 0.0]], [[float("-inf"), 0.0]]])
    ts = unc.token_spread(_TwoMeshVQVAE(), logits, 50, generator=torch.Generator().manual_seed(0))
    assert ts.ids.shape == (50, 2, 1) and ts.vertex.shape == (2, 2) and ts.spread.shape == (2,)
    p = (ts.ids[:, 0, 0] == 0).double().mean().item()
    assert 0 < p < 1
    # a share p of A and 1 - p of B: mean distance to the mean is 2 p (1 - p) |A - B| = 2 p (1 - p) sqrt(2) m
    expected = 1000 * 2 * p * (1 - p) * math.sqrt(2.0)
    assert np.allclose(ts.vertex[0].numpy(), expected, rtol=1e-5)
    assert ts.spread[1].item() == 0.0 and torch.equal(ts.ids[:, 1, 0], torch.ones(50, dtype=torch.long))


class _RowNoiseVQVAE:
    """Decodes code 0 to MESH_A and 1 to MESH_B, plus rounding-size noise that depends on the row of the
    batch (as a batched matrix product may), and counts the meshes it decoded."""

    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        self.decoded += len(ids)
        meshes = _TwoMeshVQVAE().decode(ids)
        row, vertex = torch.meshgrid(torch.arange(len(ids)), torch.arange(meshes.shape[1]), indexing="ij")
        return meshes + 1e-6 * (row * vertex)[..., None]  # not rigid: centring does not remove it


def test_equal_token_sequences_decode_once_and_spread_exactly_zero():
    vqvae = _RowNoiseVQVAE()
    ids = torch.tensor([[[0], [1]], [[0], [1]], [[0], [0]]])  # (K=3, B=2, N=1): image 0 always code 0
    ts = unc.spread_of_ids(vqvae, ids)
    assert vqvae.decoded == 2  # two distinct sequences among the six samples
    assert ts.spread[0].item() == 0.0
    # image 1: two samples of B, one of A; the noise cannot tell equal samples apart
    expected = 1000 * 2 * (1 / 3) * (2 / 3) * math.sqrt(2.0)
    assert np.allclose(ts.vertex[1].numpy(), expected, rtol=1e-5)
    assert torch.allclose(ts.mean_mesh[0], MESH_A - MESH_A.mean(0))


# ---------------------------------------------------------------------------------------- ranks
def test_spearman_hand_computed_with_ties():
    # ranks of x with the tie averaged: 1, 2.5, 2.5, 4; of y: 1, 3, 2, 4 -> rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert unc.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert unc.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(unc.spearman([1, 1, 1], [1, 2, 3]))
    assert unc.spearman([1, 2, np.nan, 3], [1, 2, 9, 3]) == pytest.approx(1.0)  # NaN pairs dropped


def test_spearman_is_invariant_to_monotone_transforms():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.normal(size=200)
    y = y + 0.5 * x
    rho = unc.spearman(x, y)
    assert unc.spearman(np.exp(x), y ** 3 + 5) == pytest.approx(rho, abs=1e-12)
    assert unc.spearman(-x, y) == pytest.approx(-rho, abs=1e-12)
    from scipy.stats import spearmanr  # already a dependency: an independent reference

    assert rho == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def _frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pve = rng.uniform(50, 400, n)
    return pd.DataFrame({
        "index": np.arange(n), "spread": pve / 10 + rng.normal(0, 3, n), "PVE": pve,
        "MPJPE": pve * 0.8, "PA-MPJPE": rng.uniform(40, 120, n), "rot_err_deg": rng.uniform(0, 180, n),
        "valid": rng.random(n) < 0.6, "light": rng.integers(0, 3, n), "occlusion": rng.choice([0.0, 0.1, 0.5], n),
        "in_frame": rng.random(n) < 0.8, "yaw": rng.uniform(-180, 180, n), "subject": np.zeros(n, int)})


def test_spearman_table_rows_and_values():
    df = _frame()
    table = unc.spearman_table(df)
    assert list(table.index) == ["full", "valid"] and list(table.columns) == [*unc.ERROR_COLUMNS, "n"]
    assert table.loc["full", "n"] == len(df) and table.loc["valid", "n"] == int(df["valid"].sum())
    v = df[df["valid"]]
    assert table.loc["valid", "PVE"] == pytest.approx(unc.spearman(v["spread"], v["PVE"]))
    # PVE and MPJPE are a monotone function of each other here: the same rho
    assert table.loc["full", "PVE"] == pytest.approx(table.loc["full", "MPJPE"])
    with pytest.raises(KeyError, match="spread"):
        unc.spearman_table(df.drop(columns="spread"))


# ---------------------------------------------------------------------------------------- failure tables
def test_error_by_condition_and_flips():
    df = _frame(60, 1)
    table = failures.error_by_condition(df)
    light = table.loc["lighting"]
    assert list(light.index) == ["normal", "dim", "harsh"]
    assert light["n"].sum() == len(df) and table.loc["framing", "n"].sum() == len(df)
    dim = df[df["light"] == 1]
    assert light.loc["dim", "PVE"] == pytest.approx(dim["PVE"].mean())
    assert light.loc["dim", "flip_%"] == pytest.approx(100 * (dim["rot_err_deg"] > 90).mean())
    heavy = table.loc["occlusion"].iloc[2]
    assert heavy["n"] == int((df["occlusion"] >= 0.3).sum())
    worst = failures.worst_cases(df, 5)
    assert list(worst["PVE"]) == sorted(df["PVE"], reverse=True)[:5]


def test_analysis_text_quotes_its_numbers():
    df = _frame(50, 2)
    table = unc.spearman_table(df)
    text = failures.failure_analysis_markdown(df, "VQ-HPS-rot", n_worst=4, spearman=table)
    flip = df["rot_err_deg"] > failures.ROT_FLIP_DEG
    for number in (f"{df['PVE'].mean():.1f}", f"{df.loc[df['valid'], 'PVE'].mean():.1f}",
                   f"{100 * flip.mean():.1f}%", f"{df.loc[flip, 'PVE'].mean():.1f}",
                   f"{table.loc['full', 'PVE']:.2f}", f"{table.loc['valid', 'PA-MPJPE']:.2f}",
                   f"{df[df['light'] == 2]['PVE'].mean():.1f}", f"{df['PVE'].max():.1f}"):
        assert number in text, number
    assert "VQ-HPS-rot on 50 test images" in text
    # another frame gives other numbers
    assert failures.failure_analysis_markdown(_frame(50, 3)) != failures.failure_analysis_markdown(df)


# ---------------------------------------------------------------------------------------- figures
def _is_png(path) -> bool:
    from PIL import Image

    with open(path, "rb") as f:
        head = f.read(8)
    with Image.open(path) as img:
        return head == b"\x89PNG\r\n\x1a\n" and img.size[0] > 50 and img.size[1] > 50


def test_figures_are_written_as_pngs(tmp_path, body):
    # ``body``: anny imports triton, which crashes when loaded after an OpenGL (llvmpipe) context
    from vqhps.figures import save_figure

    df = _frame(40, 4)
    # a tetrahedron stands in for the body in the per-vertex spread panels
    verts = np.array([[0, 0, 0], [0.5, 0, 0], [0, 1.0, 0], [0, 0, 0.5]], np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    examples = {int(i): {"vertex_spread": np.array([1.0, 2.0, 3.0, 4.0]) * (k + 1), "canonical": verts,
                         "spread": 2.5 * (k + 1)} for k, i in enumerate(unc.pick_examples(df, 2))}
    figs = {"rot": failures.rotation_error_figure({"a": df, "b": df.assign(rot_err_deg=df["rot_err_deg"] / 2)}),
            "cond": failures.error_by_condition_figure(df),
            "unc": unc.uncertainty_figure(df, unc.spearman_table(df), examples, faces, render_size=64)}
    for name, fig in figs.items():
        path = save_figure(fig, tmp_path, name)
        assert path.stat().st_size > 1000 and _is_png(path)


def test_pick_examples_span_the_spread():
    df = _frame(11, 5)
    picked = unc.pick_examples(df, 3)
    order = df.sort_values("spread")["index"].tolist()
    assert picked == [order[0], order[5], order[10]]


# ---------------------------------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def tiny_model(smoke_artifacts):
    """A small, untrained VQ-HPS for the smoke body and Mesh-VQ-VAE, with a few test images."""
    from vqhps.body_setup import setup_body
    from vqhps.data import synthetic
    from vqhps.hps_training import build_vqhps, vqhps_config
    from vqhps.vqvae_training import load_mesh_vqvae

    cfg = smoke_artifacts
    body = setup_body(cfg)
    vqvae = load_mesh_vqvae(cfg, body, "finetune")
    torch.manual_seed(0)
    hcfg = vqhps_config(cfg, d_model=32, n_heads=2, mlp_hidden=32, rot_hidden=32)
    model = build_vqhps(hcfg, body, vqvae).eval()
    arrays = {k: v[:6] for k, v in synthetic.load_split(cfg, "test").items()}
    return cfg, body, vqvae, model, arrays


def test_spread_vs_error_on_a_model(tiny_model, tmp_path):
    from vqhps.figures import save_figure
    from vqhps.hps_training import evaluate_split, vqhps_predictor

    cfg, body, vqvae, model, arrays = tiny_model
    device = torch.device("cpu")
    ucfg = UncertaintyConfig(samples=3)
    frame = unc.spread_vs_error(model, vqvae, body, arrays, cfg, device, ucfg, batch_size=4, progress=False)
    assert list(frame.columns[:3]) == ["index", "spread", "PVE"] and len(frame) == 6
    assert (frame["spread"] > 0).all()
    # the prediction is VQ-HPS's own: the same metrics as the evaluation of model.predict
    reference, _ = evaluate_split(vqhps_predictor(vqvae, body)(model), arrays, body, cfg, device, 4, progress=False)
    pd.testing.assert_frame_equal(frame.drop(columns="spread"), reference)
    # the same seeds give the same spreads; re-running two images alone reproduces them
    again = unc.spread_vs_error(model, vqvae, body, arrays, cfg, device, ucfg, batch_size=4, progress=False)
    assert np.array_equal(frame["spread"], again["spread"])
    examples = unc.spread_examples(model, vqvae, body, arrays, [5, 1], cfg, device, ucfg, batch_size=4)
    assert list(examples) == [5, 1]
    for i, ex in examples.items():
        assert ex["vertex_spread"].shape == (body.n_vertices,) and ex["canonical"].shape == (body.n_vertices, 3)
        assert ex["spread"] == pytest.approx(float(frame.loc[frame["index"] == i, "spread"].iloc[0]), rel=1e-4)
    # the example meshes are the argmax predictions
    two = {k: np.asarray(v)[[5, 1]] for k, v in arrays.items()}
    argmax = hps.predict_split(vqhps_predictor(vqvae, body)(model), two, body, cfg, device, keys=("canonical",),
                               progress=False)["canonical"]
    assert np.allclose(examples[5]["canonical"], argmax[0].numpy(), atol=1e-5)
    # without randomness there is no spread
    cold = unc.spread_vs_error(model, vqvae, body, arrays, cfg, device, UncertaintyConfig(samples=3, temperature=0.0),
                               batch_size=4, progress=False)
    assert (cold["spread"] == 0).all()
    # the worst-case figure renders the prediction and the ground truth over each crop
    cases = failures.worst_cases(frame, 2)
    preds, truth = figures_eval.predict_samples({"VQ-HPS": vqhps_predictor(vqvae, body)(model)}, arrays,
                                                cases["index"].tolist(), body, cfg, device)
    assert preds["VQ-HPS"]["vertices"].shape == truth["vertices"].shape == (2, body.n_vertices, 3)
    faces = np.asarray(body.faces)
    path = save_figure(failures.worst_cases_figure(cases, arrays, preds["VQ-HPS"], truth, faces), tmp_path, "worst")
    assert _is_png(path)


def test_oriented_prediction_equals_predict(tiny_model):
    cfg, body, vqvae, model, arrays = tiny_model
    from vqhps.demo import to_network_input

    images = torch.cat([to_network_input(arrays["image"][i]) for i in range(2)])
    with torch.no_grad():
        got = unc.oriented_prediction(model(images, vqvae, body))
        want = model.predict(images, vqvae, body)
    for key in ("vertices", "canonical", "rotmat", "cam", "ids"):
        assert torch.equal(got[key], want[key]), key


def test_typical_case_is_the_median_valid_image():
    df = pd.DataFrame({"index": [10, 11, 12, 13, 14], "PVE": [5.0, 1.0, 3.0, 2.0, 100.0],
                       "valid": [True, True, True, False, False]})
    assert failures.typical_case(df) == 12  # valid PVEs 1, 3, 5: the median is image 12
    assert failures.typical_case(df.assign(valid=False)) == 12  # none valid: median of all (1, 2, 3, 5, 100)
