"""Shared fixtures: the smoke profile with a throw-away data/results folder and the anny body model
(its cache and regressors live in the project cache and are built once)."""
from __future__ import annotations

import fcntl
import os

import pytest
import torch

os.environ.setdefault("PYOPENGL_PLATFORM", "")
if not os.environ["PYOPENGL_PLATFORM"]:
    del os.environ["PYOPENGL_PLATFORM"]

# under pytest-xdist (make unit-test runs one worker per core) each worker takes its share of the cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(scope="session")
def smoke_cfg():
    from vqhps.config import load_config

    return load_config("smoke")


@pytest.fixture(scope="session")
def body(smoke_cfg):
    from vqhps.body_setup import setup_body

    return setup_body(smoke_cfg)


@pytest.fixture()
def tiny_cfg(tmp_path):
    """Smoke profile shrunk to a few images, writing under tmp_path."""
    from vqhps.config import load_config

    cfg = load_config("smoke")
    cfg.paths.data = tmp_path / "data"
    cfg.paths.results = tmp_path / "results"
    cfg.data.n_train, cfg.data.n_val, cfg.data.n_test, cfg.data.shard_size = 8, 4, 6, 4
    return cfg


@pytest.fixture(scope="session")
def smoke_artifacts(smoke_cfg):
    """The smoke benchmark and both smoke Mesh-VQ-VAE stages, at their default locations (what
    notebooks 00 and 01 make; built here when missing, reused when present)."""
    from vqhps.body_setup import setup_body
    from vqhps.data import synthetic
    from vqhps.vqvae_training import train_stage

    # every core, whatever the requesting module asked for (``one_thread``): this runs once and long.
    # Under pytest-xdist the first worker builds while the others wait on the lock, then reuse
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    smoke_cfg.paths.cache.mkdir(parents=True, exist_ok=True)
    try:
        with open(smoke_cfg.paths.cache / "smoke_artifacts.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            body = setup_body(smoke_cfg)
            synthetic.build_benchmark(smoke_cfg, progress=False)
            train_stage(smoke_cfg, body, "pretrain")
            train_stage(smoke_cfg, body, "finetune", train_meshes=synthetic.split_meshes(smoke_cfg, "train"))
    finally:
        torch.set_num_threads(before)
    return smoke_cfg


@pytest.fixture(scope="session")
def anny_model(smoke_cfg):
    """The raw anny model with the project's cache (the poses' and BVH tests look at its bones)."""
    from vqhps.body.anny_body import build_anny

    return build_anny(smoke_cfg.paths.anny_cache)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on the shared 2-core machine two threads thrash when other jobs are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def no_host_data():
    """Context manager failing on any tensor made from host data (``torch.tensor(...)``,
    ``new_tensor``): on a GPU each is a host-to-device copy, which a training step captured in a CUDA
    graph cannot make."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostData(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
                raise AssertionError(f"a tensor made from host data inside the step ({func})")
            return func(*args, **(kwargs or {}))

    return NoHostData
