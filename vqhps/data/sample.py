"""The one sample schema every dataset produces (synthetic renders, 3DPW, ...), its validator, and the
geometry helpers that build it: centring, projection, square boxes and crops.

Sample keys (numpy arrays; S = crop size, V = vertex count):

============  ===========  =======  =================================================================
key           shape        dtype    meaning
============  ===========  =======  =================================================================
image         (S, S, 3)    uint8    RGB crop of the full frame inside ``bbox``
joints2d_24   (24, 2)      float32  the 24 regressor joints of ``verts_cam``, in crop pixels
joints2d_17   (17, 2)      float32  the 17 H36M-like joints of ``verts_cam``, in crop pixels
root_rot      (3, 3)       float32  rotation canonical -> camera frame (global orientation in camera)
canonical     (V, 3)       float32  mesh with zero global orientation, centred on its vertex mean (m)
verts_cam     (V, 3)       float32  mesh in the camera frame (OpenCV: x right, y down, z forward; m)
K             (3, 3)       float32  full-frame pinhole intrinsics
bbox          (4,)         float32  x0, y0, x1, y1 of the square crop box in full-frame pixels
valid         ()           bool     usable for evaluation (3DPW: campose_valid)
============  ===========  =======  =================================================================

Conventions (enforced by :func:`validate_sample`):

* ``verts_cam = canonical @ root_rot.T + translation`` where ``translation = verts_cam.mean(0)``, the
  camera-frame position of the canonical mesh's vertex mean.
* Pixel coordinates put pixel centres at integers (what projecting through ``K`` gives). The crop
  covers the continuous box ``[x0, x1] x [y0, y1]``: full-frame ``x`` maps to crop
  ``u = (x - x0) * S / (x1 - x0) - 0.5`` (so the box edges land on the crop's outer pixel edges).

Extra keys (metadata such as ``sequence`` or ``frame``) are allowed and ignored by the validator.
"""
from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
from PIL import Image

ArrayT = TypeVar("ArrayT")

#: key -> (shape with None for "any", dtype); "S" and "V" must agree across keys
SAMPLE_SCHEMA: dict[str, tuple[tuple[Any, ...], Any]] = {
    "image": (("S", "S", 3), np.uint8),
    "joints2d_24": ((24, 2), np.float32),
    "joints2d_17": ((17, 2), np.float32),
    "root_rot": ((3, 3), np.float32),
    "canonical": (("V", 3), np.float32),
    "verts_cam": (("V", 3), np.float32),
    "K": ((3, 3), np.float32),
    "bbox": ((4,), np.float32),
    "valid": ((), np.bool_),
}
#: tolerances of the validator: metres for meshes, unitless for rotations
CENTRE_TOL = 1e-4
ROT_TOL = 1e-4
CONVENTION_TOL = 1e-3


def canonicalize(vertices: ArrayT) -> ArrayT:
    """Centre a mesh (V,3) or a batch (B,V,3) on its vertex mean (numpy or torch)."""
    if isinstance(vertices, np.ndarray):
        return vertices - vertices.mean(-2, keepdims=True)
    return vertices - vertices.mean(-2, keepdim=True)  # type: ignore[attr-defined]


def project_points(points_cam: ArrayT, K: Any) -> ArrayT:
    """Pinhole projection of camera-frame points (...,N,3) through intrinsics (3,3) -> pixels (...,N,2);
    both numpy or both torch."""
    uvw = points_cam @ K.T  # type: ignore[operator]
    return uvw[..., :2] / uvw[..., 2:3]


def square_bbox(points2d: np.ndarray, scale: float = 1.2) -> np.ndarray:
    """Square box (x0,y0,x1,y1) centred on the points' extent, side = ``scale`` x its longer side."""
    lo, hi = points2d.min(0), points2d.max(0)
    centre = (lo + hi) / 2.0
    half = max(float((hi - lo).max()), 1.0) * scale / 2.0
    return np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half], np.float32)


def crop_affine(bbox: np.ndarray, size: int) -> np.ndarray:
    """(2,3) affine taking full-frame pixels to crop pixels for a square ``bbox`` resized to ``size``."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    sx, sy = size / (x1 - x0), size / (y1 - y0)
    return np.array([[sx, 0.0, -x0 * sx - 0.5], [0.0, sy, -y0 * sy - 0.5]])


def apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Apply a (2,3) affine to points (N,2)."""
    return points @ affine[:, :2].T + affine[:, 2]


def crop_and_resize(image: np.ndarray | Image.Image, bbox: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``bbox`` (may leave the frame: black padding) and resize it to ``size`` x ``size``.

    Returns the uint8 crop (size,size,3) and the (2,3) full->crop affine of the module convention.
    Resampling is PIL's antialiased bilinear resize of a padded integer crop.
    """
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bbox must have x1 > x0 and y1 > y0, got {tuple(bbox)}")
    # box edges in PIL's edge-based coordinates (pixel centres at +0.5)
    ex0, ey0, ex1, ey1 = x0 + 0.5, y0 + 0.5, x1 + 0.5, y1 + 0.5
    margin = int(math.ceil(max(x1 - x0, y1 - y0) / size)) + 2  # room for the antialiasing filter
    ix0, iy0 = math.floor(ex0) - margin, math.floor(ey0) - margin
    ix1, iy1 = math.ceil(ex1) + margin, math.ceil(ey1) + margin
    region = img.crop((ix0, iy0, ix1, iy1))
    crop = region.resize((size, size), Image.Resampling.BILINEAR,
                         box=(ex0 - ix0, ey0 - iy0, ex1 - ix0, ey1 - iy0))
    return np.asarray(crop, dtype=np.uint8).copy(), crop_affine(np.array([x0, y0, x1, y1]), size)


def validate_sample(sample: dict[str, Any]) -> None:
    """Raise ValueError naming the key when ``sample`` breaks the schema or the conventions above."""
    dims: dict[str, int] = {}
    for key, (shape, dtype) in SAMPLE_SCHEMA.items():
        if key not in sample:
            raise ValueError(f"sample is missing key '{key}'")
        value = sample[key]
        if key == "valid" and isinstance(value, (bool, np.bool_)):
            continue
        if not isinstance(value, np.ndarray):
            raise ValueError(f"sample key '{key}' must be a numpy array, got {type(value).__name__}")
        if value.dtype != dtype:
            raise ValueError(f"sample key '{key}' must have dtype {np.dtype(dtype).name}, got {value.dtype}")
        if value.ndim != len(shape):
            raise ValueError(f"sample key '{key}' must have shape {shape}, got {value.shape}")
        for want, got in zip(shape, value.shape):
            if isinstance(want, str):
                if dims.setdefault(want, got) != got:
                    raise ValueError(f"sample key '{key}' has {want}={got}, other keys have {want}={dims[want]}")
            elif want != got:
                raise ValueError(f"sample key '{key}' must have shape {shape}, got {value.shape}")
        if value.dtype != np.uint8 and value.dtype != np.bool_ and not np.isfinite(value).all():
            raise ValueError(f"sample key '{key}' contains non-finite values")

    rot = sample["root_rot"].astype(np.float64)
    if np.abs(rot @ rot.T - np.eye(3)).max() > ROT_TOL or abs(np.linalg.det(rot) - 1.0) > ROT_TOL:
        raise ValueError("sample key 'root_rot' is not a rotation matrix")
    canonical = sample["canonical"].astype(np.float64)
    if np.abs(canonical.mean(0)).max() > CENTRE_TOL:
        raise ValueError("sample key 'canonical' is not centred on its vertex mean")
    verts_cam = sample["verts_cam"].astype(np.float64)
    rebuilt = canonical @ rot.T + verts_cam.mean(0)
    if np.abs(rebuilt - verts_cam).max() > CONVENTION_TOL:
        raise ValueError("sample key 'verts_cam' != canonical @ root_rot.T + translation")
    x0, y0, x1, y1 = sample["bbox"].astype(np.float64)
    if not (x1 > x0 and y1 > y0) or abs((x1 - x0) - (y1 - y0)) > 1e-3 * max(x1 - x0, 1.0):
        raise ValueError("sample key 'bbox' is not a square box x0 < x1, y0 < y1")
