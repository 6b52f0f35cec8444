"""Background images for the synthetic benchmark: photographs that ship with scikit-image (none shows
a person, which would be an unlabelled second body) and procedural textures.

Test images use sources never seen in training, so the benchmark measures generalisation to new
scenes, as 3DPW's test sequences do.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

#: scikit-image sample files (in the wheel) by split; people (astronaut, camera, faces) left out
PHOTOS = {
    "train": ("brick.png", "cell.png", "chelsea.png", "chessboard_RGB.png", "clock_motion.png", "coins.png",
              "color.png", "grass.png", "ihc.png", "logo.png", "microaneurysms.png", "moon.png",
              "motorcycle_left.png", "phantom.png", "retina.jpg", "text.png"),
    "test": ("coffee.png", "rocket.jpg", "gravel.png", "motorcycle_right.png", "hubble_deep_field.jpg", "page.png"),
}
PROCEDURAL = {"train": ("noise", "gradient", "checker"), "test": ("stripes", "blobs")}


def _split_key(split: str) -> str:
    return "test" if split == "test" else "train"


def sources(split: str) -> list[str]:
    """Names of the background sources a split draws from (val shares train's)."""
    key = _split_key(split)
    return [f"photo:{p}" for p in PHOTOS[key]] + [f"proc:{p}" for p in PROCEDURAL[key]]


@lru_cache(maxsize=64)
def _photo(name: str) -> np.ndarray:
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    img = Image.open(path)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _procedural(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        w = (np.cos(angle) * xx + np.sin(angle) * yy)
        w = (w - w.min()) / max(np.ptp(w), 1e-6)
    elif kind == "checker":
        n = rng.integers(3, 12)
        w = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    elif kind == "stripes":
        n, angle = rng.uniform(3, 15), rng.uniform(0, np.pi)
        w = 0.5 + 0.5 * np.sin(2 * np.pi * n * (np.cos(angle) * xx + np.sin(angle) * yy))
    elif kind == "blobs":
        w = np.zeros_like(xx)
        for _ in range(rng.integers(4, 10)):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            w = np.maximum(w, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
    else:  # smooth value noise
        coarse = rng.uniform(0, 1, (rng.integers(4, 16),) * 2).astype(np.float32)
        w = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       dtype=np.float32) / 255.0
    img = c0 * (1 - w[..., None]) + c1 * w[..., None]
    img += rng.normal(0, 6, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def background(split: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A random (size, size, 3) background for ``split`` and the index of its source in ``sources``."""
    names = sources(split)
    idx = int(rng.integers(len(names)))
    kind, name = names[idx].split(":", 1)
    if kind == "proc":
        return _procedural(name, size, rng), idx
    photo = _photo(name)
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.5, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
    img = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = img * rng.uniform(0.6, 1.2, 3) + rng.uniform(-20, 20)
    return img.clip(0, 255).astype(np.uint8), idx
