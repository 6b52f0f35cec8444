"""Uncertainty from VQ-HPS's token logits: sample token sequences from the predicted distribution,
decode them with the Mesh-VQ-VAE and measure how far the sampled meshes spread.

VQ-HPS predicts a categorical distribution over the codebook for each of the 54 tokens; its argmax
is the prediction. Sampling ``K`` sequences from softmax(logits / T) (optionally restricted to the
``top_k`` likeliest codes) and decoding them shows where the network hesitates: the per-vertex
*spread* is the mean distance (mm) of the K sampled meshes to their mean, each mesh centred on its
vertex mean first (as PVE is). The spread covers the canonical mesh only: the root rotation is a
point estimate, so a 180° flip costs PVE that no token spread can announce.

``spread_vs_error`` runs this over a split and ``spearman_table`` says how well the spread ranks
the errors (Spearman's rho, average ranks for ties, computed with pandas).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .config import UncertaintyConfig
from .metrics import METRIC_COLUMNS, centre_on_vertex_mean
from .train import autocast

#: error columns the spread is compared with
ERROR_COLUMNS = (*METRIC_COLUMNS, "rot_err_deg")


# ---------------------------------------------------------------------------------------- sampling
def sample_tokens(logits: torch.Tensor, k: int, temperature: float = 1.0, top_k: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Token logits (B, N, S) -> K sampled id sequences (K, B, N) long, on the logits' device.

    Each token is drawn independently from softmax(logits / temperature) over its ``top_k``
    likeliest codes (all when None; codes tied with the k-th are kept), computed in fp32.
    ``temperature == 0`` or ``top_k == 1`` gives the argmax K times. ``generator`` (on the logits'
    device) makes the draw reproducible; None uses a fresh generator seeded with 0."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, N, S), got shape {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"the number of samples must be at least 1, got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    b, n, s = logits.shape
    logits = logits.detach().float()
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1).unsqueeze(0).expand(k, b, n).contiguous()
    scaled = logits / temperature
    if top_k is not None and top_k < s:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1).reshape(b * n, s)
    if generator is None:
        generator = torch.Generator(device=logits.device).manual_seed(0)
    ids = torch.multinomial(probs, k, replacement=True, generator=generator)  # (B * N, K)
    return ids.T.reshape(k, b, n)


def vertex_spread(meshes: torch.Tensor, centre: bool = True) -> torch.Tensor:
    """K sampled meshes (K, B, V, 3) in metres -> per-vertex spread (B, V) in mm: the mean distance
    of the K samples of a vertex to their mean (each mesh centred on its vertex mean first unless
    ``centre`` is False). Computed in float64."""
    x = meshes.double()
    if centre:
        x = centre_on_vertex_mean(x)
    d = x - x[:1]  # offsets from the first sample: identical samples give exactly 0, not rounding noise
    return (d - d.mean(dim=0, keepdim=True)).norm(dim=-1).mean(dim=0) * 1000.0


@dataclass
class TokenSpread:
    """What ``token_spread`` measures for a batch: per-vertex spread (B, V) mm, its mean over the
    vertices (B,) mm, the sampled ids (K, B, N) and the mean sampled mesh (B, V, 3) m."""

    vertex: torch.Tensor
    spread: torch.Tensor
    ids: torch.Tensor
    mean_mesh: torch.Tensor


@torch.no_grad()
def spread_of_ids(vqvae, ids: torch.Tensor, decode_batch: int = 256) -> TokenSpread:
    """Decode K id sequences per sample (K, B, N) with ``vqvae`` in chunks of ``decode_batch`` meshes
    (fp32, autocast off), each distinct sequence once, and measure their spread (``vertex_spread``).
    Decoding once makes equal sequences equal meshes: a batched matrix product need not give two equal
    rows the same rounding, which would read as a spread where the samples agree."""
    distinct, inverse = torch.unique(ids.reshape(-1, ids.shape[-1]), dim=0, return_inverse=True)
    with torch.autocast(ids.device.type, enabled=False):
        meshes = torch.cat([vqvae.decode(distinct[i:i + decode_batch]).float()
                            for i in range(0, len(distinct), decode_batch)])
    meshes = meshes[inverse].reshape(*ids.shape[:2], *meshes.shape[1:])
    vertex = vertex_spread(meshes)
    return TokenSpread(vertex=vertex.float(), spread=vertex.mean(dim=-1).float(), ids=ids,
                       mean_mesh=centre_on_vertex_mean(meshes).mean(dim=0))


def token_spread(vqvae, logits: torch.Tensor, k: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, decode_batch: int = 256) -> TokenSpread:
    """Sample K token sequences from ``logits`` (B, N, S) (``sample_tokens``), decode them and
    measure the spread of the K meshes of each sample (``spread_of_ids``)."""
    return spread_of_ids(vqvae, sample_tokens(logits, k, temperature, top_k, generator), decode_batch)


# ---------------------------------------------------------------------------------------- a split
def batch_generator(cfg, ucfg: UncertaintyConfig, first_index: int, device: torch.device) -> torch.Generator:
    """The sampling generator of the batch that starts at sample ``first_index``: seeded from
    (cfg.seed, ucfg.seed, first_index), so any batch can be re-run alone and draws the same ids."""
    seed = int(np.random.SeedSequence([cfg.seed, ucfg.seed, int(first_index), 0x5EED]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def oriented_prediction(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VQ-HPS forward output (called with vqvae and body) -> what ``VQHPS.predict`` returns for
    the mesh: final rotation (the refined one when present), canonical and oriented vertices, in the
    crop's own camera (``hps_training.camera_frame_prediction`` turns them into the full frame's)."""
    R = out.get("rotmat_refined", out["rotmat"]).float()
    canonical = out["canonical"].float()
    return {"rotmat": R, "canonical": canonical, "vertices": canonical @ R.transpose(-1, -2),
            "cam": out["cam"].float(), "ids": out["ids"]}


def _sample_batch(model, vqvae, body, batch: dict, cfg, ucfg: UncertaintyConfig) -> tuple[dict, torch.Tensor]:
    """One batch through VQ-HPS: (``oriented_prediction`` of it, sampled ids (K, B, N) drawn with the
    batch's own generator)."""
    out = model(batch["image"], vqvae, body)
    gen = batch_generator(cfg, ucfg, int(batch["index"][0]), out["logits"].device)
    return oriented_prediction(out), sample_tokens(out["logits"], ucfg.samples, ucfg.temperature, ucfg.top_k, gen)


def spread_vs_error(model, vqvae, body, arrays: dict[str, np.ndarray], cfg, device: torch.device,
                    ucfg: UncertaintyConfig | None = None, batch_size: int | None = None,
                    progress: bool = True) -> pd.DataFrame:
    """Per-sample token spread and errors of a VQ-HPS ``model`` on a split (batched, on ``device``,
    with a progress bar): the columns of ``hps_training.evaluate_split`` (index, PVE, MPJPE,
    PA-MPJPE, rot_err_deg, labels) with ``spread`` (mm) after ``index``. Settings: ``ucfg``
    (default cfg.uncertainty); each batch's draw is seeded by ``batch_generator``."""
    from .hps_training import camera_frame_prediction, evaluate_split

    ucfg = ucfg or cfg.uncertainty
    body, vqvae = body.to(device), vqvae.to(device)
    spreads: list[tuple[torch.Tensor, torch.Tensor]] = []

    def model_fn(batch: dict) -> dict[str, torch.Tensor]:
        pred, ids = _sample_batch(model, vqvae, body, batch, cfg, ucfg)
        spreads.append((batch["index"].cpu(), spread_of_ids(vqvae, ids).spread.cpu()))
        return camera_frame_prediction(pred, batch)  # VQ-HPS predicts in the crop's camera

    per_sample, _ = evaluate_split(model_fn, arrays, body, cfg, device, batch_size, progress)
    spread = pd.Series(torch.cat([s for _, s in spreads]).numpy(), index=torch.cat([i for i, _ in spreads]).numpy())
    per_sample.insert(1, "spread", spread.loc[per_sample["index"].to_numpy()].to_numpy())
    return per_sample


@torch.no_grad()
def spread_examples(model, vqvae, body, arrays: dict[str, np.ndarray], indices: Sequence[int], cfg,
                    device: torch.device, ucfg: UncertaintyConfig | None = None,
                    batch_size: int | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Per-vertex spread (V,) mm, its mean ``spread`` and the argmax canonical mesh (V, 3) of a few
    samples, exactly as ``spread_vs_error`` drew them: the batches holding them are run again with
    the same batch size and seeds (only the chosen samples are decoded). {index: dict}."""
    from .hps_training import iterate_split

    ucfg = ucfg or cfg.uncertainty
    bs = int(batch_size or cfg.vqhps.batch_size)
    n = len(arrays["image"])
    body, vqvae = body.to(device), vqvae.to(device)
    found: dict[int, dict[str, np.ndarray]] = {}
    for start in sorted({int(i) // bs * bs for i in indices}):
        part = {k: v[start:min(start + bs, n)] for k, v in arrays.items()}
        for batch in iterate_split(part, body, cfg, device, bs, progress=False):
            with autocast(device, cfg.runtime.amp):
                logits = model(batch["image"])["logits"]  # no decoding: only the chosen rows are decoded
            gen = batch_generator(cfg, ucfg, start, logits.device)
            ids = sample_tokens(logits, ucfg.samples, ucfg.temperature, ucfg.top_k, gen)
            rows = [j for j, i in enumerate(batch["index"].tolist()) if i + start in set(map(int, indices))]
            ts = spread_of_ids(vqvae, ids[:, rows])
            with torch.autocast(logits.device.type, enabled=False):
                canonical = vqvae.decode(logits[rows].float().argmax(dim=-1)).float()
            for r, j in enumerate(rows):
                found[start + j] = {"vertex_spread": ts.vertex[r].cpu().numpy(), "spread": float(ts.spread[r]),
                                    "canonical": canonical[r].cpu().numpy()}
    return {int(i): found[int(i)] for i in indices}


# ---------------------------------------------------------------------------------------- ranks
def spearman(x, y) -> float:
    """Spearman's rank correlation of two equally long sequences: Pearson's correlation of their
    ranks (ties get their average rank). Pairs with a NaN are dropped; NaN when fewer than two
    pairs remain or either side is constant."""
    frame = pd.DataFrame({"x": np.asarray(x, dtype=np.float64), "y": np.asarray(y, dtype=np.float64)}).dropna()
    if len(frame) < 2:
        return float("nan")
    rx = frame["x"].rank(method="average").to_numpy()
    ry = frame["y"].rank(method="average").to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def spearman_table(per_sample: pd.DataFrame, spread_column: str = "spread",
                   errors: Sequence[str] = ERROR_COLUMNS) -> pd.DataFrame:
    """Spearman's rho between the spread and each error column, on the full split and its valid
    subset: rows full/valid, columns the errors present plus ``n`` (samples in the subset)."""
    if spread_column not in per_sample.columns:
        raise KeyError(f"per-sample table has no {spread_column!r} column (make it with spread_vs_error)")
    errors = [c for c in errors if c in per_sample.columns]
    valid = per_sample["valid"].astype(bool).to_numpy() if "valid" in per_sample else np.ones(len(per_sample), bool)
    rows = {}
    for subset, mask in (("full", np.ones(len(per_sample), bool)), ("valid", valid)):
        part = per_sample[mask]
        rows[subset] = {**{c: spearman(part[spread_column], part[c]) for c in errors}, "n": int(mask.sum())}
    table = pd.DataFrame(rows).T
    table.index.name = "subset"
    table["n"] = table["n"].astype(int)
    return table


# ---------------------------------------------------------------------------------------- figure
def pick_examples(per_sample: pd.DataFrame, n: int = 3) -> list[int]:
    """Sample indices spanning the spread: the lowest, evenly spaced quantiles and the highest."""
    order = per_sample.sort_values("spread", kind="stable")["index"].to_numpy()
    positions = np.unique(np.round(np.linspace(0, len(order) - 1, min(n, len(order)))).astype(int))
    return [int(order[p]) for p in positions]


def uncertainty_figure(per_sample: pd.DataFrame, table: pd.DataFrame, examples: dict[int, dict[str, np.ndarray]],
                       faces: np.ndarray, render_size: int = 256):
    """Token spread against PVE and PA-MPJPE (valid images highlighted; Spearman's rho of the full
    split and the valid subset in the titles), then the per-vertex spread of each example drawn on
    its predicted canonical mesh (one colour scale for all, mm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .render import MeshRenderer, error_colors, render_canonical

    n_ex = len(examples)
    fig = plt.figure(figsize=(4.2 * 2 + 2.4 * n_ex + 0.6, 4.0))
    grid = fig.add_gridspec(1, 2 + n_ex + 1, width_ratios=[4.2, 4.2, *([2.4] * n_ex), 0.25])
    valid = per_sample["valid"].astype(bool).to_numpy()
    for c, metric in enumerate(("PVE", "PA-MPJPE")):
        ax = fig.add_subplot(grid[0, c])
        ax.scatter(per_sample["spread"][~valid], per_sample[metric][~valid], s=10, alpha=0.6, c="tab:orange",
                   label="not valid")
        ax.scatter(per_sample["spread"][valid], per_sample[metric][valid], s=10, alpha=0.6, c="tab:blue",
                   label="valid")
        for i in examples:
            row = per_sample[per_sample["index"] == i]
            ax.scatter(row["spread"], row[metric], s=60, facecolors="none", edgecolors="black")
            ax.annotate(f"#{i}", (float(row["spread"].iloc[0]), float(row[metric].iloc[0])), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("token spread (mm)")
        ax.set_ylabel(f"{metric} (mm)")
        ax.set_title(f"ρ = {table.loc['full', metric]:.2f} (full), {table.loc['valid', metric]:.2f} (valid)",
                     fontsize=9)
        ax.legend(fontsize=7)
    # one scale for every example; the 99th percentile keeps a few extreme vertices from washing it out
    vmax = float(np.percentile(np.concatenate([e["vertex_spread"] for e in examples.values()]), 99)) if examples else 1.0
    with MeshRenderer(render_size) as renderer:
        for k, (i, ex) in enumerate(examples.items()):
            ax = fig.add_subplot(grid[0, 2 + k])
            image = render_canonical(renderer, ex["canonical"], faces, error_colors(ex["vertex_spread"], vmax))
            ax.imshow(_trim(image))
            ax.set_title(f"#{i}: spread {ex['spread']:.1f} mm", fontsize=8)
            ax.axis("off")
    cax = fig.add_subplot(grid[0, -1])
    fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, vmax), cmap="inferno"), cax=cax,
                 label="per-vertex spread (mm)")
    fig.tight_layout()
    return fig



def _trim(image: np.ndarray, background: int = 255, margin: int = 4) -> np.ndarray:
    """An RGB image cropped to the box of its non-background pixels, plus ``margin`` pixels."""
    ys, xs = np.nonzero((image != background).any(axis=-1))
    if not len(ys):
        return image
    h, w = image.shape[:2]
    return image[max(ys.min() - margin, 0):min(ys.max() + margin + 1, h),
                 max(xs.min() - margin, 0):min(xs.max() + margin + 1, w)]
