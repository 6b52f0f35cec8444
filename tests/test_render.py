"""Headless rendering: the platform choice and the camera convention shared with the labels."""
import os
import subprocess
import sys

import numpy as np
import trimesh

from vqhps.data.sample import project_points
from vqhps.render import MeshRenderer, composite, error_colors


def test_sphere_lands_where_the_intrinsics_project_it():
    sphere = trimesh.creation.icosphere(3, radius=0.04)
    K = np.array([[110.0, 0, 31.5], [0, 110.0, 30.0], [0, 0, 1]])
    with MeshRenderer(64) as r:
        for centre in (np.array([0.0, 0.0, 3.0]), np.array([0.4, -0.3, 2.5])):
            rgba, depth = r.render(sphere.vertices + centre, sphere.faces, K)
            ys, xs = np.nonzero(rgba[..., 3] > 0)
            expected = project_points(centre[None], K)[0]
            assert abs(xs.mean() - expected[0]) < 0.5 and abs(ys.mean() - expected[1]) < 0.5
            assert np.isclose(depth[depth > 0].min(), centre[2] - 0.04, atol=0.02)


def test_platform_variable_is_respected():
    code = "from vqhps.render import configure_platform; print(configure_platform())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYOPENGL_PLATFORM="osmesa"),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "osmesa"


def test_composite_and_colours():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    bg = np.full((4, 4, 3), 10, np.uint8)
    out = composite(rgba, bg)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (10, 10, 10)
    c = error_colors(np.array([0.0, 1.0, 2.0]), vmax=2.0)
    assert c.shape == (3, 4) and c[0].sum() < c[2].sum()


def test_resize_keeps_the_camera_convention():
    """One renderer resized between calls renders at the new size, the sphere still where K puts it."""
    sphere = trimesh.creation.icosphere(3, radius=0.04)
    centre = np.array([0.2, 0.1, 3.0])
    with MeshRenderer(64) as r:
        for width, height in ((80, 50), (48, 96)):
            K = np.array([[110.0, 0, width / 2], [0, 110.0, height / 2 - 3], [0, 0, 1]])
            r.resize(width, height)
            rgba, _ = r.render(sphere.vertices + centre, sphere.faces, K)
            assert rgba.shape == (height, width, 4) and (r.width, r.height) == (width, height)
            ys, xs = np.nonzero(rgba[..., 3] > 0)
            expected = project_points(centre[None], K)[0]
            assert abs(xs.mean() - expected[0]) < 0.5 and abs(ys.mean() - expected[1]) < 0.5


def test_triton_imports_after_rendering():
    """Rendering first and importing torch's compiler stack (triton) afterwards does not crash."""
    code = ("from vqhps.render import MeshRenderer; r = MeshRenderer(16); r.close(); "
            "import importlib.util; importlib.util.find_spec('triton') and __import__('triton'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
