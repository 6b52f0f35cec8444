"""Checkpoints: round trip, atomic writes that survive failures and kills, clear errors for missing,
corrupt and mismatched files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vqhps import checkpoint as ckpt
from vqhps.checkpoint import CheckpointError, CheckpointMismatch, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _payload(step: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(step))}, "step": step,
            "meta": {"body_id": "anny-13348-abc", "hierarchy_hash": "f00d", "config": {"lr": 1e-3}}}


def _assert_payload(payload: dict, step: int) -> None:
    assert payload["step"] == step
    assert torch.equal(payload["model"]["w"], torch.full((64, 64), float(step)))


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "model.pt", _payload(3))
    loaded = load_checkpoint(path, expect={"body_id": "anny-13348-abc", "hierarchy_hash": "f00d"})
    _assert_payload(loaded, 3)
    assert loaded["meta"]["config"] == {"lr": 1e-3}
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "model.pt", _payload(1))

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _payload(2))
    monkeypatch.undo()
    _assert_payload(load_checkpoint(path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "temporary file left behind"


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "model.pt", _payload(1))

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _payload(2))
    monkeypatch.undo()
    _assert_payload(load_checkpoint(path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_killed_writer_never_leaves_partial_file(tmp_path):
    """A process killed (SIGKILL) in the middle of torch.save: the target keeps the old checkpoint."""
    path = save_checkpoint(tmp_path / "model.pt", _payload(1))
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from vqhps import checkpoint as ckpt

        def slow_save(obj, f, *args, **kwargs):
            f.write(b"PK\\x03\\x04" + b"x" * 4096)
            f.flush()
            Path({str(started)!r}).touch()
            time.sleep(60)

        ckpt.torch.save = slow_save
        ckpt.save_checkpoint({str(path)!r}, {{"step": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None, "writer exited before it started writing"
            assert time.monotonic() < deadline, "writer never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_payload(load_checkpoint(path), 1)
    # the half-written bytes only ever lived in a temporary file
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("model.pt", "started")]
    assert all(p.name.startswith(".model.pt.") and p.suffix == ".tmp" for p in leftovers)


def test_mismatch_names_file_field_values_and_fix(tmp_path):
    path = save_checkpoint(tmp_path / "vqvae.pt", _payload(1))
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(path, expect={"body_id": "smpl-6890-xyz"})
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    for part in (str(path), "body_id", "smpl-6890-xyz", "anny-13348-abc", "retrain"):
        assert part in message
    with pytest.raises(CheckpointMismatch, match="hierarchy_hash"):
        load_checkpoint(path, expect={"body_id": "anny-13348-abc", "hierarchy_hash": "beef"})
    with pytest.raises(CheckpointMismatch, match="<missing>"):
        load_checkpoint(path, expect={"profile": "full"})


def test_nested_config_difference_is_named(tmp_path):
    path = save_checkpoint(tmp_path / "vqvae.pt", _payload(1) | {"meta": {"config": {"lr": 1e-3, "channels": (8, 16)}}})
    load_checkpoint(path, expect={"config": {"lr": 1e-3, "channels": [8, 16]}})  # JSON lists match tuples
    with pytest.raises(CheckpointMismatch, match=r"config\.channels is \(8, 16\) but \[8, 32\]"):
        load_checkpoint(path, expect={"config": {"lr": 1e-3, "channels": [8, 32]}})
    with pytest.raises(CheckpointMismatch, match=r"config\.channels"):
        load_checkpoint(path, expect={"config": {"lr": 1e-3}})


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(path)


def test_corrupt_file_names_path(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", _payload(1))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_umask_mode(tmp_path, umask, mode):
    """A file written through atomic_write has the mode open() would give it (mkstemp's 0600 is not
    kept), also when it replaces a file with another mode."""
    before = os.umask(umask)
    try:
        fresh = ckpt.atomic_write(tmp_path / "fresh.bin", lambda f: f.write(b"x"))
        old = tmp_path / "old.bin"
        old.write_bytes(b"old")
        old.chmod(0o600 if mode != 0o600 else 0o644)
        ckpt.atomic_write(old, lambda f: f.write(b"new"))
    finally:
        os.umask(before)
    assert fresh.stat().st_mode & 0o777 == mode and old.stat().st_mode & 0o777 == mode
    assert old.read_bytes() == b"new"
