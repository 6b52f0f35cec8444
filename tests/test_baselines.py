"""Baselines of Table 1 (HMR, CLIFF, FastMETRO-style): output shapes and finite losses, the mean body
they start from, gradients into the backbone, learning on a fixed tiny batch, bf16 autocast,
CLIFF's bbox normalisation and full-frame camera against the rendered ground truth, flip handling,
and the FastMETRO upsampling map. Real smoke body and data, 64-pixel crops, batch 2."""
from __future__ import annotations

import pytest
import torch

from vqhps.config import load_config
from vqhps.data import synthetic
from vqhps.data.datasets import Augmentation, BenchmarkDataset, prepare_batch, unit_to_pixels
from vqhps.geometry import matrix_to_rot6d, perspective_project, rotation_angle_deg
from vqhps.models import cliff as cliff_mod
from vqhps.models.body_params import (gather_articulated, mean_pose, oriented_targets, pose_body,
                                      pose_targets, scatter_pose)
from vqhps.models.cliff import CLIFF, batch_bbox_info
from vqhps.models.fastmetro import FastMETRO, hierarchy_of, upsampling_matrix
from vqhps.models.hmr import HMR
from vqhps.models.vqhps import UPRIGHT_FACING_CAMERA

SMALL = {"vqhps.d_model": 32, "vqhps.n_heads": 2, "vqhps.mlp_hidden": 64, "vqhps.dropout": 0.0}
MODELS = {"hmr": HMR, "cliff": CLIFF, "fastmetro": FastMETRO}
#: Adam step sizes for the learning check: the parametric heads feed their output back three times
#: (larger steps overshoot at first); FastMETRO's one small-initialised head serves all queries
LEARNING_RATES = {"hmr": 1e-4, "cliff": 1e-4, "fastmetro": 1e-3}
STEPS = 5
PELVIS, L_HIP, R_HIP, L_ANKLE, L_FOOT, HEAD = 0, 1, 2, 7, 10, 15


#: one intra-op thread (conftest.one_thread): two threads thrash on the shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg():
    return load_config("smoke", **SMALL)


@pytest.fixture(scope="module")
def body(cfg):
    from vqhps.body_setup import setup_body

    return setup_body(cfg)


@pytest.fixture(scope="module")
def raw(cfg, smoke_artifacts):
    arrays = synthetic.load_split(cfg, "train")
    ds = BenchmarkDataset(arrays)
    return torch.utils.data.default_collate([ds[i] for i in (0, 1)])


@pytest.fixture(scope="module")
def batch(raw, body):
    return prepare_batch(raw, body, torch.device("cpu"))


@pytest.fixture(scope="module")
def flipped_batch(raw, body):
    aug = Augmentation(flip_prob=1.0, rot_prob=0.0, scale=0.0, blur_prob=0.0, color_jitter=0.0)
    return prepare_batch(raw, body, torch.device("cpu"), aug=aug, generator=torch.Generator().manual_seed(0),
                         flip_index24=body.joint_flip24, flip_index17=body.joint_flip17)


def _step(model, batch):
    out = model(batch["image"], batch_bbox_info(batch))
    return out, model.loss(out, batch)


@pytest.fixture(scope="module")
def runs(cfg, body, batch):
    """Each model trained STEPS Adam steps on the fixed batch: first outputs, loss history, backbone
    gradient of the first step, and the model."""
    results = {}
    for name, cls in MODELS.items():
        torch.manual_seed(0)
        model = cls(cfg, body).train()
        opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATES[name])
        history, first, grad = [], None, None
        for i in range(STEPS):
            out, losses = _step(model, batch)
            opt.zero_grad()
            losses["loss"].backward()
            if i == 0:
                first = {k: v.detach() for k, v in out.items()}
                first_losses = {k: v.detach() for k, v in losses.items()}
                grad = next(model.backbone.parameters()).grad.detach().clone()  # the first convolution
            opt.step()
            history.append(float(losses["loss"].detach()))
        with torch.no_grad():
            history.append(float(_step(model, batch)[1]["loss"]))
        results[name] = {"model": model, "first": first, "losses": first_losses, "grad": grad, "history": history}
    return results


# ------------------------------------------------------------------------------------ all models
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_losses_and_backbone_gradient(runs, body, name):
    r = runs[name]
    out, b = r["first"], 2
    assert out["vertices"].shape == (b, body.n_vertices, 3)
    assert out["cam"].shape == (b, 3)
    assert out["joints24"].shape == (b, 24, 3) and out["joints17"].shape == (b, 17, 3)
    torch.testing.assert_close(out["joints24"], body.joints24(out["vertices"]))
    torch.testing.assert_close(out["vertices"].mean(1), torch.zeros(b, 3), atol=1e-5, rtol=0)
    assert all(torch.isfinite(v).all() for v in r["losses"].values())
    assert torch.isfinite(r["grad"]).all() and r["grad"].abs().sum() > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_few_steps_reduce_loss_on_fixed_batch(runs, name):
    history = runs[name]["history"]
    assert history[-1] < 0.9 * history[0], history


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_autocast_keeps_geometry_fp32(runs, batch, name):
    model = runs[name]["model"].eval()
    with torch.no_grad():
        _, ref = _step(model, batch)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out, losses = _step(model, batch)
    losses["loss"].backward()
    model.zero_grad(set_to_none=True)
    model.train()
    for key in ("vertices", "cam", "joints24", "joints17"):
        assert out[key].dtype == torch.float32, key
    assert torch.isfinite(losses["loss"])
    assert abs(float(losses["loss"].detach()) - float(ref["loss"])) < 0.1 * float(ref["loss"])


@pytest.mark.parametrize("name", list(MODELS))
def test_initial_mesh_is_upright_and_faces_the_camera(runs, name):
    j = runs[name]["first"]["joints24"]
    y, x, z = j[..., 1], j[..., 0], j[..., 2]
    assert (y[:, HEAD] < y[:, PELVIS] - 0.3).all()  # head above the pelvis: image y points down
    assert (x[:, L_HIP] > x[:, R_HIP]).all()  # facing the camera: the body's left on the image right
    assert (z[:, L_FOOT] < z[:, L_ANKLE]).all()  # toes point toward the camera
    cam = runs[name]["first"]["cam"]
    torch.testing.assert_close(cam, torch.tensor([[1.0, 0.0, 0.0]]).expand_as(cam), atol=0.05, rtol=0)


@pytest.mark.parametrize("name", ["hmr", "cliff"])
def test_parametric_models_start_from_the_mean_standing_body(runs, body, name):
    first = runs[name]["first"]
    R0 = torch.tensor(UPRIGHT_FACING_CAMERA)
    assert rotation_angle_deg(first["rotmat"], R0.expand_as(first["rotmat"])).max() < 3.0
    mean = pose_body(body, R0[None], scatter_pose(mean_pose()[None]), torch.full((1, 6), 0.5))["vertices"]
    assert (first["vertices"] - mean).norm(dim=-1).mean() < 0.03


# ------------------------------------------------------------------------------- parametric parts
def _ground_truth_params(batch, rotation: str = "root_rot") -> torch.Tensor:
    """The parameter vector of the ground truth: root rotation (``rotation``: root_rot in the camera,
    crop_rot in the crop's camera), joint rotations, shape, crop camera."""
    info = batch_bbox_info(batch)
    cam = cliff_mod.translation_to_crop_cam(batch["trans"], info)
    local = gather_articulated(pose_targets(batch))
    return torch.cat((matrix_to_rot6d(batch[rotation]), matrix_to_rot6d(local).flatten(1),
                      torch.logit(batch["shape"].float()), cam), dim=1)


def test_ground_truth_parameters_give_zero_parametric_losses(runs, batch):
    """Decoding the ground-truth parameters reproduces the ground-truth mesh (HMR's in the crop's
    camera, CLIFF's in the full frame's); CLIFF's full-frame reprojection is exact, HMR's weak
    perspective only approximates the perspective crop."""
    hmr, cliff = runs["hmr"]["model"], runs["cliff"]["model"]
    with torch.no_grad():
        out = hmr.decode(_ground_truth_params(batch, "crop_rot"))
        torch.testing.assert_close(out["vertices"], oriented_targets(batch, "crop"), atol=2e-4, rtol=0)
        h = hmr.loss(out, batch)
        out = cliff.decode(_ground_truth_params(batch))
        torch.testing.assert_close(out["vertices"], oriented_targets(batch), atol=2e-4, rtol=0)
        out["trans"] = cliff_mod.crop_cam_to_translation(out["cam"], batch_bbox_info(batch))
        c = cliff.loss(out, batch)
    for key in ("joints3d", "pose", "rot", "shape"):
        assert float(h[key]) < 1e-6, key
    assert float(c["reproj_full"]) < 1e-5
    assert 1e-4 < float(h["reproj"]) < 0.05  # weak perspective error, in crop units
    assert float(c["loss"]) < 1e-4 < float(h["loss"])


def test_mirrored_pose_poses_the_mirrored_mesh(body, flipped_batch):
    """Flipped samples: the mirrored pose targets give the mirrored canonical mesh prepare_batch made."""
    assert flipped_batch["flipped"].all()
    with torch.no_grad():
        verts = body(pose_targets(flipped_batch), flipped_batch["shape"].float()).vertices
    verts = verts - verts.mean(1, keepdim=True)
    assert (verts - flipped_batch["canonical"]).norm(dim=-1).max() < 0.003
    unflipped = body(flipped_batch["pose"].float(), flipped_batch["shape"].float()).vertices
    unflipped = unflipped - unflipped.mean(1, keepdim=True)
    assert (unflipped - flipped_batch["canonical"]).norm(dim=-1).mean() > 0.02


# ------------------------------------------------------------------------------------------ CLIFF
def test_bbox_info_hand_computed():
    bbox = torch.tensor([[10.0, 20.0, 110.0, 120.0]])
    K = torch.tensor([[[200.0, 0.0, 63.5], [0.0, 200.0, 63.5], [0.0, 0.0, 1.0]]])
    # centre (60, 70), size 100: ((60 - 63.5) / 200, (70 - 63.5) / 200, 100 / 200)
    torch.testing.assert_close(cliff_mod.bbox_info(bbox, K), torch.tensor([[-0.0175, 0.0325, 0.5]]))


def test_full_frame_projection_of_ground_truth_reproduces_stored_joints(cfg, body, raw, batch):
    """GT joints placed with the GT translation and projected with K land on the stored crop joints;
    the crop camera <-> translation conversion is a round trip."""
    info = cliff_mod.bbox_info(batch["bbox"], batch["K"])
    cam = cliff_mod.translation_to_crop_cam(batch["trans"], info)
    torch.testing.assert_close(cliff_mod.crop_cam_to_translation(cam, info), batch["trans"].float())
    joints = body.joints24(oriented_targets(batch))
    full = cliff_mod.project_full_frame(joints, cliff_mod.crop_cam_to_translation(cam, info), batch["K"])
    crop_px = unit_to_pixels(cliff_mod.full_to_crop(full, batch["bbox"]), cfg.data.crop_size)
    torch.testing.assert_close(crop_px, raw["joints2d_24"].float(), atol=0.02, rtol=0)
    # the loss's target: stored crop joints mapped back through the bbox
    torch.testing.assert_close(cliff_mod.crop_to_full(batch["joints2d"], batch["bbox"]), full, atol=0.02, rtol=0)
    direct = perspective_project(joints + batch["trans"][:, None], batch["K"])
    torch.testing.assert_close(full, direct)


def test_flipped_samples_mirror_bbox_and_full_frame_targets(body, batch, flipped_batch):
    """A flipped crop is the crop of the full frame mirrored about the principal point's column
    (``prepare_batch`` makes the batch's bbox that crop's)."""
    K = batch["K"].float()
    px = K[:, 0, 2][:, None]
    info, info_f = batch_bbox_info(batch), batch_bbox_info(flipped_batch)
    torch.testing.assert_close(info_f, info * torch.tensor([-1.0, 1.0, 1.0]))
    full = cliff_mod.crop_to_full(batch["joints2d"], batch["bbox"])[:, body.joint_flip24]
    full_f = cliff_mod.crop_to_full(flipped_batch["joints2d"], flipped_batch["bbox"])
    torch.testing.assert_close(full_f[..., 0], 2 * px - full[..., 0], atol=1e-3, rtol=0)
    torch.testing.assert_close(full_f[..., 1], full[..., 1], atol=1e-3, rtol=0)


def test_cliff_requires_bbox_info(runs, batch):
    with pytest.raises(ValueError, match="bbox_info"):
        runs["cliff"]["model"](batch["image"])


# -------------------------------------------------------------------------------------- FastMETRO
def test_upsampling_matrix_interpolates(cfg, body):
    hierarchy = hierarchy_of(cfg, body)
    for level in range(1, hierarchy.n_levels + 1):
        U = upsampling_matrix(hierarchy, level)
        assert U.shape == (body.n_vertices, hierarchy.sizes[level])
        dense = U.to_dense()
        assert (dense >= 0).all()
        torch.testing.assert_close(dense.sum(1), torch.ones(body.n_vertices))
        const = torch.full((hierarchy.sizes[level], 3), 0.7)
        torch.testing.assert_close(dense @ const, torch.full((body.n_vertices, 3), 0.7))
    # the coarse samples of the template interpolate it closely (wrong indices would not)
    U = upsampling_matrix(hierarchy, 2).to_dense()
    template = body.template.float()
    coarse = template[torch.from_numpy(hierarchy.level_vertices[2])]
    assert (U @ coarse - template).norm(dim=-1).mean() < 0.01
    shuffled = coarse[torch.randperm(len(coarse), generator=torch.Generator().manual_seed(0))]
    assert (U @ shuffled - template).norm(dim=-1).mean() > 0.1


def test_fastmetro_coarse_level_and_ground_truth_losses(runs, batch, body):
    """The model picks the hierarchy level nearest 431 vertices; the ground-truth coarse mesh,
    upsampled, nearly matches the ground-truth mesh, and exact outputs (oriented in the crop's camera,
    as FastMETRO predicts) give a zero 3D loss."""
    model = runs["fastmetro"]["model"]
    assert 200 <= model.n_coarse <= 1000
    gt = oriented_targets(batch, "crop")
    coarse = gt[:, model.coarse_index]
    full = model.upsample_mesh(coarse)
    assert (full - gt).norm(dim=-1).mean() < 0.01
    out = {"vertices": gt, "vertices_coarse": coarse, "joints_query": body.joints17(gt),
           "joints24": body.joints24(gt), "cam": torch.tensor([[1.0, 0.0, 0.0]]).expand(2, 3)}
    losses = model.loss(out, batch)
    for key in ("vertices", "vertices_coarse", "joints3d", "joints_query"):
        assert float(losses[key]) < 1e-6, key
