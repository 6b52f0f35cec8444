"""Headless rendering with pyrender: meshes seen through an OpenCV-style pinhole camera, overlays on
images and per-vertex error heatmaps.

The OpenGL platform is chosen before pyrender is imported: ``PYOPENGL_PLATFORM`` when set, else EGL
(NVIDIA or Mesa) when a context can be made, else OSMesa.
"""
from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache

import numpy as np

_EGL_PROBE = (
    "import os; os.environ.setdefault('PYGLET_HEADLESS', 'true');"
    "import pyrender, numpy as np;"
    "r = pyrender.OffscreenRenderer(8, 8);"
    "s = pyrender.Scene(); s.add(pyrender.PerspectiveCamera(yfov=1.0));"
    "r.render(s);"
    "r.delete()"
)


def configure_platform(timeout: float = 60.0) -> str:
    """Pick and export the OpenGL platform for pyrender; returns it ("egl" or "osmesa")."""
    chosen = os.environ.get("PYOPENGL_PLATFORM")
    if chosen:
        return chosen
    env = dict(os.environ, PYOPENGL_PLATFORM="egl")
    try:
        ok = subprocess.run([sys.executable, "-c", _EGL_PROBE], env=env, capture_output=True,
                            timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    chosen = "egl" if ok else "osmesa"
    os.environ["PYOPENGL_PLATFORM"] = chosen
    return chosen


def _load_triton_first() -> None:
    """Load triton (its bundled LLVM) before any GL context when it is installed: once Mesa's llvmpipe
    (EGL or OSMesa) is loaded, a later ``import triton`` (torch._dynamo imports it, e.g. through the
    body model's libraries) crashes the process."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken triton only matters to code that uses it
        pass


@lru_cache(maxsize=1)
def _pyrender():
    _load_triton_first()
    configure_platform()
    # pyrender imports pyglet for its viewer; headless pyglet needs no X libraries
    os.environ.setdefault("PYGLET_HEADLESS", "true")
    try:
        import pyrender
    except Exception as err:  # pragma: no cover - depends on the machine's GL libraries
        raise RuntimeError(
            f"pyrender could not load OpenGL (PYOPENGL_PLATFORM={os.environ.get('PYOPENGL_PLATFORM')}): {err}. "
            "Run `make setup` (installs Debian's libegl1/libosmesa6 when root) or set PYOPENGL_PLATFORM."
        ) from err
    return pyrender


#: pyrender's camera looks down -z with y up; OpenCV's looks down +z with y down
_CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


class MeshRenderer:
    """An offscreen renderer of one size, reused across calls (contexts are expensive)."""

    def __init__(self, width: int, height: int | None = None):
        self.width, self.height = width, height or width
        self._renderer = _pyrender().OffscreenRenderer(self.width, self.height)

    def resize(self, width: int, height: int | None = None) -> None:
        """Render at another size from the next call on, keeping the context (images of many sizes)."""
        self.width, self.height = int(width), int(height or width)
        self._renderer.viewport_width, self._renderer.viewport_height = self.width, self.height

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.delete()
            self._renderer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def render(self, vertices: np.ndarray, faces: np.ndarray, K: np.ndarray,
               vertex_colors: np.ndarray | None = None, color: tuple = (0.65, 0.74, 0.86),
               light_dir: np.ndarray | None = None, light_intensity: float = 3.0,
               ambient: float = 0.3, smooth: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Render camera-frame vertices (OpenCV axes, metres) -> (RGBA uint8 (H,W,4), depth (H,W))."""
        pyrender = _pyrender()
        import trimesh

        mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces), process=False)
        if vertex_colors is not None:
            mesh.visual.vertex_colors = np.asarray(vertex_colors)
            material = None
        else:
            material = pyrender.MetallicRoughnessMaterial(baseColorFactor=(*color, 1.0), metallicFactor=0.1,
                                                          roughnessFactor=0.7)
        scene = pyrender.Scene(bg_color=(0, 0, 0, 0), ambient_light=(ambient,) * 3)
        scene.add(pyrender.Mesh.from_trimesh(mesh, material=material, smooth=smooth))
        # pyrender puts pixel centres at half-integers, OpenCV at integers: shift the principal point
        cam = pyrender.IntrinsicsCamera(fx=K[0, 0], fy=K[1, 1], cx=K[0, 2] + 0.5, cy=K[1, 2] + 0.5,
                                        znear=0.05, zfar=100.0)
        scene.add(cam, pose=_CV_TO_GL)
        scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=light_intensity),
                  pose=_light_pose(light_dir))
        rgba, depth = self._renderer.render(scene, flags=pyrender.RenderFlags.RGBA)
        return rgba, depth


def _light_pose(direction: np.ndarray | None) -> np.ndarray:
    """Pose of a directional light shining along ``direction`` (OpenCV camera frame)."""
    d = np.array([0.0, 0.3, 1.0]) if direction is None else np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    z = -d  # pyrender lights shine along their local -z axis; the scene frame is the OpenCV camera's
    x = np.cross([0.0, 1.0, 0.0], z)
    if np.linalg.norm(x) < 1e-6:
        x = np.array([1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    return pose


def composite(rgba: np.ndarray, background: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Alpha-blend a rendered RGBA image over an RGB background of the same size."""
    a = (rgba[..., 3:4].astype(np.float32) / 255.0) * alpha
    out = rgba[..., :3].astype(np.float32) * a + background.astype(np.float32) * (1.0 - a)
    return out.clip(0, 255).astype(np.uint8)


def front_camera(vertices: np.ndarray, size: int, fov_deg: float = 30.0, margin: float = 1.15):
    """Intrinsics and a translation that frame a canonical (y-up, facing +z) mesh from the front.

    Returns (K, R, t): camera-frame vertices are ``vertices @ R.T + t``."""
    f = 0.5 * size / np.tan(np.radians(fov_deg) / 2)
    K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    R = np.diag([1.0, -1.0, -1.0])  # camera on the +z side looking back at the body: y up -> down
    centre = vertices.mean(0)
    extent = np.abs(vertices - centre).max() * margin
    dist = extent * f / (0.5 * size)
    t = -(R @ centre) + np.array([0.0, 0.0, dist + extent])
    return K, R, t


def render_canonical(renderer: MeshRenderer, vertices: np.ndarray, faces: np.ndarray,
                     vertex_colors: np.ndarray | None = None, background: int = 255) -> np.ndarray:
    """Front view of a canonical mesh on a plain background -> RGB uint8."""
    K, R, t = front_camera(np.asarray(vertices), renderer.width)
    rgba, _ = renderer.render(np.asarray(vertices) @ R.T + t, faces, K, vertex_colors=vertex_colors)
    bg = np.full((renderer.height, renderer.width, 3), background, dtype=np.uint8)
    return composite(rgba, bg)


def error_colors(errors: np.ndarray, vmax: float | None = None, cmap: str = "inferno") -> np.ndarray:
    """Per-vertex RGBA uint8 colours of an error map (0 -> dark, vmax -> bright)."""
    import matplotlib

    vmax = float(np.max(errors)) if vmax is None else vmax
    rgba = matplotlib.colormaps[cmap](np.clip(np.asarray(errors) / max(vmax, 1e-12), 0.0, 1.0))
    return (rgba * 255).astype(np.uint8)
