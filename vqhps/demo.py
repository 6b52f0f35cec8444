"""Run a trained VQ-HPS on your own images: read, crop, predict, and write the mesh (OBJ, GLB), an
overlay of the mesh on the whole photograph at its own resolution, a side view of the mesh and a
JSON record of the prediction and of what made it (checkpoint, backbone, versions).

Conventions:

* Inputs: files, folders (their image files by suffix, sorted, not recursive) and glob patterns
  (``'photos/*.jpg'``; their image files, and the image files of the folders they match), in the
  order given, each image once. An input that matches no image is an error naming it, raised before
  anything is read or written.
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
* The overlay on the photograph: the crop is the square box of side L = x1 - x0 resized to S pixels,
  so crop pixel u is full-image pixel ``x0 + (u + 0.5) * L / S`` (the inverse of
  ``vqhps.data.sample.crop_affine``). Composed with the crop pinhole above, the same mesh at the
  same translation projects to the photo through focal ``f * L / S = z * s * L / 2`` pixels and
  principal point the box centre ``((x0 + x1) / 2, (y0 + y1) / 2)``: crop units ``c`` land at
  ``box centre + c * L / 2``. Only the window of the photo the mesh covers is rendered, then blended
  into a copy of the photo, so the overlay has the photo's own size at any resolution.
* The side view: the mesh turned 90 degrees about the camera's vertical axis (x' = z, z' = -x; as
  seen from the camera's right, farther from the camera is to the right), framed on a white square of
  ``SIDE_VIEW_SIZE`` pixels: it shows the depth and lean that the overlay cannot.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import atomic_write
from .data.sample import crop_affine, crop_and_resize, project_points

#: smallest image side accepted (pixels)
MIN_SIDE = 16
#: largest image accepted (pixels in total): 100 megapixels
MAX_PIXELS = 100_000_000
#: file suffixes taken from a folder input
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: depth (metres) at which the overlay places the mesh (see the module docstring)
OVERLAY_DEPTH = 20.0
#: side (pixels) of the side-view image
SIDE_VIEW_SIZE = 512
#: the side view's turn: 90 degrees about the camera's vertical (y) axis, x' = z, z' = -x
SIDE_TURN = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
#: what the JSON's ``bbox_source`` says
BBOX_SOURCES = {True: "whole_image", False: "given"}


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
    #: what the JSON records about the checkpoint and its backbone (default: ``checkpoint_record``)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Read the checkpoint's record when none is given, so every way of building one records it."""
        if not self.info and Path(self.checkpoint).is_file():
            self.info = checkpoint_record(self.checkpoint, self.cfg)

    @property
    def crop_size(self) -> int:
        return int(self.cfg.data.crop_size)

    @torch.no_grad()
    def predict(self, image: np.ndarray, bbox=None, samples: int = 0) -> dict[str, Any]:
        """uint8 RGB image (H, W, 3) [+ box] -> dict(vertices (V, 3) oriented mesh = canonical @ R^T,
        canonical (V, 3), rotmat (3, 3) R in the crop's camera (module docstring), cam (3,) = [s, tx, ty],
        token_ids (54,), bbox (4,) the square box used, crop (S, S, 3) uint8), numpy arrays, and
        whole_image (bool: no box given, the whole image was the crop). With ``samples`` K > 0 it adds the
        token-sampling uncertainty (``vqhps.uncertainty``, settings from cfg.uncertainty, seeded):
        vertex_spread (V,) mm, spread (its mean, mm) and uncertainty (the settings used)."""
        from .uncertainty import batch_generator, oriented_prediction, sample_tokens, spread_of_ids

        patch, box = crop(image, bbox, self.crop_size)
        raw = self.model(to_network_input(patch).to(self.device), self.vqvae, self.body)
        out = oriented_prediction(raw)
        pred = {"vertices": out["vertices"][0].cpu().numpy(), "canonical": out["canonical"][0].cpu().numpy(),
                "rotmat": out["rotmat"][0].cpu().numpy(), "cam": out["cam"][0].cpu().numpy(),
                "token_ids": out["ids"][0].cpu().numpy().astype(np.int64), "bbox": box, "crop": patch,
                "whole_image": bbox is None}
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


def checkpoint_record(path: str | os.PathLike, cfg) -> dict[str, Any]:
    """What a demo output needs to be traced to its model: the checkpoint (absolute path, training
    step and epochs done when it records them) and the image backbone (name, and the weights it
    started from: "imagenet" or "scratch"; the trained weights are the checkpoint's)."""
    path = Path(path).resolve()
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    meta = payload.get("meta", {})
    step, per_epoch = payload.get("step"), meta.get("steps_per_epoch")
    weights = meta.get("backbone_weights", cfg.vqhps.backbone_weights)
    return {"checkpoint": {"path": str(path), "step": None if step is None else int(step),
                           "epoch": round(step / per_epoch, 3) if step is not None and per_epoch else None},
            "backbone": {"name": meta.get("backbone", cfg.vqhps.backbone),
                         "weights": "scratch" if weights is None else str(weights)}}


def versions() -> dict[str, str | None]:
    """The vqhps git commit (None outside a git checkout, unless VQHPS_GIT_COMMIT names it) and the
    torch, numpy and python versions, for the JSON record."""
    from .reproduce import environment_facts

    facts = environment_facts()
    commit = facts["git_commit"]
    return {"vqhps_commit": None if commit == "unknown" else commit, "torch": facts["torch"],
            "numpy": np.__version__, "python": facts["python"]}


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


@contextlib.contextmanager
def _renderer_or_new(renderer, width: int, height: int | None = None) -> Iterator[Any]:
    """``renderer`` as given (the caller's, reused across images), or a new ``MeshRenderer`` of that
    size, closed on exit."""
    if renderer is not None:
        yield renderer
        return
    from .render import MeshRenderer

    own = MeshRenderer(width, height)
    try:
        yield own
    finally:
        own.close()


def render_overlay(pred: dict, faces: np.ndarray, renderer=None, vertex_colors: np.ndarray | None = None) -> np.ndarray:
    """The predicted mesh drawn over its crop (plain, or with per-vertex RGBA colours) -> uint8 RGB (S, S, 3)."""
    from .render import composite

    patch = pred["crop"]
    size = patch.shape[0]
    K, t = overlay_camera(pred["cam"], size)
    verts = pred["vertices"] - pred["vertices"].mean(0) + t
    with _renderer_or_new(renderer, size) as r:
        rgba, _ = r.render(verts, faces, K, vertex_colors=vertex_colors)
    return composite(rgba, patch, alpha=0.8)


def crop_to_image(bbox, size: int) -> np.ndarray:
    """(3, 3) map from crop pixels to full-image pixels, homogeneous, for the square ``bbox`` resized to
    ``size`` (the inverse of ``crop_affine``)."""
    return np.linalg.inv(np.vstack([crop_affine(np.asarray(bbox, dtype=np.float64), size), [0.0, 0.0, 1.0]]))


def image_camera(cam: np.ndarray, bbox, size: int, depth: float = OVERLAY_DEPTH) -> tuple[np.ndarray, np.ndarray]:
    """Weak-perspective ``[s, tx, ty]`` of the ``size`` crop of ``bbox`` -> (K (3, 3) in full-image
    pixels, translation (3,)): the crop's overlay pinhole composed back into the photo (module docstring)."""
    K, t = overlay_camera(cam, size, depth)
    return crop_to_image(bbox, size) @ K, t


def mesh_window(pixels: np.ndarray, width: int, height: int, margin: int = 2) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), ends excluded, of the image pixels around projected vertices (N, 2), clipped to
    the image: the part of a photo an overlay has to render. None when the mesh is off the image."""
    lo = np.floor(pixels.min(0)).astype(int) - margin
    hi = np.ceil(pixels.max(0)).astype(int) + margin + 1
    x0, y0, x1, y1 = max(lo[0], 0), max(lo[1], 0), min(hi[0], width), min(hi[1], height)
    return None if x1 <= x0 or y1 <= y0 else (int(x0), int(y0), int(x1), int(y1))


def render_on_image(pred: dict, image: np.ndarray, faces: np.ndarray, renderer=None,
                    vertex_colors: np.ndarray | None = None) -> np.ndarray:
    """The predicted mesh drawn over the whole photo (uint8 (H, W, 3)) at its own resolution, through
    ``image_camera`` (plain, or with per-vertex RGBA colours) -> uint8 RGB (H, W, 3)."""
    from .render import composite

    height, width = image.shape[:2]
    K, t = image_camera(pred["cam"], pred["bbox"], pred["crop"].shape[0])
    verts = pred["vertices"] - pred["vertices"].mean(0) + t
    out = np.array(image, dtype=np.uint8, copy=True)
    window = mesh_window(project_points(verts, K), width, height)
    if window is None:
        return out
    x0, y0, x1, y1 = window
    K_window = K.copy()
    K_window[:2, 2] -= (x0, y0)
    with _renderer_or_new(renderer, x1 - x0, y1 - y0) as r:
        r.resize(x1 - x0, y1 - y0)
        rgba, _ = r.render(verts, faces, K_window, vertex_colors=vertex_colors)
    out[y0:y1, x0:x1] = composite(rgba, out[y0:y1, x0:x1], alpha=0.8)
    return out


def render_side_view(vertices: np.ndarray, faces: np.ndarray, renderer=None, size: int = SIDE_VIEW_SIZE) -> np.ndarray:
    """The camera-frame mesh turned by ``SIDE_TURN`` about its centre, framed on white -> uint8 RGB
    (size, size, 3) (module docstring)."""
    from .render import render_canonical

    turned = (vertices - vertices.mean(0)) @ SIDE_TURN.T
    with _renderer_or_new(renderer, size) as r:
        r.resize(size)
        # render_canonical takes y-up meshes facing +z and turns them into the camera's y-down frame
        return render_canonical(r, turned * np.array([1.0, -1.0, -1.0]), faces)


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


def write_outputs(pred: dict, image: np.ndarray, faces: np.ndarray, out_dir: Path, stem: str, source: Path,
                  renderer=None, provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write <stem>.obj, <stem>.glb, <stem>_overlay.png (the mesh over the whole ``image``),
    <stem>_side.png (``render_side_view``) and <stem>.json (with ``provenance``: model and versions),
    each atomically; with a spread in ``pred`` (``predict(..., samples=K)``) also <stem>_spread.png
    (the mesh over the image coloured by per-vertex spread) and <stem>_spread.glb (the mesh with
    those colours)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _renderer_or_new(renderer, pred["crop"].shape[0]) as r:
        files, record = _outputs(pred, image, faces, stem, source, r)
    record.update(provenance or {})
    files[f"{stem}.json"] = json.dumps(record, indent=1).encode()
    paths = []
    for name, data in files.items():
        atomic_write(out_dir / name, lambda f, data=data: f.write(data))
        paths.append(out_dir / name)
    return paths


def _outputs(pred: dict, image: np.ndarray, faces: np.ndarray, stem: str, source: Path,
             renderer) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bytes of every output file but the JSON, and the JSON record of the prediction."""
    import trimesh

    mesh = trimesh.Trimesh(pred["vertices"].astype(np.float64), np.asarray(faces), process=False)
    size = pred["crop"].shape[0]
    crop_K, t = overlay_camera(pred["cam"], size)
    K, _ = image_camera(pred["cam"], pred["bbox"], size)
    record = {
        "image": str(source),
        "image_size": [int(image.shape[1]), int(image.shape[0])],
        "bbox": [float(v) for v in pred["bbox"]],
        "bbox_source": BBOX_SOURCES[bool(pred.get("whole_image", False))],
        "bbox_convention": "x0 y0 x1 y1, full-image pixels, pixel centres at integers, square; whole_image: a "
                           "square around the image centre, side = its longer side, the shorter side padded",
        "rotation": pred["rotmat"].tolist(),
        "rotation_frame": "the crop's camera: looking through the box centre, OpenCV axes (x right, y down)",
        "camera": {"weak_perspective": [float(v) for v in pred["cam"]],
                   "meaning": "crop units in [-1, 1] = s * X[:2] + [tx, ty], X in metres in the crop's camera frame",
                   "overlay_K": K.tolist(), "overlay_translation": t.tolist(), "crop_K": crop_K.tolist(),
                   "crop_size": int(size),
                   "overlay_meaning": "full-image pixels (centres at integers) = project(vertices - their mean + "
                                      "overlay_translation, overlay_K); crop pixels: the same through crop_K"},
        "token_ids": [int(v) for v in pred["token_ids"]],
    }
    files = {f"{stem}.obj": mesh.export(file_type="obj").encode(),
             f"{stem}.glb": mesh.export(file_type="glb"),
             f"{stem}_overlay.png": _png_bytes(render_on_image(pred, image, faces, renderer)),
             f"{stem}_side.png": _png_bytes(render_side_view(pred["vertices"], faces, renderer))}
    if "vertex_spread" in pred:
        colours, vmax = spread_colours(pred["vertex_spread"])
        record["uncertainty"] = {
            **pred["uncertainty"], "spread_mm": float(pred["spread"]),
            "meaning": "token sequences sampled from the predicted logits and decoded; per vertex, the mean "
                       "distance (mm) of the sampled meshes (each centred on its vertex mean) to their mean",
            "colour_scale_mm": [0.0, vmax], "vertex_spread_mm": [round(float(v), 3) for v in pred["vertex_spread"]]}
        coloured = trimesh.Trimesh(pred["vertices"].astype(np.float64), np.asarray(faces), vertex_colors=colours,
                                   process=False)
        files[f"{stem}_spread.png"] = _png_bytes(render_on_image(pred, image, faces, renderer, vertex_colors=colours))
        files[f"{stem}_spread.glb"] = coloured.export(file_type="glb")
    return files, record


def folder_images(folder: Path) -> list[Path]:
    """A folder's image files (by suffix, hidden ones left out), sorted; not recursive."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _is_glob(text: str) -> bool:
    """Whether ``text`` holds a glob wildcard."""
    return any(c in text for c in "*?[")


def matches(item: str | os.PathLike) -> list[Path]:
    """One input -> its image files: a file itself (whatever its suffix), a folder's images, a glob's
    image files and the images of the folders it matches (module docstring)."""
    text = os.path.expanduser(os.fspath(item))
    path = Path(text)
    if path.is_dir():
        return folder_images(path)
    if path.is_file():
        return [path]
    if not _is_glob(text):
        return []
    found: list[Path] = []
    for match in map(Path, sorted(glob.glob(text, recursive=True))):
        if match.is_dir():
            found += folder_images(match)
        elif match.is_file() and match.suffix.lower() in IMAGE_SUFFIXES:
            found.append(match)
    return found


def _nothing_there(item: str | os.PathLike) -> str:
    """Why ``item`` gave no image, for the error message."""
    path = Path(os.path.expanduser(os.fspath(item)))
    if path.is_dir():
        return f"{item}: a folder without image files ({' '.join(IMAGE_SUFFIXES)})"
    if _is_glob(os.fspath(item)):
        return f"{item}: the pattern matches no image file"
    return f"{item}: no such file or folder"


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files, folders and globs -> their image files in the order given, each file once (by its real
    path). ValueError naming every input that gives no image, before anything is read."""
    files: list[Path] = []
    seen: set[Path] = set()
    empty: list[str] = []
    for item in inputs:
        found = matches(item)
        if not found:
            empty.append(_nothing_there(item))
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(path)
    if empty:
        raise ValueError("no image in " + "; ".join(empty))
    return files


def unique_stem(path: Path, used: set[str]) -> str:
    """An output stem for ``path`` that no earlier input has taken (same names from several folders:
    name, name_suffix, name_suffix_2, ...); ``used`` is updated."""
    tagged = f"{path.stem}_{path.suffix.lstrip('.')}"
    names = itertools.chain((path.stem, tagged), (f"{tagged}_{n}" for n in itertools.count(2)))
    stem = next(name for name in names if name not in used)
    used.add(stem)
    return stem


def run_demo(inputs: list[str | os.PathLike], predictor: Predictor, out_dir: str | os.PathLike, bbox=None,
             progress: bool = True, samples: int = 0) -> dict[str, list]:
    """Predict and write the outputs of every input image (``expand_inputs``: files, folders, globs;
    an input without images is a ValueError before anything is written); with ``samples`` K > 0 also
    the token-sampling spread (``write_outputs``). A file that cannot be read or cropped is skipped and
    reported; the others are finished. Returns dict(ok: [(image, [written paths])], failed: [(image,
    reason)])."""
    from .render import MeshRenderer

    out_dir = Path(out_dir)
    files = expand_inputs(inputs)
    faces = np.asarray(predictor.body.faces.cpu() if torch.is_tensor(predictor.body.faces) else predictor.body.faces)
    provenance = {"model": predictor.info, "versions": versions()}
    report: dict[str, list] = {"ok": [], "failed": []}
    used: set[str] = set()
    renderer = None
    try:
        for path in tqdm(files, desc="demo", disable=not progress or len(files) < 2):
            try:
                image = read_image(path)
                pred = predictor.predict(image, bbox, samples)
            except ValueError as err:
                report["failed"].append((path, str(err)))
                continue
            if renderer is None:
                renderer = MeshRenderer(predictor.crop_size)
            written = write_outputs(pred, image, faces, out_dir, unique_stem(path, used), path, renderer, provenance)
            report["ok"].append((path, written))
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
