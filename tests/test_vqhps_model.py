"""VQ-HPS network: shapes and initialisation, conditioning, gradient routing of every loss, the
refiner, and a short learning run. A tiny frozen stand-in with the
Mesh-VQ-VAE API replaces the real one."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from vqhps.body.base import BodyModel
from vqhps.config import VQHPSConfig
from vqhps.geometry import heading_bins, random_rotations, rotation_angle_deg, weak_perspective_project
from vqhps.models.vqhps import UPRIGHT_FACING_CAMERA, VQHPS, soft_decode, vqhps_losses

N_VERTS = 40


class TinyBody(BodyModel):
    """Random 40-vertex body with random convex joint regressors."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("template", torch.randn(N_VERTS, 3, generator=g) * 0.3)
        self.register_buffer("faces", torch.zeros(1, 3, dtype=torch.long))
        self.register_buffer("regressor24", torch.softmax(torch.randn(24, N_VERTS, generator=g) * 3, -1))
        self.register_buffer("regressor17", torch.softmax(torch.randn(17, N_VERTS, generator=g) * 3, -1))
        self.register_buffer("vertex_flip", torch.arange(N_VERTS))


class TinyVQVAE(nn.Module):
    """Frozen stand-in with the Mesh-VQ-VAE API: a linear map from the 54 x 9 latent to V x 3."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("codebook", torch.randn(512, 9, generator=g))
        self.lin = nn.Linear(54 * 9, N_VERTS * 3)
        self.requires_grad_(False)

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor:
        return 0.3 * self.lin(zq.flatten(1)).view(zq.shape[0], N_VERTS, 3)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode_latent(self.codebook[ids])


def small_cfg(**kw) -> VQHPSConfig:
    return dataclasses.replace(VQHPSConfig(d_model=32, n_heads=2, mlp_hidden=64, dropout=0.0), **kw)


def make(seed: int = 0, **kw) -> tuple[VQHPS, TinyBody, TinyVQVAE, VQHPSConfig]:
    torch.manual_seed(seed)
    cfg = small_cfg(**kw)
    body, vq = TinyBody(), TinyVQVAE()
    return VQHPS(cfg, body.tpose_joints17()), body, vq, cfg


def make_batch(body: TinyBody, vq: TinyVQVAE, n: int = 2, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (n, 54), generator=g)
    R = random_rotations(n, generator=g)
    canonical = vq.decode(ids)
    cam = torch.tensor([[1.0, 0.0, 0.0]]) + 0.1 * torch.randn(n, 3, generator=g)
    joints2d = weak_perspective_project(body.joints24(canonical) @ R.transpose(1, 2), cam)
    return dict(image=torch.randn(n, 3, size, size, generator=g), token_ids=ids, root_rot=R,
                joints2d=joints2d, canonical=canonical)


def grad_norm(params) -> float:
    return float(sum(p.grad.abs().sum() for p in params if p.grad is not None))


def test_forward_shapes_and_sane_initial_outputs():
    model, body, vq, _ = make()
    model.eval()
    for h, w in ((64, 64), (96, 64)):  # any feature-map size
        out = model(torch.randn(2, 3, h, w))
        assert out["logits"].shape == (2, 54, 512)
        assert out["rot6d"].shape == (2, 6) and out["cam"].shape == (2, 3)
        assert out["pooled_rot"].shape == (2, model.rot_backbone.out_dim)
        R = out["rotmat"]
        assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-5)
        upright = torch.tensor(UPRIGHT_FACING_CAMERA).expand(2, 3, 3)
        assert (rotation_angle_deg(R, upright) < 5.0).all()
        assert torch.allclose(out["cam"][:, 0], torch.ones(2), atol=0.1)
        assert out["cam"][:, 1:].abs().max() < 0.1


def test_init_rotmat_sets_the_starting_rotation():
    torch.manual_seed(0)
    body = TinyBody()
    R0 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # 90 degrees about y
    model = VQHPS(small_cfg(), body.tpose_joints17(), init_rotmat=R0).eval()
    R = model(torch.randn(2, 3, 64, 64))["rotmat"]
    assert (rotation_angle_deg(R, R0.expand(2, 3, 3)) < 5.0).all()


@pytest.mark.parametrize("conditioned", [True, False])
def test_logits_depend_on_rotation_only_when_conditioned(conditioned):
    model, *_ = make(condition_on_camera=conditioned)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.rot_head.out.bias[:6] = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0])  # 90 degrees about z
        after = model(x)
    assert rotation_angle_deg(before["rotmat"], after["rotmat"]).min() > 45.0
    changed = (before["logits"] - after["logits"]).abs().max() > 1e-4
    assert changed == conditioned
    # the mesh head's own entry point agrees
    z = torch.randn(2, 54, 32)
    r6a, r6b, cam = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 3)
    same = torch.allclose(model.mesh.logits(z, r6a, cam), model.mesh.logits(z, r6b, cam))
    assert same != conditioned


def test_reprojection_gradient_reaches_only_rotation_and_camera():
    model, body, vq, cfg = make()
    batch = make_batch(body, vq)
    losses = vqhps_losses(model(batch["image"], vq, body), batch, vq, body, cfg)
    losses["reproj"].backward()
    assert grad_norm(model.rot_head.parameters()) > 0
    assert grad_norm(model.rot_backbone.parameters()) > 0
    assert model.rot_head.out.weight.grad[6:].abs().sum() > 0  # camera outputs
    assert grad_norm(model.mesh_branch_parameters()) == 0


def test_ce_gradient_reaches_only_the_mesh_branch():
    model, body, vq, cfg = make()
    batch = make_batch(body, vq)
    losses = vqhps_losses(model(batch["image"], vq, body), batch, vq, body, cfg)
    losses["ce"].backward()
    assert grad_norm(model.mesh.parameters()) > 0
    assert grad_norm(model.mesh_backbone.parameters()) > 0
    assert grad_norm(model.mesh.cond_mlp.parameters()) > 0
    assert grad_norm(model.rotation_branch_parameters()) == 0


def test_total_loss_composition_and_reprojection_switch():
    model, body, vq, cfg = make()
    batch = make_batch(body, vq)
    out = model(batch["image"], vq, body)
    on = vqhps_losses(out, batch, vq, body, cfg)
    assert torch.isclose(on["total"], on["ce"] + on["rot"] + on["reproj"])
    off_cfg = dataclasses.replace(cfg, use_reprojection=False, rot_weight=2.0)
    off = vqhps_losses(out, batch, vq, body, off_cfg)
    assert torch.isclose(off["total"], off["ce"] + 2.0 * off["rot"])
    assert not off["reproj"].requires_grad


def test_heading_classifier_is_off_by_default_and_trains_the_rotation_branch_only():
    model, body, vq, cfg = make()
    assert model.rot_head.heading is None and "heading_logits" not in model(torch.randn(2, 3, 32, 32))
    model, body, vq, cfg = make(heading_bins=8, heading_weight=0.5)
    batch = make_batch(body, vq)
    out = model(batch["image"], vq, body)
    assert out["heading_logits"].shape == (2, 8)
    losses = vqhps_losses(out, batch, vq, body, cfg)
    assert torch.isclose(losses["total"], losses["ce"] + losses["rot"] + losses["reproj"] + 0.5 * losses["heading_ce"])
    expected = torch.nn.functional.cross_entropy(out["heading_logits"], heading_bins(batch["root_rot"], 8))
    assert torch.isclose(losses["heading_ce"], expected)
    losses["heading_ce"].backward()
    assert grad_norm(model.rot_head.heading.parameters()) > 0
    assert grad_norm(model.rot_backbone.parameters()) > 0
    assert grad_norm(model.mesh_branch_parameters()) == 0


def test_3d_loss_gradient_flows_through_soft_decoding():
    model, body, vq, cfg = make(loss="3d")
    batch = make_batch(body, vq)
    out = model(batch["image"], vq, body)
    out["logits"].retain_grad()
    losses = vqhps_losses(out, batch, vq, body, cfg)
    assert "vertex" in losses and not losses["ce"].requires_grad
    assert torch.isclose(losses["total"], losses["vertex"] + losses["rot"] + losses["reproj"])
    losses["vertex"].backward()
    assert out["logits"].grad.abs().sum() > 0
    assert grad_norm(model.mesh.head.parameters()) > 0
    assert grad_norm(model.rotation_branch_parameters()) == 0
    assert all(p.grad is None for p in vq.parameters())
    # soft decoding tends to the hard decoding as the logits sharpen
    ids = batch["token_ids"]
    sharp = torch.nn.functional.one_hot(ids, 512).float() * 100.0
    assert torch.allclose(soft_decode(sharp, vq), vq.decode(ids), atol=1e-4)


def test_refiner_starts_at_identity_correction_and_trains_alone():
    model, body, vq, cfg = make(refine_rotation=True)
    batch = make_batch(body, vq)
    out = model(batch["image"], vq, body)
    assert torch.allclose(out["rotmat_refined"], out["rotmat"], atol=1e-5)
    losses = vqhps_losses(out, batch, vq, body, cfg)
    losses["rot_refined"].backward()
    assert grad_norm(model.refiner.parameters()) > 0
    assert grad_norm(model.rotation_branch_parameters()) == 0
    assert grad_norm(model.mesh_branch_parameters()) == 0
    with pytest.raises(KeyError):
        vqhps_losses(model(batch["image"]), batch, vq, body, cfg)


def test_refiner_correction_is_applied_in_predict():
    model, body, vq, _ = make(refine_rotation=True)
    model.eval()
    with torch.no_grad():
        # the head adds its output to the identity 6D code; this makes the correction 90 degrees about z
        model.refiner.out.bias.copy_(torch.tensor([-1.0, 1.0, 0.0, -1.0, -1.0, 0.0]))
    pred = model.predict(torch.randn(2, 3, 64, 64), vq, body)
    assert torch.allclose(rotation_angle_deg(pred["rotmat"], pred["rotmat_initial"]), torch.full((2,), 90.0), atol=1e-3)


def test_predict_orients_the_decoded_mesh():
    model, body, vq, _ = make()
    model.eval()
    pred = model.predict(torch.randn(2, 3, 64, 64), vq, body)
    assert torch.equal(pred["canonical"], vq.decode(pred["ids"]))
    R = pred["rotmat"]
    assert torch.allclose(pred["vertices"], pred["canonical"] @ R.transpose(1, 2), atol=1e-6)
    assert torch.allclose(pred["joints17"], body.joints17(pred["vertices"]), atol=1e-6)
    assert pred["joints24"].shape == (2, 24, 3) and pred["ids"].dtype == torch.long


def test_short_training_run_lowers_token_and_rotation_error():
    """8 fixed random images (32 x 32 to stay fast on 2 cores), fixed targets, 20 AdamW steps."""
    model, body, vq, cfg = make(seed=0)
    batch = make_batch(body, vq, n=8, size=32, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            out = model(batch["image"], vq, body)
            ce = vqhps_losses(out, batch, vq, body, cfg)["ce"].item()
            return ce, rotation_angle_deg(out["rotmat"], batch["root_rot"]).mean().item()

    ce0, rot0 = measure()
    for _ in range(20):
        losses = vqhps_losses(model(batch["image"], vq, body), batch, vq, body, cfg)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    ce1, rot1 = measure()
    assert ce1 < ce0 - 0.4, (ce0, ce1)
    assert rot1 < 0.5 * rot0, (rot0, rot1)
