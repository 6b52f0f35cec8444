"""Run a trained VQ-HPS on your own images: read, crop, predict, and write the mesh (OBJ, GLB), an
overlay of the mesh on the crop and a JSON record of the prediction.

Conventions:

* A bounding box is ``x0 y0 x1 y1`` in full-image pixels with pixel centres at integers (the
  benchmark's and ``vqhps.data.sample.crop_and_resize``'s convention: the box's edges are at
  ``x0 + 0.5`` ... ``x1 + 0.5``). Non-square boxes are grown to a square around their centre (the
  network was trained on square crops). Parts of the box outside the image are padded black.
* Without a box, the whole image is used: a square around its centre whose side is the image's
  longer side (the shorter side is padded).
* Images smaller than ``MIN_SIDE`` pixels on a side or larger than ``MAX_PIXELS`` are refused
  (ValueError naming the size and the limit); huge images are not downscaled silently.
* The frame: VQ-HPS sees the crop only, so its rotation and mesh are in the crop's own camera, the
  camera looking straight through the box centre (OpenCV axes: x right, y down, z along that ray).
  An image comes without intrinsics, so no full-frame camera is assumed: the crop's camera is the
  output frame (Rc = identity). With a known K, ``vqhps.geometry.crop_camera_rotation(bbox, K) @
  rotation`` is the rotation in the full frame's camera.
* The overlay camera: VQ-HPS predicts a weak-perspective camera ``[s, tx, ty]`` that maps a crop-
  camera-frame point X (metres) to crop units ``s * X[:2] + t`` in [-1, 1]. The overlay places
  the mesh at ``X + (tx / s, ty / s, z)`` with ``z = OVERLAY_DEPTH`` metres and renders it with a
  pinhole of focal ``f = z * s * S / 2`` pixels and principal point at the crop centre, so every point
  at depth z lands exactly where the weak-perspective camera puts it; with z large against the
  body's depth the two agree closely everywhere.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import atomic_write
from .data.sample import crop_and_resize

#: smallest image side accepted (pixels)
MIN_SIDE = 16
#: largest image accepted (pixels in total): 100 megapixels
MAX_PIXELS = 100_000_000
#: file suffixes taken from a folder input
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: depth (metres) at which the overlay places the mesh (see the module docstring)
OVERLAY_DEPTH = 20.0


# ---------------------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> uint8 RGB (H, W, 3). Grayscale, palette and RGBA images are converted to RGB
    (alpha is dropped). ValueError for a file that is not a readable image, or whose size is outside
    [MIN_SIDE px a side, MAX_PIXELS in total]."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not a readable image (no such file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ValueError(f"{path}: image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit "
                                     f"of {MAX_PIXELS / 1e6:.0f} megapixels; downscale it first")
                if min(w, h) < MIN_SIDE:
                    raise ValueError(f"{path}: image is {w}x{h} pixels, smaller than the minimum of "
                                     f"{MIN_SIDE} pixels a side")
                img.load()
                rgb = img.convert("RGB")
    except ValueError:
        raise
    except (OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def whole_image_box(width: int, height: int) -> np.ndarray:
    """The square box (module convention) centred on the image, side = its longer side."""
    side = float(max(width, height))
    cx, cy = width / 2.0 - 0.5, height / 2.0 - 0.5
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float64)


def square_box(bbox) -> np.ndarray:
    """``bbox`` grown to a square around its centre (ValueError unless x1 > x0 and y1 > y0)."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bbox {x0:g} {y0:g} {x1:g} {y1:g}: needs x1 > x0 and y1 > y0")
    half = max(x1 - x0, y1 - y0) / 2.0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return np.array([cx - half, cy - half, cx + half, cy + half], dtype=np.float64)


def crop(image: np.ndarray, bbox=None, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """(crop uint8 (size, size, 3), the square box used). ``bbox`` None -> the whole image; a box
    entirely outside the image -> ValueError naming the box and the image size; partly outside ->
    padded black."""
    h, w = image.shape[:2]
    if bbox is None:
        box = whole_image_box(w, h)
    else:
        x0, y0, x1, y1 = (float(v) for v in bbox)
        # pixels span [-0.5, w - 0.5] in this convention
        if x1 <= -0.5 or y1 <= -0.5 or x0 >= w - 0.5 or y0 >= h - 0.5:
            raise ValueError(f"bbox {x0:g} {y0:g} {x1:g} {y1:g} lies entirely outside the {w}x{h} image")
        box = square_box(bbox)
    patch, _ = crop_and_resize(image, box, size)
    return patch, box


def to_network_input(patch: np.ndarray) -> torch.Tensor:
    """uint8 (S, S, 3) crop -> float (1, 3, S, S) in [0, 1], as ``prepare_batch`` gives (the model's
    backbones normalise it)."""
    return torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None].float() / 255.0


# ---------------------------------------------------------------------------------------- model
@dataclass
class Predictor:
    """A trained VQ-HPS with its body model and Mesh-VQ-VAE, ready for single images."""

    cfg: Any
    body: Any
    vqvae: Any
    model: torch.nn.Module
    device: torch.device
    checkpoint: Path

    @property
    def crop_size(self) -> int:
        return int(self.cfg.data.crop_size)

    @torch.no_grad()
    def predict(self, image: np.ndarray, bbox=None, samples: int = 0) -> dict[str, Any]:
        """uint8 RGB image (H, W, 3) [+ box] -> dict(vertices (V, 3) oriented mesh = canonical @ R^T,
        canonical (V, 3), rotmat (3, 3) R in the crop's camera (module docstring), cam (3,) = [s, tx, ty],
        token_ids (54,), bbox (4,) the square box used, crop (S, S, 3) uint8), numpy arrays. With ``samples`` K > 0 it adds the
        token-sampling uncertainty (``vqhps.uncertainty``, settings from cfg.uncertainty, seeded):
        vertex_spread (V,) mm, spread (its mean, mm) and uncertainty (the settings used)."""
        from .uncertainty import batch_generator, oriented_prediction, sample_tokens, spread_of_ids

        patch, box = crop(image, bbox, self.crop_size)
        raw = self.model(to_network_input(patch).to(self.device), self.vqvae, self.body)
        out = oriented_prediction(raw)
        pred = {"vertices": out["vertices"][0].cpu().numpy(), "canonical": out["canonical"][0].cpu().numpy(),
                "rotmat": out["rotmat"][0].cpu().numpy(), "cam": out["cam"][0].cpu().numpy(),
                "token_ids": out["ids"][0].cpu().numpy().astype(np.int64), "bbox": box, "crop": patch}
        if samples > 0:
            u = self.cfg.uncertainty
            gen = batch_generator(self.cfg, u, 0, self.device)
            spread = spread_of_ids(self.vqvae, sample_tokens(raw["logits"], samples, u.temperature, u.top_k, gen))
            pred.update(vertex_spread=spread.vertex[0].cpu().numpy(), spread=float(spread.spread[0]),
                        uncertainty={"samples": int(samples), "temperature": float(u.temperature), "top_k": u.top_k,
                                     "seed": int(u.seed)})
        return pred


def load_predictor(checkpoint: str | os.PathLike, cfg, device: torch.device | str = "cpu") -> Predictor:
    """Body model + fine-tuned Mesh-VQ-VAE + the VQ-HPS ``checkpoint``. FileNotFoundError naming the
    path and the command that writes it when a checkpoint is missing; CheckpointMismatch when the
    VQ-HPS checkpoint was trained with another body or Mesh-VQ-VAE."""
    from .body_setup import setup_body
    from .hps_training import load_vqhps
    from .vqvae_training import checkpoint_dir, load_mesh_vqvae

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"VQ-HPS checkpoint not found: {checkpoint}; train one with "
                                f"`python -m vqhps train --profile {cfg.profile}` (it writes "
                                f"{checkpoint_dir(cfg) / 'vqhps.pt'})")
    vae_path = checkpoint_dir(cfg) / "mesh_vqvae_finetune.pt"
    if not vae_path.is_file():
        raise FileNotFoundError(f"Mesh-VQ-VAE checkpoint not found: {vae_path}; train it with "
                                f"`python -m vqhps train-vae --profile {cfg.profile}`")
    device = torch.device(device)
    body = setup_body(cfg).to(device)
    vqvae = load_mesh_vqvae(cfg, body, "finetune", device)
    model = load_vqhps(checkpoint, cfg, body, vqvae, device)
    return Predictor(cfg, body, vqvae, model, device, checkpoint)


# ---------------------------------------------------------------------------------------- outputs
def overlay_camera(cam: np.ndarray, size: int, depth: float = OVERLAY_DEPTH) -> tuple[np.ndarray, np.ndarray]:
    """Weak-perspective ``[s, tx, ty]`` -> (K (3, 3), translation (3,)) of the equivalent pinhole
    (module docstring). A non-positive scale (an untrained network) is clamped to 1e-3."""
    s, tx, ty = (float(v) for v in cam)
    s = max(s, 1e-3)
    f = depth * s * size / 2.0
    c = size / 2.0 - 0.5  # crop units -1..1 span the pixel edges; centres at integers
    K = np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])
    return K, np.array([tx / s, ty / s, depth])


def render_overlay(pred: dict, faces: np.ndarray, renderer=None, vertex_colors: np.ndarray | None = None) -> np.ndarray:
    """The predicted mesh drawn over its crop (plain, or with per-vertex RGBA colours) -> uint8 RGB (S, S, 3)."""
    from .render import MeshRenderer, composite

    patch = pred["crop"]
    size = patch.shape[0]
    K, t = overlay_camera(pred["cam"], size)
    verts = pred["vertices"] - pred["vertices"].mean(0) + t
    own = renderer is None
    renderer = renderer or MeshRenderer(size)
    try:
        rgba, _ = renderer.render(verts, faces, K, vertex_colors=vertex_colors)
    finally:
        if own:
            renderer.close()
    return composite(rgba, patch, alpha=0.8)


def _png_bytes(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


#: percentile of a prediction's per-vertex spread that the top of its colour scale marks
SPREAD_COLOUR_PERCENTILE = 99.0


def spread_colours(vertex_spread: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-vertex RGBA uint8 colours of a spread map (0 dark, the 99th percentile bright) and that top."""
    from .render import error_colors

    vmax = max(float(np.percentile(vertex_spread, SPREAD_COLOUR_PERCENTILE)), 1e-6)
    return error_colors(vertex_spread, vmax), vmax


def write_outputs(pred: dict, faces: np.ndarray, out_dir: Path, stem: str, source: Path, renderer=None) -> list[Path]:
    """Write <stem>.obj, <stem>.glb, <stem>_overlay.png and <stem>.json (each atomically); with a
    spread in ``pred`` (``predict(..., samples=K)``) also <stem>_spread.png (the mesh over the crop
    coloured by per-vertex spread) and <stem>_spread.glb (the mesh with those colours)."""
    import trimesh

    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = trimesh.Trimesh(pred["vertices"].astype(np.float64), np.asarray(faces), process=False)
    K, t = overlay_camera(pred["cam"], pred["crop"].shape[0])
    record = {
        "image": str(source),
        "bbox": [float(v) for v in pred["bbox"]],
        "bbox_convention": "x0 y0 x1 y1, full-image pixels, pixel centres at integers, square",
        "rotation": pred["rotmat"].tolist(),
        "rotation_frame": "the crop's camera: looking through the box centre, OpenCV axes (x right, y down)",
        "camera": {"weak_perspective": [float(v) for v in pred["cam"]],
                   "meaning": "crop units in [-1, 1] = s * X[:2] + [tx, ty], X in metres in the crop's camera frame",
                   "overlay_K": K.tolist(), "overlay_translation": t.tolist(), "crop_size": int(pred["crop"].shape[0])},
        "token_ids": [int(v) for v in pred["token_ids"]],
    }
    files = {f"{stem}.obj": mesh.export(file_type="obj").encode(),
             f"{stem}.glb": mesh.export(file_type="glb"),
             f"{stem}_overlay.png": _png_bytes(render_overlay(pred, faces, renderer))}
    if "vertex_spread" in pred:
        colours, vmax = spread_colours(pred["vertex_spread"])
        record["uncertainty"] = {
            **pred["uncertainty"], "spread_mm": float(pred["spread"]),
            "meaning": "token sequences sampled from the predicted logits and decoded; per vertex, the mean "
                       "distance (mm) of the sampled meshes (each centred on its vertex mean) to their mean",
            "colour_scale_mm": [0.0, vmax], "vertex_spread_mm": [round(float(v), 3) for v in pred["vertex_spread"]]}
        coloured = trimesh.Trimesh(pred["vertices"].astype(np.float64), np.asarray(faces), vertex_colors=colours,
                                   process=False)
        files[f"{stem}_spread.png"] = _png_bytes(render_overlay(pred, faces, renderer, vertex_colors=colours))
        files[f"{stem}_spread.glb"] = coloured.export(file_type="glb")
    files[f"{stem}.json"] = json.dumps(record, indent=1).encode()
    paths = []
    for name, data in files.items():
        atomic_write(out_dir / name, lambda f, data=data: f.write(data))
        paths.append(out_dir / name)
    return paths


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files as given; folders -> their image files (by suffix, sorted, not recursive)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not p.name.startswith("."))
        else:
            files.append(item)
    return files


def run_demo(inputs: list[str | os.PathLike], predictor: Predictor, out_dir: str | os.PathLike, bbox=None,
             progress: bool = True, samples: int = 0) -> dict[str, list]:
    """Predict and write the outputs of every input image (folders: all their image files); with
    ``samples`` K > 0 also the token-sampling spread (``write_outputs``). A file that cannot be read
    or cropped is skipped and reported; the others are finished. Returns dict(ok: [(image, [written
    paths])], failed: [(image, reason)])."""
    from .render import MeshRenderer

    out_dir = Path(out_dir)
    files = expand_inputs(inputs)
    faces = np.asarray(predictor.body.faces.cpu() if torch.is_tensor(predictor.body.faces) else predictor.body.faces)
    report: dict[str, list] = {"ok": [], "failed": []}
    used: set[str] = set()
    renderer = None
    try:
        for path in tqdm(files, desc="demo", disable=not progress or len(files) < 2):
            try:
                pred = predictor.predict(read_image(path), bbox, samples)
            except ValueError as err:
                report["failed"].append((path, str(err)))
                continue
            stem = path.stem if path.stem not in used else f"{path.stem}_{path.suffix.lstrip('.')}"
            used.add(stem)
            if renderer is None:
                renderer = MeshRenderer(predictor.crop_size)
            report["ok"].append((path, write_outputs(pred, faces, out_dir, stem, path, renderer)))
    finally:
        if renderer is not None:
            renderer.close()
    return report


def demo_example(predictor: Predictor, arrays: dict[str, np.ndarray], index: int, samples: int = 0,
                 name: str = "demo_example", results_dir: str | os.PathLike | None = None) -> Path:
    """The demo run as a user would run it, on one rendered benchmark image: the crop ``index`` of
    ``arrays`` is saved as a PNG under <results>/<name>/, ``run_demo`` writes its outputs next to
    it, and a side-by-side figure (input | overlay [| spread overlay when ``samples`` > 0]) goes to
    <results>/figures/<name>.png, whose path is returned. <results>: ``results_dir``, by default
    results/<profile>/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import save_figure

    results = Path(results_dir) if results_dir is not None else predictor.cfg.results_dir
    out_dir = results / name
    out_dir.mkdir(parents=True, exist_ok=True)
    image = np.asarray(arrays["image"][index], dtype=np.uint8)
    source = out_dir / f"test_{int(index):05d}.png"
    atomic_write(source, lambda f: f.write(_png_bytes(image)))
    report = run_demo([source], predictor, out_dir, progress=False, samples=samples)
    if report["failed"]:
        raise ValueError(f"demo failed on {source}: {report['failed'][0][1]}")
    record = json.loads((out_dir / f"{source.stem}.json").read_text())
    panels = [(image, f"input: test image #{int(index)}"),
              (read_image(out_dir / f"{source.stem}_overlay.png"), "demo overlay")]
    if samples > 0:
        u = record["uncertainty"]
        panels.append((read_image(out_dir / f"{source.stem}_spread.png"),
                       f"token spread, {u['samples']} samples: {u['spread_mm']:.0f} mm\n"
                       f"(colour scale 0–{u['colour_scale_mm'][1]:.0f} mm)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5))
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = save_figure(fig, results, name)
    plt.close(fig)
    return path
