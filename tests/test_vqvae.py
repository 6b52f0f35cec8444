"""Mesh-VQ-VAE: EMA codebook arithmetic, straight-through gradients, the public encode/decode API,
usage statistics, dead-code restarts and a short training run that must reduce the loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import trimesh

from vqhps.config import VQVAEConfig
from vqhps.mesh.hierarchy import build_hierarchy
from vqhps.vqvae import EMAQuantizer, MeshVQVAE

SMALL = dict(channels=(16, 32, 64), readout_hidden=256)  # narrower than the full profile: the tests need no width


@pytest.fixture(scope="module")
def sphere():
    s = trimesh.creation.icosphere(subdivisions=3)
    h = build_hierarchy(s.vertices, s.faces, level_sizes=(200, 100, 54))
    return torch.tensor(s.vertices, dtype=torch.float32), h


def _model(sphere, **cfg) -> MeshVQVAE:
    template, h = sphere
    return MeshVQVAE(template, h, VQVAEConfig(**{**SMALL, **cfg}), body_id="test-sphere")


def _deformed(template: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Spheres with random anisotropic scaling and smooth sinusoidal bumps, centred."""
    scale = 0.7 + 0.6 * torch.rand(n, 1, 3, generator=gen)
    freq = torch.randint(1, 3, (n, 1, 3), generator=gen).float()
    amp = 0.15 * torch.rand(n, 1, 3, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 1, 3, generator=gen)
    x = template * scale + amp * torch.sin(freq * math.pi * template.roll(1, dims=1) + phase)
    return x - x.mean(dim=1, keepdim=True)


# --------------------------------------------------------------------------- quantiser
def test_ema_update_matches_hand_computation():
    decay, eps = 0.9, 1e-5
    q = EMAQuantizer(codebook_size=2, dim=2, decay=decay, commitment=0.25, dead_code_threshold=0.0, eps=eps)
    codes = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    q.set_codebook(codes)
    z = torch.tensor([[0.1, 0.0], [0.0, -0.1], [0.9, 1.2]])
    out = q.train()(z)

    assert out.ids.tolist() == [0, 0, 1]
    torch.testing.assert_close(out.zq, codes[[0, 0, 1]])  # quantised with the codes before the update
    commit = 0.25 * ((z - codes[[0, 0, 1]]) ** 2).mean()
    torch.testing.assert_close(out.loss, commit)

    # by hand: counts (2, 1), sums ((0.1, -0.1), (0.9, 1.2)); EMAs start from size 1 and sum = code
    size = [decay * 1 + (1 - decay) * 2, decay * 1 + (1 - decay) * 1]  # 1.1, 1.0
    total = size[0] + size[1]
    summed = [[decay * 0.0 + (1 - decay) * 0.1, decay * 0.0 + (1 - decay) * -0.1],
              [decay * 1.0 + (1 - decay) * 0.9, decay * 1.0 + (1 - decay) * 1.2]]
    smooth = [(s + eps) / (total + 2 * eps) * total for s in size]
    expected = torch.tensor([[summed[i][j] / smooth[i] for j in range(2)] for i in range(2)])
    torch.testing.assert_close(q.cluster_size, torch.tensor(size))
    torch.testing.assert_close(q.embed_sum, torch.tensor(summed))
    torch.testing.assert_close(q.embed, expected)


def test_eval_mode_never_updates_codebook():
    q = EMAQuantizer(codebook_size=4, dim=3).eval()
    before = q.embed.clone()
    q(torch.randn(10, 3))
    assert torch.equal(q.embed, before) and not bool(q.initialised)


def test_perplexity_and_usage_statistics():
    q = EMAQuantizer(codebook_size=4, dim=2, dead_code_threshold=0.0)
    codes = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    q.set_codebook(codes)
    one = q.eval()(torch.zeros(8, 2))
    assert one.perplexity.item() == pytest.approx(1.0)
    assert one.counts.tolist() == [8, 0, 0, 0]
    spread = q(codes.repeat(3, 1))
    assert spread.perplexity.item() == pytest.approx(4.0, rel=1e-5)
    assert q.usage().sum().item() == pytest.approx(1.0)
    q.train()(torch.zeros(64, 2))  # everything on code 0: EMA usage shifts there
    usage = q.usage()
    assert usage[0] > usage[1:].max() and 1.0 <= q.codebook_perplexity().item() < 4.0


def test_dead_codes_restart_on_current_inputs_deterministically():
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        q = EMAQuantizer(codebook_size=8, dim=3, decay=0.5, dead_code_threshold=0.05).train()
        q.set_codebook(torch.cat([torch.zeros(1, 3), 100.0 + torch.arange(21.0).reshape(7, 3)]))
        z = 0.1 * torch.randn(64, 3)
        restarted = sum(q(z).n_restarted for _ in range(5))
        assert restarted >= 7
        # restarted codes now sit on inputs, far from where they were
        dist = torch.cdist(q.embed, z).min(dim=1).values
        assert dist.max() < 0.5
        return q.embed.clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_a_restart_moves_only_dead_codes_each_onto_its_own_input():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=8, dim=3, decay=0.5, dead_code_threshold=0.05).train()
    q.set_codebook(torch.cat([torch.zeros(1, 3), 100.0 + torch.arange(21.0).reshape(7, 3)]))
    z = 0.1 * torch.randn(64, 3)
    # every input picks code 0: EMA sizes 32.5 and 7 x 0.5 (usage 0.5 / 36 < 0.05), sums 32 mean(z) and 0
    out = q(z)
    assert int(out.n_restarted) == 7
    smoothed = (32.5 + 1e-5) / (36 + 8e-5) * 36
    torch.testing.assert_close(q.embed[0], 32 * z.mean(0) / smoothed)
    rows = [int((z - code).abs().sum(1).argmin()) for code in q.embed[1:]]
    assert all(torch.equal(q.embed[1 + i], z[r]) for i, r in enumerate(rows))
    assert len(set(rows)) == 7  # distinct inputs
    assert q.cluster_size[1:].tolist() == pytest.approx([36 / 8] * 7)  # the mean size


def test_a_zero_threshold_restarts_no_code_however_unused():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=8, dim=3, decay=0.5, dead_code_threshold=0.0).train()
    q.set_codebook(torch.cat([torch.zeros(1, 3), 100.0 + torch.arange(21.0).reshape(7, 3)]))
    z = 0.1 * torch.randn(64, 3)
    restarted = sum(int(q(z).n_restarted) for _ in range(5))
    # every input picks code 0; the seven unused codes stay where they were, far from every input
    # (the EMA's Laplace smoothing moves them by less than 0.1%)
    assert restarted == 0 and q.usage()[1:].max() < 0.05
    torch.testing.assert_close(q.embed[1:], 100.0 + torch.arange(21.0).reshape(7, 3), rtol=1e-3, atol=0)
    assert torch.cdist(q.embed[1:], z).min() > 100


def test_loading_an_uninitialised_state_initialises_from_the_next_batch_again():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=16, dim=3).train()
    q(torch.randn(40, 3))
    q.load_state_dict(EMAQuantizer(codebook_size=16, dim=3).state_dict())
    z = torch.randn(40, 3) - 7.0
    q(z)
    assert bool(q.initialised) and torch.cdist(q.embed, z).min(dim=1).values.max() < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation exists only with a GPU")
def test_a_training_step_never_waits_for_the_gpu(sphere):
    torch.manual_seed(0)
    model = _model(sphere).cuda().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [_deformed(sphere[0], 8, gen).cuda() for _ in range(3)]
    model(batches[0])  # the first batch initialises the codebook (one read of its flag)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for verts in batches[1:]:
            out = model(verts)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist only on a GPU")
def test_a_graphed_training_step_trains_to_the_eager_weights(sphere):
    from vqhps.train import GraphedTrainStep, replays_graph, train_step
    from vqhps.vqvae_training import parameter_groups, training_loss

    # 16 meshes x 54 tokens >= 512 codes: the codebook starts from distinct inputs, so no two codes
    # tie and the atomic adds' rounding cannot flip an assignment between eager and graphed runs
    gen = torch.Generator().manual_seed(0)
    batches = [{"verts": _deformed(sphere[0], 16, gen).cuda()} for _ in range(8)]

    def setup():
        torch.manual_seed(0)
        model = _model(sphere, readout_hidden=16).cuda().train()
        opt = torch.optim.Adam(parameter_groups(model, 1e-3, 0.1), lr=1e-3, fused=True)
        # momentum held fixed: a graph replays every setting but the learning rate as captured
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-3, 1e-4], total_steps=len(batches),
                                                    cycle_momentum=False)
        return model, opt, sched, {k: v.clone() for k, v in model.state_dict().items()}

    eager, opt_e, sched_e, start = setup()
    eager_losses = []
    for step, batch in enumerate(batches):  # 3 eager warm-up steps, the captured one, 4 replays
        torch.manual_seed(step)  # as the training loop does: the dead-code restarts draw from it
        losses = train_step(eager, eager, opt_e, sched_e, batch, training_loss, step, amp=False)
        eager_losses.append(losses["loss"].item())
    graphed, opt_g, sched_g, _ = setup()
    step_fn = GraphedTrainStep(graphed, graphed, opt_g, sched_g, training_loss, amp=False)
    graphed_losses = []
    for step, batch in enumerate(batches):
        torch.manual_seed(step)
        graphed_losses.append(step_fn(batch, step)["loss"].item())
    assert replays_graph(step_fn) and step_fn.failed is None
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-3)
    # every tensor took the eager run's path: a stale learning rate or a step left out of the graph
    # would leave it a large part of its update away
    for name, a in eager.state_dict().items():
        b, a0 = graphed.state_dict()[name], start[name]
        if a.is_floating_point():
            assert (b - a).norm() <= 0.02 * (a - a0).norm() + 1e-6, name
        else:
            assert torch.equal(a, b), name


def test_first_training_batch_initialises_codebook():
    torch.manual_seed(0)
    q = EMAQuantizer(codebook_size=16, dim=3).train()
    z = torch.randn(40, 3) + 7.0
    q(z)
    assert bool(q.initialised)
    assert torch.cdist(q.embed, z).min(dim=1).values.max() < 1.0


# --------------------------------------------------------------------------- model
def test_public_api_shapes(sphere):
    torch.manual_seed(0)
    model = _model(sphere).eval()
    template, h = sphere
    verts = _deformed(template, 3, torch.Generator().manual_seed(0))
    ids = model.encode(verts)
    assert ids.shape == (3, 54) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 512
    assert model.encode_latent(verts).shape == (3, 54, 9)
    assert model.decode(ids).shape == (3, len(template), 3)
    assert model.codebook.shape == (512, 9)
    assert model.n_tokens == 54 and model.codebook_size == 512
    out = model(verts)
    assert set(out) >= {"recon", "ids", "loss", "recon_loss", "vq_loss", "perplexity"}
    assert torch.equal(out["ids"], ids)
    torch.testing.assert_close(out["recon"], model.decode(ids))
    meta = model.checkpoint_meta()
    assert meta["body_id"] == "test-sphere" and meta["hierarchy_hash"] == h.hash
    assert meta["config"]["codebook_size"] == 512
    assert meta["architecture"] == {"channels": (16, 32, 64), "latent_dim": 9, "codebook_size": 512,
                                    "n_basis": 9, "residual_rate": 0.5, "bottleneck_layers": 1,
                                    "linear_readout": True, "readout_hidden": 256, "readout_layers": 1,
                                    "linear_encoder": False}


def test_decode_latent_is_differentiable(sphere):
    model = _model(sphere)
    zq = model.codebook[torch.zeros(2, 54, dtype=torch.long)].clone().requires_grad_()
    model.decode_latent(zq).sum().backward()
    assert zq.grad is not None and zq.grad.abs().sum() > 0


def test_straight_through_gradient_reaches_encoder(sphere):
    torch.manual_seed(0)
    model = _model(sphere).train()
    verts = _deformed(sphere[0], 4, torch.Generator().manual_seed(1))
    out = model(verts)
    out["recon_loss"].backward()  # no commitment term: only the straight-through path links encoder
    # the bottleneck layer starts with zero coefficients, so its basis only learns once they move
    idle = {n.rsplit(".", 1)[0] for n, p in model.encoder.named_parameters() if n.endswith("coeff") and not p.any()}
    assert idle == {f"layers.{len(model.encoder.layers) - 1}"}
    for name, p in model.encoder.named_parameters():
        if name.endswith(".basis") and name.rsplit(".", 1)[0] in idle:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_recon_loss_is_mean_vertex_distance(sphere):
    model = _model(sphere).eval()
    verts = _deformed(sphere[0], 2, torch.Generator().manual_seed(2))
    out = model(verts)
    expected = (out["recon"] - verts).pow(2).sum(-1).sqrt().mean()
    torch.testing.assert_close(out["recon_loss"], expected)
    torch.testing.assert_close(out["loss"], out["recon_loss"] + out["vq_loss"])


def test_reconstruct_without_quantisation_decodes_the_continuous_latent(sphere):
    from vqhps.vqvae_training import reconstruct

    torch.manual_seed(0)
    model = _model(sphere).eval()
    verts = _deformed(sphere[0], 5, torch.Generator().manual_seed(3))
    z = model.encode_latent(verts)
    quantised, ids = reconstruct(model, verts, batch_size=2)
    continuous, ids_c = reconstruct(model, verts, batch_size=2, quantise=False)
    torch.testing.assert_close(continuous, model.decode_latent(z))
    torch.testing.assert_close(quantised, model.decode(model.encode(verts)))
    assert torch.equal(ids, ids_c)
    assert (quantised - continuous).abs().max() > 1e-4  # a random codebook is far from the latents
    # with every latent in the codebook, quantising changes nothing
    model.quantizer.set_codebook(torch.cat([z.reshape(-1, 9), torch.randn(512 - 5 * 54, 9) + 100.0]))
    quantised, _ = reconstruct(model, verts, batch_size=2)
    torch.testing.assert_close(quantised, continuous)


def test_reconstruction_summary_is_the_mean_vertex_distance_with_and_without_the_codebook(sphere):
    from vqhps.vqvae_training import reconstruction_summary

    torch.manual_seed(0)
    model = _model(sphere).eval()
    verts = _deformed(sphere[0], 5, torch.Generator().manual_seed(3))
    regressor = torch.softmax(torch.randn(17, len(sphere[0])), dim=1)
    rec = reconstruction_summary(model, verts, regressor, batch_size=2)
    with torch.no_grad():
        quantised, continuous = model.decode(model.encode(verts)), model.decode_latent(model.encode_latent(verts))

    def pve_mm(recon):  # by hand: both meshes centred on their vertex mean
        centred = lambda m: m - m.mean(1, keepdim=True)  # noqa: E731
        return 1000.0 * torch.linalg.vector_norm(centred(recon) - centred(verts), dim=-1)

    assert rec.summary["PVE_mm"] == pytest.approx(pve_mm(quantised).mean().item(), rel=1e-5)
    assert rec.summary["PVE_continuous_mm"] == pytest.approx(pve_mm(continuous).mean().item(), rel=1e-5)
    joints = lambda m: regressor @ (m - m.mean(1, keepdim=True))  # noqa: E731
    mpjpe = 1000.0 * torch.linalg.vector_norm(joints(quantised) - joints(verts), dim=-1).mean()
    assert rec.summary["MPJPE_mm"] == pytest.approx(mpjpe.item(), rel=1e-5)
    assert rec.per_vertex.shape == (5, len(sphere[0])) and rec.ids.shape == (5, 54)
    torch.testing.assert_close(rec.recon, quantised)


def test_evaluate_vae_command_writes_both_stages_and_names_a_missing_checkpoint(smoke_artifacts, body, tmp_path,
                                                                                monkeypatch, capsys):
    import pandas as pd

    from vqhps.cli import main
    from vqhps.vqvae_training import evaluation_meshes, load_mesh_vqvae, reconstruction_summary

    monkeypatch.setenv("VQHPS_RESULTS_DIR", str(smoke_artifacts.paths.results))
    assert main(["evaluate-vae", "--profile", "smoke", "--corpus-meshes", "10"]) == 0
    table = pd.read_csv(smoke_artifacts.results_dir / "tables" / "vae_reconstruction.csv")
    n_test, n_val = smoke_artifacts.data.n_test, smoke_artifacts.data.n_val
    assert list(zip(table.stage, table.meshes, table.n_meshes)) == [
        ("pretrain", "test", n_test), ("pretrain", "val", n_val), ("pretrain", "corpus_train", 10),
        ("finetune", "test", n_test), ("finetune", "val", n_val), ("finetune", "corpus_train", 10)]
    meshes = evaluation_meshes(smoke_artifacts, body, splits=("test", "val"))
    model = load_mesh_vqvae(smoke_artifacts, body, "finetune")
    for split in ("test", "val"):
        expected = reconstruction_summary(model, meshes[split], body.regressor17)
        row = table[(table.stage == "finetune") & (table.meshes == split)].iloc[0]
        for key, value in expected.summary.items():
            assert row[key] == pytest.approx(value, rel=1e-4)
    capsys.readouterr()
    monkeypatch.setenv("VQHPS_RESULTS_DIR", str(tmp_path))
    assert main(["evaluate-vae", "--profile", "smoke", "--stages", "finetune"]) == 2
    err = capsys.readouterr().err
    assert "mesh_vqvae_finetune.pt" in err and "python -m vqhps train-vae --profile smoke --stage finetune" in err


def test_template_mismatch_is_refused(sphere):
    template, h = sphere
    with pytest.raises(ValueError, match="vertices"):
        MeshVQVAE(template[:-1], h, VQVAEConfig(**SMALL))
    with pytest.raises(ValueError, match="channels"):
        MeshVQVAE(template, h, VQVAEConfig(channels=(16, 32)))


def test_bottleneck_conv_starts_as_its_residual_then_reads_every_token():
    from vqhps.vqvae import bottleneck_conv

    torch.manual_seed(0)
    conv = bottleneck_conv(6, 4, 4, n_basis=3, residual_rate=0.5)
    with torch.no_grad():
        conv.bias.copy_(torch.arange(4.0))
    x = torch.randn(2, 6, 4)
    # zero coefficients: ELU(sqrt(1 - r) * bias + sqrt(r) * x), every token on its own
    expected = torch.nn.functional.elu(math.sqrt(0.5) * torch.arange(4.0) + math.sqrt(0.5) * x)
    torch.testing.assert_close(conv(x), expected)
    with torch.no_grad():
        conv.coeff.normal_()
    moved = x.clone()
    moved[:, 0] += 1.0
    changed = (conv(moved) - conv(x)).abs().amax(dim=(0, 2))
    assert bool((changed > 1e-4).all()), changed  # one token reaches all six outputs


def test_bottleneck_layers_add_all_to_all_convs_on_both_sides(sphere):
    from vqhps.mesh.conv import MeshConv

    authors, ours = _model(sphere, bottleneck_layers=0, linear_readout=False), _model(sphere, bottleneck_layers=2)
    n_levels = sphere[1].n_levels
    assert len(authors.encoder.layers) == len(authors.decoder.layers) == n_levels + 1
    assert len(ours.encoder.layers) == len(ours.decoder.layers) == n_levels + 3
    for layer in (*ours.encoder.layers[-2:], *ours.decoder.layers[:2]):
        assert isinstance(layer, MeshConv) and tuple(layer.index.shape) == (54, 54)
    verts = _deformed(sphere[0], 3, torch.Generator().manual_seed(1))
    assert ours.encode_latent(verts).shape == authors.encode_latent(verts).shape == (3, 54, 9)
    assert ours.decode(ours.encode(verts)).shape == verts.shape


def _assert_path_starts_silent_then_adds(plain, extended, path: str, forward, x, by_hand) -> None:
    """``extended`` is ``plain`` plus one zero-initialised module at ``path``: it loads plain's weights
    with only that module's missing, computes the same at first, and once the module's weights are
    random, ``forward(extended, x) - forward(plain, x)`` equals ``by_hand(module, x)``."""
    missing, unexpected = extended.load_state_dict(plain.state_dict(), strict=False)
    module = extended.get_submodule(path)
    assert set(missing) == {f"{path}.{name}" for name, _ in module.named_parameters()} and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(forward(extended, x), forward(plain, x))  # zero-initialised
        for weights in module.parameters():
            weights.normal_()
        added = forward(extended, x) - forward(plain, x)
        torch.testing.assert_close(added, by_hand(module, x), rtol=1e-4, atol=1e-4)


def test_linear_readout_starts_silent_then_adds_a_global_linear_map(sphere):
    torch.manual_seed(0)
    plain, with_readout = _model(sphere, linear_readout=False), _model(sphere, readout_hidden=0)
    z = torch.randn(2, 54, 9)
    # by hand: offset of vertex v, axis a = bias[3v + a] + sum over latent values of weight[3v + a, :] * z
    _assert_path_starts_silent_then_adds(
        plain, with_readout, "decoder.readout", lambda m, z: m.decoder(z), z,
        lambda lin, z: (z.reshape(2, -1) @ lin.weight.t() + lin.bias).reshape(2, -1, 3))
    # one token reaches vertices the convolutions alone do not: every vertex moves
    moved = z.clone()
    moved[:, 0] += 1.0
    with torch.no_grad():
        change = torch.linalg.vector_norm(with_readout.decoder(moved) - with_readout.decoder(z), dim=-1)
    assert bool((change > 0).all())


def test_readout_with_a_hidden_layer_starts_silent_then_adds_an_mlp(sphere):
    torch.manual_seed(0)
    plain, with_mlp = _model(sphere, linear_readout=False), _model(sphere, readout_hidden=32)
    first, last = with_mlp.decoder.readout[0], with_mlp.decoder.readout[2]
    assert (first.in_features, first.out_features, last.out_features) == (54 * 9, 32, 3 * plain.n_vertices)

    def by_hand(mlp, z):
        hidden = F.gelu(z.reshape(2, -1) @ mlp[0].weight.t() + mlp[0].bias)
        return (hidden @ mlp[2].weight.t() + mlp[2].bias).reshape(2, -1, 3)

    _assert_path_starts_silent_then_adds(plain, with_mlp, "decoder.readout", lambda m, z: m.decoder(z),
                                         torch.randn(2, 54, 9), by_hand)


def test_readout_with_two_hidden_layers_starts_silent_then_adds_a_deeper_mlp(sphere):
    torch.manual_seed(0)
    plain, deep = _model(sphere, linear_readout=False), _model(sphere, readout_hidden=16, readout_layers=2)
    widths = [(m.in_features, m.out_features) for m in deep.decoder.readout if isinstance(m, torch.nn.Linear)]
    assert widths == [(54 * 9, 16), (16, 16), (16, 3 * plain.n_vertices)]

    def by_hand(mlp, z):
        hidden = F.gelu(z.reshape(2, -1) @ mlp[0].weight.t() + mlp[0].bias)
        hidden = F.gelu(hidden @ mlp[2].weight.t() + mlp[2].bias)
        return (hidden @ mlp[4].weight.t() + mlp[4].bias).reshape(2, -1, 3)

    _assert_path_starts_silent_then_adds(plain, deep, "decoder.readout", lambda m, z: m.decoder(z),
                                         torch.randn(2, 54, 9), by_hand)
    with pytest.raises(ValueError, match="readout_layers"):
        _model(sphere, readout_hidden=16, readout_layers=0)


def test_readout_trains_at_its_own_learning_rate_through_the_one_cycle_schedule(sphere):
    from vqhps.vqvae_training import parameter_groups

    model = _model(sphere, readout_hidden=8)
    groups = parameter_groups(model, 1e-3, readout_lr_scale=0.1)
    readout = {id(p) for p in model.decoder.readout.parameters()}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert {id(p) for p in groups[1]["params"]} == readout
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()} - readout
    opt = torch.optim.Adam(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=20)
    for _ in range(19):
        opt.step()
        sched.step()
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * opt.param_groups[0]["lr"])
    (only,) = parameter_groups(_model(sphere, linear_readout=False), 1e-3, readout_lr_scale=0.1)
    assert only["lr"] == 1e-3 and len(only["params"]) == len(list(_model(sphere, linear_readout=False).parameters()))


def test_linear_encoder_starts_silent_then_adds_a_global_linear_map(sphere):
    torch.manual_seed(0)
    plain, with_linear = _model(sphere, linear_encoder=False), _model(sphere, linear_encoder=True)
    # by hand: latent value (token t, channel c) = bias[9t + c] + sum over vertex offsets of weight[9t + c, :] * x
    _assert_path_starts_silent_then_adds(
        plain, with_linear, "encoder.linear", lambda m, x: m.encoder(x), 0.1 * torch.randn(2, plain.n_vertices, 3),
        lambda lin, x: (x.reshape(2, -1) @ lin.weight.t() + lin.bias).reshape(2, 54, 9))


@pytest.mark.parametrize("global_paths", [False, True])
def test_training_reduces_loss(sphere, one_thread, global_paths):
    torch.manual_seed(0)
    model = _model(sphere, ema_decay=0.9, linear_readout=global_paths, linear_encoder=global_paths).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses, perplexities = [], []
    for _ in range(100):
        out = model(_deformed(sphere[0], 16, gen))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        perplexities.append(out["perplexity"].item())
    initial, final = losses[0], sum(losses[-10:]) / 10
    assert final < 0.5 * initial, f"loss {initial:.4f} -> {final:.4f}"
    # tokens keep using many codes (16 meshes x 54 tokens per batch)
    assert 20 < perplexities[-1] <= 16 * 54


def test_checkpoint_round_trip_and_body_check(sphere, tmp_path):
    from vqhps.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = _model(sphere).train()
    verts = _deformed(sphere[0], 4, torch.Generator().manual_seed(3))
    model(verts)  # one training forward: data-initialised codebook, EMA state
    path = save_checkpoint(tmp_path / "vqvae.pt", {"model": model.state_dict(), "meta": model.checkpoint_meta()})

    fresh = _model(sphere)
    state = load_checkpoint(path, expect=fresh.checkpoint_meta())
    fresh.load_state_dict(state["model"])
    model.eval(), fresh.eval()
    assert torch.equal(fresh.encode(verts), model.encode(verts))
    torch.testing.assert_close(fresh.decode(model.encode(verts)), model.decode(model.encode(verts)))
    with pytest.raises(CheckpointMismatch, match="body_id"):
        load_checkpoint(path, expect={"body_id": "another-body"})
    for change in ({"bottleneck_layers": model.cfg.bottleneck_layers + 1},
                   {"linear_readout": not model.cfg.linear_readout}):
        other = _model(sphere, **change).checkpoint_meta()
        with pytest.raises(CheckpointMismatch, match="architecture"):
            load_checkpoint(path, expect={"architecture": other["architecture"]})


@pytest.mark.parametrize("vqvae_amp, runtime_amp, tf32, expected_amp, expected_tf32",
                         [(False, True, True, False, True), (True, True, True, True, False),
                          (True, False, True, False, True), (False, True, False, False, False)])
def test_mesh_vqvae_training_precision_follows_its_switches(monkeypatch, tmp_path, body, vqvae_amp, runtime_amp,
                                                             tf32, expected_amp, expected_tf32):
    """vqvae.amp (off by default: bf16 activations cost reconstruction accuracy) gates runtime.amp for
    the Mesh-VQ-VAE's training loop alone; its fp32 products run on TF32 (vqvae.tf32) during that loop
    only (off by default: it costs accuracy too), the global setting restored after."""
    import vqhps.vqvae_training as vt
    from vqhps.config import load_config

    seen = {}

    def fake_train(name, model, optimizer, scheduler, batch_fn, loss_fn, steps, directory, runtime, **kwargs):
        seen["amp"], seen["tf32"] = runtime.amp, torch.backends.cuda.matmul.allow_tf32
        raise StopIteration

    monkeypatch.setattr(vt, "train", fake_train)
    monkeypatch.setenv("VQHPS_RESULTS_DIR", str(tmp_path))
    before = torch.backends.cuda.matmul.allow_tf32
    cfg = load_config("smoke", **{"vqvae.amp": vqvae_amp, "runtime.amp": runtime_amp, "vqvae.tf32": tf32})
    with pytest.raises(StopIteration):
        vt.train_stage(cfg, body, "pretrain")
    assert seen == {"amp": expected_amp, "tf32": expected_tf32} and cfg.runtime.amp is runtime_amp
    assert torch.backends.cuda.matmul.allow_tf32 is before
    assert load_config("full").vqvae.amp is False and load_config("full").vqvae.tf32 is False


@pytest.mark.parametrize("graph", [False, True])
def test_mesh_vqvae_training_asks_for_a_cuda_graph_only_when_configured(monkeypatch, tmp_path, body, graph):
    import vqhps.vqvae_training as vt
    from vqhps.config import load_config

    seen = {}

    def fake_train(*args, cuda_graph=False, **kwargs):
        seen["cuda_graph"] = cuda_graph
        raise StopIteration

    monkeypatch.setattr(vt, "train", fake_train)
    monkeypatch.setenv("VQHPS_RESULTS_DIR", str(tmp_path))
    with pytest.raises(StopIteration):
        vt.train_stage(load_config("smoke", **{"vqvae.cuda_graph": graph}), body, "pretrain")
    assert seen == {"cuda_graph": graph} and load_config("full").vqvae.cuda_graph is False


def test_fine_tuning_restarts_codes_at_its_own_threshold(monkeypatch, smoke_artifacts, body):
    """Pre-training restarts dead codes at vqvae.dead_code_threshold, fine-tuning at
    vqvae.finetune_dead_code_threshold (0 by default: its codes stay where the decoder learned them)."""
    import dataclasses

    import vqhps.vqvae_training as vt
    from vqhps.config import load_config
    from vqhps.data import synthetic

    seen = {}

    def fake_train(name, model, *args, **kwargs):
        seen[name] = model.quantizer.dead_code_threshold
        raise StopIteration

    monkeypatch.setattr(vt, "train", fake_train)
    cfg = dataclasses.replace(smoke_artifacts, vqvae=dataclasses.replace(
        smoke_artifacts.vqvae, dead_code_threshold=2e-3, finetune_dead_code_threshold=5e-4))
    train_meshes = synthetic.split_meshes(cfg, "train")
    for stage in ("pretrain", "finetune"):
        with pytest.raises(StopIteration):
            vt.train_stage(cfg, body, stage, train_meshes=train_meshes)
    assert seen == {"mesh_vqvae_pretrain": 2e-3, "mesh_vqvae_finetune": 5e-4}
    full = load_config("full").vqvae
    assert full.finetune_dead_code_threshold == 0.0 < full.dead_code_threshold


def test_linear_reconstruction_errors_vanish_at_the_data_rank_and_match_a_hand_projection():
    from vqhps.vqvae_training import linear_reconstruction_errors

    gen = torch.Generator().manual_seed(0)
    # meshes of 5 vertices that vary along two fixed directions only
    mean = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    directions = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)

    def meshes(n):
        return mean + torch.einsum("nk,kvc->nvc", torch.randn(n, 2, generator=gen, dtype=torch.float64), directions)

    train, test = meshes(50), meshes(7)
    errors = linear_reconstruction_errors(train, test, ranks=(1, 2, 3))
    assert errors[2] < 1e-9 and errors[3] < 1e-9 and errors[1] > 1.0
    # rank 0 keeps the training mean alone: the mean vertex distance to it, in mm
    (at_mean,) = linear_reconstruction_errors(train, test, ranks=(0,))
    expected = 1000.0 * torch.linalg.vector_norm(test.double() - train.double().mean(0), dim=-1).mean().item()
    assert at_mean == pytest.approx(expected)
