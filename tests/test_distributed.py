"""The training loop under torchrun's contract on the CPU (gloo, 2 processes): two processes sharing a
global batch take the same steps as one process (EMA codebook included), log the same reduced metrics,
and their checkpoint resumes in one process to the uninterrupted weights. Also: the batch-splitting
rule, the launcher and the command line that torchrun runs.

Run as a script, this file is one worker of the 2-process job (rank and world from the environment,
as torchrun sets them)."""
from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

GLOBAL_BATCH, N_MESHES, TOTAL, SPLIT_AT = 8, 16, 3, 2


# ------------------------------------------------------------------ shared by the workers and the tests
def _initial_codes() -> torch.Tensor:
    return 0.3 * torch.randn(16, 4, generator=torch.Generator().manual_seed(1))


def _tiny_run(out_dir: Path, stop_after: int | None = None, device: str = "cpu"):
    """Train a tiny Mesh-VQ-VAE on scaled icospheres with ``vqhps.train.train`` in this process
    (joined to a process group or not); returns (model, TrainResult)."""
    import trimesh

    from vqhps.config import RuntimeConfig, VQVAEConfig
    from vqhps.mesh.hierarchy import build_hierarchy
    from vqhps.train import rank_slice, step_indices, train
    from vqhps.vqvae import MeshVQVAE

    sphere = trimesh.creation.icosphere(subdivisions=2)
    hierarchy = build_hierarchy(sphere.vertices, sphere.faces, level_sizes=(48, 12), bottom_size=12)
    template = torch.tensor(sphere.vertices, dtype=torch.float32)
    torch.manual_seed(0)
    # a fast EMA (decay 0.5) and no restarts: codebook updates are large and deterministic, so they
    # only match one process's when the counts and sums are summed over the ranks
    cfg = VQVAEConfig(channels=(8, 16), latent_dim=4, codebook_size=16, ema_decay=0.5, dead_code_threshold=0.0)
    model = MeshVQVAE(template, hierarchy, cfg, body_id="test-sphere")
    model.quantizer.set_codebook(_initial_codes())
    gen = torch.Generator().manual_seed(2)
    meshes = template * (0.7 + 0.6 * torch.rand(N_MESHES, 1, 3, generator=gen))
    meshes = (meshes - meshes.mean(1, keepdim=True)).to(device)
    model = model.to(device)

    def batch_fn(step: int) -> torch.Tensor:
        return meshes[torch.as_tensor(rank_slice(step_indices(N_MESHES, GLOBAL_BATCH, step, seed=0)))]

    def loss_fn(m, batch, step):
        out = m(batch)
        return {"loss": out["loss"], "recon_mm": 1000 * out["recon_loss"].detach()}

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    runtime = RuntimeConfig(device="cpu", amp=False, compile=False, channels_last=False, log_every=1,
                            ckpt_every=100, progress=False)
    result = train("tiny", model, optimizer, scheduler, batch_fn, loss_fn, TOTAL, out_dir, runtime,
                   meta=model.checkpoint_meta(), stop_after=stop_after, global_batch=GLOBAL_BATCH, seed=0)
    return model, result


def _worker(out_dir: str, dump_dir: str, stop_after: int) -> None:
    from vqhps.distributed import current, setup_distributed, teardown_distributed

    torch.set_num_threads(1)
    info = setup_distributed("gloo")
    assert info.world == 2 and current().world == 2
    model, result = _tiny_run(Path(out_dir), stop_after)
    torch.save({"state": model.state_dict(), "history": result.history}, Path(dump_dir) / f"rank{info.rank}.pt")
    teardown_distributed()


# ------------------------------------------------------------------ the 2-process job
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Two gloo workers with torchrun's environment variables, stopped after SPLIT_AT of TOTAL steps."""
    root = tmp_path_factory.mktemp("ddp")
    out, dumps = root / "run", root / "dumps"
    dumps.mkdir()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, __file__, str(out), str(dumps), str(SPLIT_AT)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return out, [torch.load(dumps / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=k)


def test_two_processes_take_the_steps_of_one(two_process_run, tmp_path):
    out, dumps = two_process_run
    one, res = _tiny_run(tmp_path, stop_after=SPLIT_AT)
    _assert_same_weights(dumps[0]["state"], dumps[1]["state"], atol=0)  # ranks stay identical
    _assert_same_weights(dumps[0]["state"], one.state_dict())
    ckpt = torch.load(out / "tiny.pt", weights_only=False)
    _assert_same_weights(ckpt["model"], one.state_dict())
    assert ckpt["step"] == SPLIT_AT and ckpt["world"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model
    # the EMA codebook moved, and moved like one process's: the counts and sums were all-reduced
    assert not torch.allclose(one.quantizer.embed, _initial_codes(), atol=1e-2)
    # logged metrics are averages over the ranks, i.e. the global batch's, and the same on every rank
    for a, b in zip(dumps[0]["history"], res.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["recon_mm"] == pytest.approx(b["recon_mm"], rel=1e-5)
    untimed = [[{k: v for k, v in row.items() if k != "wall_s"} for row in d["history"]] for d in dumps]
    assert untimed[0] == untimed[1]
    assert sorted(p.name for p in out.iterdir()) == ["tiny.csv", "tiny.pt"]  # rank 0 wrote, once


def test_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path):
    out, _ = two_process_run
    shutil.copytree(out, tmp_path / "resumed")
    resumed, res = _tiny_run(tmp_path / "resumed")
    assert res.resumed_from == SPLIT_AT
    uninterrupted, _ = _tiny_run(tmp_path / "straight")
    _assert_same_weights(resumed.state_dict(), uninterrupted.state_dict())


# ------------------------------------------------------------------ the batch rule
def test_rank_slice_splits_the_global_batch_in_equal_contiguous_parts():
    from vqhps.train import rank_slice

    batch = np.array([7, 3, 9, 1, 4, 8, 2, 6])
    assert rank_slice(batch, rank=0, world=2).tolist() == [7, 3, 9, 1]
    assert rank_slice(batch, rank=1, world=2).tolist() == [4, 8, 2, 6]
    assert np.concatenate([rank_slice(batch, r, 4) for r in range(4)]).tolist() == batch.tolist()
    assert rank_slice(torch.as_tensor(batch), rank=1, world=2).tolist() == [4, 8, 2, 6]  # tensors too
    with pytest.raises(ValueError, match=r"global batch \(batch_size=6\) is not divisible by the 4 processes"):
        rank_slice(batch[:6], rank=0, world=4)


def test_train_refuses_a_global_batch_the_ranks_cannot_share(monkeypatch, tmp_path):
    import vqhps.train as train_mod
    from vqhps.distributed import DistInfo

    monkeypatch.setattr(train_mod, "current", lambda: DistInfo(rank=0, world=3))
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="multiple of 3"):
        train_mod.train("x", model, torch.optim.SGD(model.parameters(), lr=0.1), None, lambda s: None,
                        lambda m, b, s: {}, 1, tmp_path, None, global_batch=16)
    assert list(tmp_path.iterdir()) == []


def test_rank_seeds_differ_across_ranks_and_steps():
    from vqhps.train import rank_seed

    seeds = {rank_seed(0, r, s) for r in range(4) for s in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(0, 1, 5) == rank_seed(0, 1, 5) != rank_seed(1, 1, 5)


# ------------------------------------------------------------------ launcher and command line
def test_launch_runs_the_command_line_in_n_processes():
    from vqhps.distributed import launch

    out = launch(["train-vae", "--help"], nproc=2, timeout_s=120)
    assert out.count("usage: vqhps train-vae") == 2  # one help text per worker


def test_launch_failure_names_the_command_and_quotes_its_output():
    from vqhps.distributed import launch

    with pytest.raises(RuntimeError, match=r"(?s)vqhps train-vae --stage sideways.*failed.*invalid choice: 'sideways'"):
        launch(["train-vae", "--stage", "sideways"], nproc=1, timeout_s=120)
    with pytest.raises(ValueError, match="at least 1"):
        launch(["train-vae"], nproc=0)


def test_set_overrides_take_the_config_field_types():
    from vqhps.config import parse_overrides
    from vqhps.config import load_config

    got = parse_overrides(["vqvae.lr=1e-3", "vqvae.channels=8,16,32", "runtime.amp=false", "data.n_train=2_000",
                           "vqhps.backbone_weights=none", "vqhps.loss=3d", "runtime.device=cuda:1",
                           "hierarchy.level_sizes=(400, 54)", "vqvae.pretrain_steps=1e4"])
    assert got == {"vqvae.lr": 1e-3, "vqvae.channels": (8, 16, 32), "runtime.amp": False, "data.n_train": 2000,
                   "vqhps.backbone_weights": None, "vqhps.loss": "3d", "runtime.device": "cuda:1",
                   "hierarchy.level_sizes": (400, 54), "vqvae.pretrain_steps": 10_000}
    assert isinstance(got["vqvae.pretrain_steps"], int)
    cfg = load_config("smoke", **got)
    assert cfg.vqvae.channels == (8, 16, 32) and cfg.runtime.amp is False and math.isclose(cfg.vqvae.lr, 1e-3)


@pytest.mark.parametrize("pair, message", [
    ("vqvae.lr", "key=value"),
    ("vqvae.rate=1", "has no field 'rate'; choose one of .*'lr'"),
    ("runtime.amp=maybe", "expected true or false"),
    ("vqhps.loss=l2", r"choose one of \['ce', '3d'\]"),
    ("data.n_train=1.5", "expected an integer"),
    ("vqvae=1", "is a section"),
])
def test_bad_set_overrides_are_explained(pair, message):
    from vqhps.config import parse_overrides

    with pytest.raises(ValueError, match=message):
        parse_overrides([pair])


def test_train_command_without_vqhps_training_says_what_is_missing(monkeypatch, capsys):
    from vqhps.cli import main

    monkeypatch.setitem(sys.modules, "vqhps.hps_training", None)
    assert main(["train", "--profile", "smoke"]) == 2
    assert "vqhps/hps_training.py" in capsys.readouterr().err


if __name__ == "__main__":
    _worker(*sys.argv[1:3], int(sys.argv[3]))
