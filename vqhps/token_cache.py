"""On-disk cache of VQ-HPS token tables (``hps_training.token_table``).

A token table (every training image's ground-truth mesh and its mirror, encoded by the frozen
Mesh-VQ-VAE) takes seconds on a GPU and most of a minute on a small CPU, and several runs need the
same one: notebook 05's reference, 3D-loss and no-reprojection ablations all use notebook 03's
training split, body and fine-tuned Mesh-VQ-VAE. The table is a pure function of its inputs, so it
is stored under a key that hashes every one of them: the Mesh-VQ-VAE's parameters and buffers (and
whether it is in training mode), the body model's tensors and identifier, the split's pose and
shape arrays, the device type, the encoding batch size, the torch version and ``FORMAT``. Changing
any of them gives another key, hence a freshly encoded table; an unreadable or mis-shaped file is
encoded again and replaced.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import atomic_write, state_fingerprint
from .distributed import current

#: raise when ``token_table`` changes what it computes: older files then no longer match
FORMAT = 1


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module``, non-persistent buffers included (the body's are)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def table_key(vqvae: torch.nn.Module, body: torch.nn.Module, arrays: dict[str, np.ndarray],
              device: torch.device, batch_size: int) -> str:
    """Hex digest of everything ``token_table(vqvae, body, arrays, device, batch_size)`` depends on."""
    h = hashlib.sha256()
    h.update(f"format={FORMAT}|torch={torch.__version__}|device={torch.device(device).type}|"
             f"batch={int(batch_size)}|body={body.identifier()}|vqvae_training={vqvae.training}|"
             f"vqvae_tensors={state_fingerprint(_tensors(vqvae))}|body_tensors={state_fingerprint(_tensors(body))}".encode())
    for key in ("pose", "shape"):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def load_or_build(directory: Path, key: str, build: Callable[[], torch.Tensor], device: torch.device,
                  shape: tuple[int, ...]) -> torch.Tensor:
    """The table stored as ``directory/<key>.pt`` when it is a readable long tensor of ``shape``
    ((N, 2, n_tokens)), else ``build()``, written there (by the main process) for later runs. On
    ``device``."""
    path = Path(directory) / f"{key}.pt"
    if path.is_file():
        try:
            table = torch.load(path, map_location=device, weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable cache entry is rebuilt
            table = None
        if isinstance(table, torch.Tensor) and table.dtype == torch.long and tuple(table.shape) == tuple(shape):
            return table
    table = build()
    if current().is_main:
        cpu = table.detach().cpu()
        atomic_write(path, lambda f: torch.save(cpu, f))
    return table
