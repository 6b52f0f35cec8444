"""VQ-HPS (paper Sec. 4): image -> root rotation R, weak-perspective camera (s, tx, ty) and 54
token logits over the frozen Mesh-VQ-VAE codebook; argmax tokens decode to a canonical mesh that R
orients. Includes the VQ-HPS-rot refiner (Sec. 4.3) and the training losses.

Gradient routing (paper's learning scheme, enforced here):
* the token logits are conditioned on the predicted rotation and camera through DETACHED copies,
  so the cross-entropy (or the "3d" ablation loss) trains the mesh branch only;
* the reprojection loss uses the argmax-decoded canonical mesh, computed without gradient, so it
  trains the rotation/camera branch only (together with the rotation MSE);
* the refiner reads detached inputs, so its own rotation MSE trains the refiner only.

The frozen Mesh-VQ-VAE is any module with ``decode(ids (B, N) long) -> (B, V, 3)``,
``decode_latent(zq (B, N, d)) -> (B, V, 3)`` (differentiable) and ``codebook`` (S, d).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQHPSConfig
from ..data.datasets import rotation_target
from ..geometry import IDENTITY_6D, heading_bins, matrix_to_rot6d, rot6d_to_matrix
from ..losses import reprojection_l1, rotation_mse, token_cross_entropy, vertex_l2
from .backbone import build_backbone
from .layers import regression_mlp
from .transformer import encoder_decoder


def _full_precision(t: torch.Tensor) -> torch.autocast:
    """Context that turns autocast off on ``t``'s device: geometry and losses run in fp32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


class MeshVQVAELike(Protocol):
    codebook: torch.Tensor

    def decode(self, ids: torch.Tensor) -> torch.Tensor: ...

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor: ...


class BodyLike(Protocol):
    def joints24(self, vertices: torch.Tensor) -> torch.Tensor: ...

    def joints17(self, vertices: torch.Tensor) -> torch.Tensor: ...


def sine_position_encoding_2d(h: int, w: int, dim: int, temperature: float = 10000.0,
                              device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h * w, dim) fixed 2D sinusoidal encoding in row-major token order: the first half of the
    channels encodes the row, the second half the column (sin and cos at dim/4 frequencies each)."""
    if dim % 4:
        raise ValueError(f"2D sinusoidal encoding needs dim divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / temperature ** (torch.arange(q, device=device, dtype=torch.float32) / q)
    yy, xx = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    oy = yy.reshape(-1, 1) * omega
    ox = xx.reshape(-1, 1) * omega
    return torch.cat((oy.sin(), oy.cos(), ox.sin(), ox.cos()), dim=1).to(dtype)


class RotationCameraHead(nn.Module):
    """HMR-style regressor: pooled feature ⊕ flattened initial pose -> ``regression_mlp`` (FC -> FC)
    -> 6D rotation and camera (s, tx, ty). The output layer starts with tiny weights and a bias equal to
    (``init_rot6d``, 1, 0, 0), so training starts from that rotation, unit scale and no shift."""

    def __init__(self, in_dim: int, hidden: int = 1024, dropout: float = 0.0,
                 init_rot6d: torch.Tensor | None = None, heading_bins: int = 0) -> None:
        super().__init__()
        self.mlp = regression_mlp(in_dim, hidden, dropout)
        self.out = nn.Linear(hidden, 9)
        init6d = torch.tensor(IDENTITY_6D) if init_rot6d is None else init_rot6d.reshape(6).float()
        nn.init.xavier_uniform_(self.out.weight, gain=0.01)
        with torch.no_grad():
            self.out.bias.copy_(torch.cat((init6d, torch.tensor([1.0, 0.0, 0.0]))))
        #: optional heading classifier on the same hidden features (``VQHPSConfig.heading_bins``)
        self.heading = nn.Linear(hidden, heading_bins) if heading_bins > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (6D rotation (B, 6), camera (B, 3), heading logits (B, bins) or None)."""
        h = self.mlp(x)
        y = self.out(h)
        return y[:, :6], y[:, 6:9], (self.heading(h) if self.heading is not None else None)


class MeshTokenPredictor(nn.Module):
    """Mesh branch after the backbone: 1x1 conv to D, h*w tokens + 2D sine encoding, transformer
    encoder, transformer decoder with ``n_tokens`` learned queries, then a head that maps each decoder
    feature (concatenated with an embedding of [R 6D, camera] when conditioned) to codebook logits."""

    def __init__(self, cfg: VQHPSConfig, n_tokens: int, codebook_size: int, in_channels: int,
                 cond_dim: int = 9) -> None:
        super().__init__()
        d = cfg.d_model
        if d % cfg.n_heads or d % 4:
            raise ValueError(f"d_model={d} must be divisible by n_heads={cfg.n_heads} and by 4")
        self.d_model = d
        self.input_proj = nn.Conv2d(in_channels, d, kernel_size=1)
        self.encoder, self.decoder = encoder_decoder(d, cfg.n_heads, cfg.mlp_hidden, cfg.dropout, cfg.enc_layers,
                                                     cfg.dec_layers)
        self.queries = nn.Parameter(torch.randn(n_tokens, d) * 0.02)
        self.conditioned = bool(cfg.condition_on_camera)
        self.cond_mlp = (
            nn.Sequential(nn.Linear(cond_dim, d), nn.GELU(), nn.Linear(d, d)) if self.conditioned else None
        )
        head_in = 2 * d if self.conditioned else d
        self.head = nn.Sequential(nn.Linear(head_in, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, codebook_size))

    def features(self, spatial: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) backbone map -> z_feat (B, n_tokens, D) decoder features."""
        x = self.input_proj(spatial)
        b, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + sine_position_encoding_2d(h, w, d, device=x.device, dtype=tokens.dtype)
        memory = self.encoder(tokens)
        queries = self.queries.to(memory.dtype).unsqueeze(0).expand(b, -1, -1)
        return self.decoder(queries, memory)

    def logits(self, z_feat: torch.Tensor, rot6d: torch.Tensor | None = None,
               cam: torch.Tensor | None = None) -> torch.Tensor:
        """z_feat (B, N, D) [+ rotation 6D (B, 6) and camera (B, 3)] -> logits (B, N, S). The
        rotation and camera are ignored when the branch is not conditioned."""
        if not self.conditioned:
            return self.head(z_feat)
        if rot6d is None or cam is None:
            raise ValueError("a conditioned mesh branch needs rot6d and cam")
        c = self.cond_mlp(torch.cat((rot6d, cam), dim=-1).to(z_feat.dtype))
        return self.head(torch.cat((z_feat, c[:, None, :].expand_as(z_feat)), dim=-1))

    def forward(self, spatial: torch.Tensor, rot6d: torch.Tensor | None = None,
                cam: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) backbone map [+ rotation 6D and camera] -> logits (B, N, S): ``features`` then
        ``logits``, as one call."""
        return self.logits(self.features(spatial), rot6d, cam)


class RotationRefiner(nn.Module):
    """VQ-HPS-rot: pooled rotation feature ⊕ R 6D ⊕ camera ⊕ predicted 17-joint skeleton (17 x 3,
    oriented by R) -> MLP -> a correction dR (6D, output layer zero-initialised so dR = I at start);
    the refined rotation is R_f = dR @ R."""

    def __init__(self, feat_dim: int, n_joints: int = 17, hidden: int = 1024,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = regression_mlp(feat_dim + 6 + 3 + 3 * n_joints, hidden, dropout)
        self.out = nn.Linear(hidden, 6)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("identity6d", torch.tensor(IDENTITY_6D), persistent=False)

    def forward(self, pooled: torch.Tensor, rotmat: torch.Tensor, cam: torch.Tensor,
                skeleton: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (refined 6D (B, 6), refined rotation matrix (B, 3, 3))."""
        x = torch.cat((pooled, matrix_to_rot6d(rotmat).to(pooled.dtype), cam.to(pooled.dtype),
                       skeleton.flatten(1).to(pooled.dtype)), dim=-1)
        y = self.out(self.mlp(x))
        with _full_precision(y):
            R_f = rot6d_to_matrix(y.float() + self.identity6d) @ rotmat.float()
        return matrix_to_rot6d(R_f), R_f


#: body frame (y up, facing +z) -> camera frame (x right, y down, z forward) for an upright person
#: facing the camera: the rotation the head starts from by default
UPRIGHT_FACING_CAMERA = ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0))


class VQHPS(nn.Module):
    """The VQ-HPS network: two image backbones (``cfg.backbone``; the paper's are ResNet-50s), a rotation/camera MLP fed with the T-pose
    skeleton, and a transformer predicting ``n_tokens`` codebook indices conditioned on the
    predicted rotation and camera (``cfg.condition_on_camera``); optional refiner
    (``cfg.refine_rotation``). ``init_rotmat`` (3, 3) sets the rotation the head starts from:
    by default ``UPRIGHT_FACING_CAMERA`` (the synthetic data's camera convention, where every
    yaw is equally likely but the body is near upright); the camera starts at s = 1, t = 0."""

    def __init__(self, cfg: VQHPSConfig, tpose_joints17: torch.Tensor, n_tokens: int = 54,
                 codebook_size: int = 512, init_rotmat: torch.Tensor | None = None, rot_hidden: int = 1024) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_tokens, self.codebook_size = n_tokens, codebook_size
        tpose = torch.as_tensor(tpose_joints17, dtype=torch.float32).reshape(-1, 3)
        self.register_buffer("tpose_joints17", tpose)
        self.rot_backbone = build_backbone(cfg.backbone, cfg.backbone_weights)
        self.mesh_backbone = build_backbone(cfg.backbone, cfg.backbone_weights)
        feat = self.rot_backbone.out_dim
        if init_rotmat is None:
            init_rotmat = torch.tensor(UPRIGHT_FACING_CAMERA)
        init6d = matrix_to_rot6d(torch.as_tensor(init_rotmat, dtype=torch.float32))
        self.rot_head = RotationCameraHead(feat + tpose.numel(), rot_hidden, cfg.dropout, init6d,
                                           heading_bins=cfg.heading_bins)
        self.mesh = MeshTokenPredictor(cfg, n_tokens, codebook_size, self.mesh_backbone.out_dim)
        self.refiner = (
            RotationRefiner(feat, tpose.shape[0], rot_hidden, cfg.dropout) if cfg.refine_rotation else None
        )

    # parameter groups -------------------------------------------------------------------------
    def rotation_branch_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the rotation MSE and the reprojection loss."""
        return [*self.rot_backbone.parameters(), *self.rot_head.parameters()]

    def mesh_branch_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the token loss (cross-entropy, or the "3d" ablation)."""
        return [*self.mesh_backbone.parameters(), *self.mesh.parameters()]

    # forward ----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, vqvae: MeshVQVAELike | None = None,
                body: BodyLike | None = None) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> dict(rot6d (B, 6) raw head output, rotmat (B, 3, 3), cam (B, 3),
        logits (B, N, S), pooled_rot (B, C)). Given ``vqvae`` it adds the argmax ``ids`` and their
        decoded ``canonical`` mesh (no gradient, fp32); given ``body`` too and a refiner, it adds
        ``rot6d_refined`` and ``rotmat_refined``."""
        pooled_rot, _ = self.rot_backbone(images)
        pose = self.tpose_joints17.reshape(1, -1).to(pooled_rot.dtype).expand(pooled_rot.shape[0], -1)
        rot6d, cam, heading = self.rot_head(torch.cat((pooled_rot, pose), dim=-1))
        rotmat = rot6d_to_matrix(rot6d.float())
        _, spatial = self.mesh_backbone(images)
        logits = self.mesh(spatial, matrix_to_rot6d(rotmat).detach(), cam.detach())
        out = {"rot6d": rot6d, "rotmat": rotmat, "cam": cam, "logits": logits, "pooled_rot": pooled_rot}
        if heading is not None:
            out["heading_logits"] = heading
        if vqvae is not None:
            with torch.no_grad(), _full_precision(logits):  # fp32 decoding: mm matter
                ids = logits.argmax(dim=-1)
                canonical = vqvae.decode(ids).float()
            out.update(ids=ids, canonical=canonical)
            if self.refiner is not None and body is not None:
                out.update(self.refine(pooled_rot, rotmat, cam, canonical, body))
        return out

    def refine(self, pooled_rot: torch.Tensor, rotmat: torch.Tensor, cam: torch.Tensor,
               canonical: torch.Tensor, body: BodyLike) -> dict[str, torch.Tensor]:
        """VQ-HPS-rot on detached inputs: the skeleton is ``body.joints17(canonical)`` oriented by R."""
        if self.refiner is None:
            raise RuntimeError("this model was built with refine_rotation=False")
        R = rotmat.detach().float()
        skeleton = body.joints17(canonical.detach().float()) @ R.transpose(-1, -2)
        rot6d_f, R_f = self.refiner(pooled_rot.detach(), R, cam.detach(), skeleton)
        return {"rot6d_refined": rot6d_f, "rotmat_refined": R_f}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, vqvae: MeshVQVAELike, body: BodyLike) -> dict[str, torch.Tensor]:
        """Inference (call ``eval()`` first): dict(ids (B, N), canonical (B, V, 3), vertices =
        canonical @ R^T, rotmat (final: refined when the refiner exists), rotmat_initial, cam,
        joints24, joints17 of the oriented vertices)."""
        out = self.forward(images, vqvae, body)
        with _full_precision(images):
            R = out.get("rotmat_refined", out["rotmat"]).float()
            canonical = out["canonical"].float()
            vertices = canonical @ R.transpose(-1, -2)
            return {
                "ids": out["ids"], "canonical": canonical, "vertices": vertices, "rotmat": R,
                "rotmat_initial": out["rotmat"].float(), "cam": out["cam"].float(),
                "joints24": body.joints24(vertices), "joints17": body.joints17(vertices),
            }


def soft_decode(logits: torch.Tensor, vqvae: MeshVQVAELike) -> torch.Tensor:
    """Differentiable decoding for the "3d" ablation: softmax(logits) @ codebook -> decode_latent."""
    codebook = torch.as_tensor(vqvae.codebook).detach().float()
    zq = torch.softmax(logits.float(), dim=-1) @ codebook
    return vqvae.decode_latent(zq)


def vqhps_losses(outputs: dict[str, torch.Tensor], batch: dict[str, Any], vqvae: MeshVQVAELike,
                 body: BodyLike, cfg: VQHPSConfig) -> dict[str, torch.Tensor]:
    """Training losses -> dict(total, ce, rot, reproj[, vertex][, heading_ce][, rot_refined]).

    ``total = token loss + rot_weight * rot + reproj_weight * reproj [+ heading_weight * heading_ce]
    [+ rot_weight * rot_refined]`` (heading_ce: cross-entropy of the heading bins, when
    ``cfg.heading_bins`` > 0; it trains the rotation branch),
    with token loss = ce (``cfg.loss == "ce"``) or vertex (``"3d"``: mean per-vertex L2 between the
    ground-truth canonical mesh and the soft decoding). Terms left out of total (ce under "3d",
    reproj when ``use_reprojection`` is off) are still reported, detached. The reprojection projects
    the 24 joints of the argmax-decoded canonical mesh (no gradient) oriented by R with the
    predicted camera, so it trains the rotation and camera only. Every rotation target is the one in
    the crop's own camera (``rotation_target(batch, "crop")``: a crop-only network cannot see where the
    box sits in the frame). Batch keys: token_ids, crop_rot (root_rot without a box),
    joints2d (normalised crop coordinates, see ``vqhps.losses``), canonical (for "3d"), optional
    joints2d_weight (B, 24). Runs in fp32 even inside an autocast region."""
    with _full_precision(outputs["logits"]):
        return _vqhps_losses(outputs, batch, vqvae, body, cfg)


def _vqhps_losses(outputs: dict[str, torch.Tensor], batch: dict[str, Any], vqvae: MeshVQVAELike,
                  body: BodyLike, cfg: VQHPSConfig) -> dict[str, torch.Tensor]:
    logits, rotmat, cam = outputs["logits"], outputs["rotmat"], outputs["cam"]
    losses: dict[str, torch.Tensor] = {}
    ce = token_cross_entropy(logits, batch["token_ids"])
    target = rotation_target(batch, "crop")
    rot = rotation_mse(rotmat, target)
    canonical = outputs.get("canonical")
    if canonical is None:
        with torch.no_grad():
            canonical = vqvae.decode(logits.argmax(dim=-1))
    joints = body.joints24(canonical.detach().float()) @ rotmat.float().transpose(-1, -2)
    reproj = reprojection_l1(joints, cam, batch["joints2d"], batch.get("joints2d_weight"))

    total = cfg.rot_weight * rot
    if cfg.use_reprojection:
        total = total + cfg.reproj_weight * reproj
    else:
        reproj = reproj.detach()
    if cfg.loss == "ce":
        total = total + ce
    elif cfg.loss == "3d":
        vertex = vertex_l2(soft_decode(logits, vqvae), batch["canonical"])
        total = total + vertex
        losses["vertex"] = vertex
        ce = ce.detach()
    else:
        raise ValueError(f"unknown loss {cfg.loss!r}; use 'ce' or '3d'")
    if cfg.heading_bins > 0:
        heading = F.cross_entropy(outputs["heading_logits"].float(), heading_bins(target, cfg.heading_bins))
        total = total + cfg.heading_weight * heading
        losses["heading_ce"] = heading
    if cfg.refine_rotation:
        if "rotmat_refined" not in outputs:
            raise KeyError("refine_rotation is on: call the model with (images, vqvae, body) so it refines")
        rot_refined = rotation_mse(outputs["rotmat_refined"], target)
        total = total + cfg.rot_weight * rot_refined
        losses["rot_refined"] = rot_refined
    losses.update(total=total, ce=ce, rot=rot, reproj=reproj)
    return losses
