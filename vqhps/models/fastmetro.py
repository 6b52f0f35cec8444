"""FastMETRO-style baseline (Cho et al. 2022): ResNet-50 7x7 features -> 1x1 conv to D -> transformer
encoder over [camera token, image tokens + 2D sine encoding] -> transformer decoder whose learned
queries are 17 joints and the vertices of a coarse level of the Mesh-VQ-VAE's pooling hierarchy ->
3D coordinates per query (oriented, camera-aligned axes) and a weak-perspective camera from the
camera token. The coarse mesh is upsampled to the full mesh by one fixed linear map: the
hierarchy's unpooling graphs composed into a (V, Vc) matrix.

Departures from the original, kept small: no attention masks between mesh queries, the hierarchy
level stands for FastMETRO's 431-vertex SMPL mesh, and each regressed coordinate is added to the
mean template (upright, facing the camera) so training starts from a body shape."""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..mesh.hierarchy import MeshHierarchy, build_hierarchy
from ..losses import reprojection_l1
from .backbone import build_backbone
from .body_params import ensure_body_device, full_precision, oriented_targets, weighted_total
from .transformer import encoder_decoder
from .vqhps import UPRIGHT_FACING_CAMERA, sine_position_encoding_2d

#: one learned query per H36M-like joint (``body.joints17``)
N_JOINT_QUERIES = 17
DEFAULT_WEIGHTS = {"vertices_coarse": 1.0, "vertices": 1.0, "joints3d": 1.0, "joints_query": 1.0, "reproj": 1.0}


def hierarchy_of(cfg, body) -> MeshHierarchy:
    """The Mesh-VQ-VAE's pooling hierarchy of the body template (cfg.hierarchy settings, cached under
    ``cfg.paths.cache / "hierarchy"``)."""
    h = cfg.hierarchy
    return build_hierarchy(body.template.cpu().numpy(), body.faces.cpu().numpy(), h.level_sizes, h.bottom_size,
                           h.pool_neighbours, h.max_neighbours, cache_dir=cfg.paths.cache / "hierarchy")


def nearest_level(hierarchy: MeshHierarchy, n_vertices: int) -> int:
    """The coarse level (>= 1) whose vertex count is closest to ``n_vertices`` in ratio."""
    sizes = hierarchy.sizes
    return min(range(1, len(sizes)), key=lambda lv: abs(np.log(sizes[lv] / n_vertices)))


def upsampling_matrix(hierarchy: MeshHierarchy, level: int) -> torch.Tensor:
    """Sparse (V, N_level) float32 COO matrix ``U_0 @ U_1 @ ... @ U_{level-1}``, U_l the unpooling
    (N_l, N_{l+1}) of step l: full-mesh vertices as fixed convex combinations of level vertices."""
    if not 1 <= level <= hierarchy.n_levels:
        raise ValueError(f"level must be in 1..{hierarchy.n_levels} for this hierarchy, got {level}")
    sizes = hierarchy.sizes
    total = sp.identity(sizes[0], dtype=np.float64, format="csr")
    for lv in range(level):
        index, mask = hierarchy.unpool_index[lv], hierarchy.unpool_mask[lv]
        weight = hierarchy.unpool_weight[lv].astype(np.float64) * mask
        rows = np.repeat(np.arange(sizes[lv]), index.shape[1])
        step = sp.csr_matrix((weight.ravel(), (rows, index.ravel())), shape=(sizes[lv], sizes[lv + 1]))
        total = total @ step
    coo = total.tocoo()
    indices = torch.from_numpy(np.stack((coo.row, coo.col)).astype(np.int64))
    return torch.sparse_coo_tensor(indices, torch.from_numpy(coo.data).float(), coo.shape,
                                   check_invariants=True).coalesce()


class FastMETRO(nn.Module):
    """``FastMETRO(cfg, body)``: cfg the full Config (``cfg.vqhps``: d_model, n_heads, enc_layers,
    dec_layers, mlp_hidden, dropout, backbone, backbone_weights; ``cfg.hierarchy`` and ``cfg.paths.cache`` for
    the hierarchy), body the body model (unregistered; its template and joint regressors are used).
    ``coarse_vertices`` picks the hierarchy level nearest that size (FastMETRO's coarse SMPL mesh has
    431), or ``coarse_level`` names it; ``weights`` overrides ``DEFAULT_WEIGHTS``."""

    #: it sees the crop only, so its meshes are oriented in the crop's own camera (``crop_rot``)
    frame = "crop"

    def __init__(self, cfg, body, coarse_vertices: int = 431, coarse_level: int | None = None,
                 vertex_loss: str = "l1", weights: dict[str, float] | None = None,
                 hierarchy: MeshHierarchy | None = None) -> None:
        super().__init__()
        n_joints = N_JOINT_QUERIES
        c = cfg.vqhps
        d = c.d_model
        if d % c.n_heads or d % 4:
            raise ValueError(f"vqhps.d_model={d} must be divisible by vqhps.n_heads={c.n_heads} and by 4")
        if vertex_loss not in ("l1", "l2"):
            raise ValueError(f"vertex_loss must be 'l1' (mean absolute coordinate error) or 'l2' "
                             f"(mean per-vertex distance), got {vertex_loss!r}")
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.vertex_loss = vertex_loss
        object.__setattr__(self, "body", body)  # not a submodule: not trained, not saved
        hierarchy = hierarchy if hierarchy is not None else hierarchy_of(cfg, body)
        level = coarse_level if coarse_level is not None else nearest_level(hierarchy, coarse_vertices)
        self.coarse_level = int(level)
        upsample = upsampling_matrix(hierarchy, self.coarse_level)
        n_coarse = upsample.shape[1]
        self.register_buffer("upsample", upsample.to_dense(), persistent=False)  # (V, Vc)
        self.register_buffer("coarse_index", torch.from_numpy(hierarchy.level_vertices[self.coarse_level]).long(),
                             persistent=False)

        # mean body upright and facing the camera: the regressed coordinates are offsets from it
        R0 = torch.tensor(UPRIGHT_FACING_CAMERA)
        template = body.template.detach().cpu().float()
        template = (template - template.mean(0, keepdim=True)) @ R0.T
        self.register_buffer("template_coarse", template[self.coarse_index], persistent=False)
        self.register_buffer("template_joints",
                             body.joints17(template[None].to(body.regressor17.device)).cpu()[0],
                             persistent=False)

        self.backbone = build_backbone(c.backbone, c.backbone_weights)
        self.input_proj = nn.Conv2d(self.backbone.out_dim, d, kernel_size=1)
        self.cam_token = nn.Parameter(torch.randn(1, d) * 0.02)
        self.encoder, self.decoder = encoder_decoder(d, c.n_heads, c.mlp_hidden, c.dropout, c.enc_layers,
                                                     c.dec_layers)
        self.joint_queries = nn.Parameter(torch.randn(n_joints, d) * 0.02)
        self.vertex_queries = nn.Parameter(torch.randn(n_coarse, d) * 0.02)
        self.xyz_head = nn.Linear(d, 3)
        self.cam_head = nn.Linear(d, 3)
        for head in (self.xyz_head, self.cam_head):
            nn.init.xavier_uniform_(head.weight, gain=0.01)
            nn.init.zeros_(head.bias)
        with torch.no_grad():
            self.cam_head.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        self._arch = {"model": "fastmetro", "d_model": d, "n_heads": c.n_heads, "enc_layers": c.enc_layers,
                      "dec_layers": c.dec_layers, "mlp_hidden": c.mlp_hidden,
                      "coarse_level": self.coarse_level, "n_coarse": n_coarse, "hierarchy_hash": hierarchy.hash,
                      "body_id": body.identifier(), "backbone": self.backbone.name}

    def architecture(self) -> dict[str, Any]:
        """What a checkpoint must share with this model to be loaded into it."""
        return dict(self._arch)

    @property
    def n_coarse(self) -> int:
        return int(self.upsample.shape[1])

    def upsample_mesh(self, coarse: torch.Tensor) -> torch.Tensor:
        """(B, Vc, 3) coarse mesh -> (B, V, 3) full mesh by the fixed linear map, in fp32."""
        with full_precision(coarse):
            return torch.einsum("vc,bcd->bvd", self.upsample, coarse.float())

    def forward(self, images: torch.Tensor, bbox_info: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images (B, 3, S, S) -> dict(vertices (B, V, 3) oriented and centred, vertices_coarse
        (B, Vc, 3), joints_query (B, 17, 3) from the joint queries, cam (B, 3), joints24, joints17 of
        the full mesh); coordinates fp32. ``bbox_info`` is ignored (crop only, as FastMETRO)."""
        _, spatial = self.backbone(images)
        x = self.input_proj(spatial)
        b, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + sine_position_encoding_2d(h, w, d, device=x.device, dtype=tokens.dtype)
        tokens = torch.cat((self.cam_token.to(tokens.dtype).expand(b, -1, -1), tokens), dim=1)
        memory = self.encoder(tokens)
        queries = torch.cat((self.joint_queries, self.vertex_queries), dim=0).to(memory.dtype)
        feats = self.decoder(queries.unsqueeze(0).expand(b, -1, -1), memory)
        n_j = self.joint_queries.shape[0]
        with full_precision(feats):
            cam = self.cam_head(memory[:, 0].float())
            xyz = self.xyz_head(feats.float())
            joints_query = xyz[:, :n_j] + self.template_joints
            coarse = xyz[:, n_j:] + self.template_coarse
            full = self.upsample_mesh(coarse)
            centre = full.mean(1, keepdim=True)
            full, coarse, joints_query = full - centre, coarse - centre, joints_query - centre
            ensure_body_device(self.body, full.device)
            return {"vertices": full, "vertices_coarse": coarse, "joints_query": joints_query, "cam": cam,
                    "joints24": self.body.joints24(full), "joints17": self.body.joints17(full)}

    def _vertex_error(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        if self.vertex_loss == "l1":
            return (pred - gt).abs().mean()
        return (pred - gt).norm(dim=-1).mean()

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """dict(loss, vertices_coarse, vertices, joints3d, joints_query, reproj), fp32: vertex errors
        (``vertex_loss``, metres) of the coarse and full meshes against the ground-truth oriented mesh
        in the crop's camera (``canonical @ crop_rot^T``, its coarse level by subsampling), L1 of the
        mesh's joints24 and of the query joints against the ground-truth joints24 / joints17, and L1 reprojection of
        joints24 with the predicted camera against ``batch["joints2d"]``."""
        with full_precision(outputs["vertices"]):
            gt = oriented_targets(batch, self.frame)
            gt_coarse = gt[:, self.coarse_index]
            terms = {
                "vertices_coarse": self._vertex_error(outputs["vertices_coarse"], gt_coarse),
                "vertices": self._vertex_error(outputs["vertices"], gt),
                "joints3d": (outputs["joints24"] - self.body.joints24(gt)).abs().mean(),
                "joints_query": (outputs["joints_query"] - self.body.joints17(gt)).abs().mean(),
                "reproj": reprojection_l1(outputs["joints24"], outputs["cam"], batch["joints2d"],
                                          batch.get("joints2d_weight")),
            }
            return weighted_total(terms, self.weights)
