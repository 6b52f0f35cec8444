"""Checkpoints written atomically and checked against what the caller expects.

``save_checkpoint`` writes to a temporary file in the target's folder, flushes and fsyncs it, then
renames it over the target: a crash or kill mid-write leaves the previous checkpoint untouched.
``load_checkpoint`` compares ``payload["meta"]`` with ``expect`` (e.g. body_id, hierarchy_hash) so a
Mesh-VQ-VAE trained on another body model or hierarchy is refused with a one-line explanation.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch

_MISSING = "<missing>"
_FIXES = {
    "body_id": "retrain the Mesh-VQ-VAE for this body model or pass the matching checkpoint",
    "hierarchy_hash": "retrain the Mesh-VQ-VAE for this template/hierarchy or pass the matching checkpoint",
}
_DEFAULT_FIX = "retrain with the expected setting or pass the matching checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, not a checkpoint)."""


class CheckpointMismatch(ValueError):
    """A checkpoint's metadata disagrees with what the caller expects."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Create ``path`` by ``write(binary_file)`` on a temporary file in the same folder, fsync, then
    rename: readers see the old file or the whole new one, never a part. On any failure the temporary
    file is removed and an existing file at ``path`` stays as it was. The file gets the mode a plain
    ``open()`` would give it (:func:`new_file_mode`, 0644 under the usual umask 022), not mkstemp's
    0600. Every file the project writes for later reuse (checkpoints, shards, caches, logs,
    manifests, demo outputs) goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, new_file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def new_file_mode() -> int:
    """0666 less the process umask: the mode a new file gets from ``open()``, so that files written
    through a temporary file are as readable by others as any other file the user writes."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read from /proc where it exists (setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save`` atomically (:func:`atomic_write`); returns the path."""
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, expect: dict[str, Any] | None = None,
                    map_location: str | torch.device = "cpu", weights_only: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    ``expect`` maps metadata fields to required values; any difference from ``payload["meta"]``
    raises :class:`CheckpointMismatch`. A missing file raises ``FileNotFoundError``, an unreadable
    one :class:`CheckpointError`, both naming the path. ``weights_only=False`` (default) because the
    project's checkpoints hold optimiser and RNG state; only load files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - every reader failure means the same thing to the user
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); delete it and rerun the step "
                              f"that writes it") from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a dict payload")
    if expect:
        check_meta(payload.get("meta", {}), expect, path)
    return payload


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's ``meta`` read lazily (memory-mapped), for checks before a run resumes it; None
    when there is no file or it cannot be read (the training loop then reports it with the fix)."""
    if not Path(path).is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("meta", {})
    except Exception:  # noqa: BLE001 - any unreadable file: reported where it is loaded
        return None


def check_meta(meta: dict[str, Any], expect: dict[str, Any], path: str | os.PathLike = "<checkpoint>") -> None:
    """Raise :class:`CheckpointMismatch` on the first field of ``expect`` that ``meta`` does not match
    (nested dicts are compared key by key, so the message names e.g. ``config.codebook_size``)."""
    diff = _first_difference(meta if isinstance(meta, dict) else {}, expect)
    if diff is not None:
        field, found, wanted = diff
        fix = _FIXES.get(field.split(".")[0], _DEFAULT_FIX)
        raise CheckpointMismatch(f"checkpoint {path}: {field} is {found!r} but {wanted!r} was expected; {fix}")


def _first_difference(found: dict[str, Any], wanted: dict[str, Any],
                      prefix: str = "") -> tuple[str, Any, Any] | None:
    for key, value in wanted.items():
        have = found.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(have, dict):
            inner = _first_difference(have, value, f"{prefix}{key}.")
            if inner is not None:
                return inner
            extra = sorted(set(have) - set(value))
            if extra:
                return f"{prefix}{key}.{extra[0]}", have[extra[0]], _MISSING
        elif not _same(have, value):
            return f"{prefix}{key}", have, value
    return None


def _same(a: Any, b: Any) -> bool:
    """Equality that lets a tuple match the list it becomes after a trip through JSON."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable where the OS allows opening folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def state_fingerprint(state: dict[str, torch.Tensor], keep: Callable[[str], bool] = lambda key: True) -> str:
    """Short hash of the tensors of a state dict (those whose key ``keep`` accepts)."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if keep(k)):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
