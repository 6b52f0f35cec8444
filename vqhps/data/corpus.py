"""The mesh corpus (AMASS analogue) for Mesh-VQ-VAE pre-training: canonical meshes (zero global
orientation, centred on the vertex mean) of library poses on random adult phenotypes.

Meshes are generated on the fly from (seed, part, index): the training stream is endless and
reproducible, and the held-out test part is a fixed set that never overlaps it (different seeds).
Poses are drawn a chunk of batches at a time (vectorised sampling), so a step costs milliseconds.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

PARTS = {"train": 0, "test": 1}
#: batches whose poses and shapes are drawn together
CHUNK = 64


@lru_cache(maxsize=2)
def _chunk(part: str, chunk: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from vqhps.body.anny_body import sample_phenotypes
    from vqhps.data.poses import PoseSampler

    key = [seed, PARTS[part], chunk]
    shape = sample_phenotypes(np.random.default_rng(key + [17]), CHUNK * batch)
    pose_seed = int(np.random.default_rng(key).integers(2**31))
    angles, _ = PoseSampler(seed=pose_seed).sample_angles(CHUNK * batch)
    return angles, shape


def corpus_parameters(part: str, index: int, batch: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Pose (B,104,3,3) and phenotype (B,6) of corpus batch ``index`` of ``part``."""
    from vqhps.data.poses import angles_to_local_rotations

    chunk, pos = divmod(index, CHUNK)
    angles, shape = _chunk(part, chunk, batch, seed)
    rows = slice(pos * batch, (pos + 1) * batch)
    return angles_to_local_rotations(angles[rows]), shape[rows]


#: meshes posed per body-model call when a chunk is posed (bounds the posing's peak memory)
POSE_PIECE = 1024
#: the last posed chunk: (key, canonical meshes of its CHUNK batches)
_posed: dict[str, tuple[tuple, torch.Tensor]] = {}


def _posed_chunk(body, part: str, chunk: int, batch: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Canonical meshes (CHUNK * batch, V, 3) of one chunk, posed a piece of POSE_PIECE meshes at a
    time: one body-model call per piece rather than per batch (posing costs about as much for 1,024
    meshes as for 64: it is bounded by kernel launches). The last chunk stays cached."""
    from vqhps.data.poses import angles_to_local_rotations

    key = (id(body), part, chunk, batch, seed, str(device))
    cached = _posed.get("chunk")
    if cached is not None and cached[0] == key:
        return cached[1]
    _posed.clear()  # release the previous chunk before posing the next
    angles, shape = _chunk(part, chunk, batch, seed)
    meshes = torch.cat([_canonical(body, angles_to_local_rotations(angles[i:i + POSE_PIECE]),
                                   shape[i:i + POSE_PIECE], device) for i in range(0, len(angles), POSE_PIECE)])
    _posed["chunk"] = (key, meshes)
    return meshes


def _canonical(body, pose: torch.Tensor, shape: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Canonical meshes of (pose, phenotype) pairs, on ``device``: the benchmark's own targets."""
    from vqhps.data.datasets import canonical_targets

    return canonical_targets(body, pose, torch.as_tensor(shape)).to(device)


def corpus_batch(body, part: str, index: int, batch: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Canonical meshes (B, V, 3) of corpus batch ``index`` of ``part`` (its chunk is posed at once and
    kept for the chunk's other batches)."""
    chunk, pos = divmod(index, CHUNK)
    return _posed_chunk(body, part, chunk, batch, seed, device)[pos * batch:(pos + 1) * batch]


def corpus_test_set(body, n: int, seed: int, batch: int = 100, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed held-out test part: ``n`` canonical meshes."""
    chunks = [_canonical(body, *corpus_parameters("test", i, min(batch, n - i * batch), seed), device)
              for i in range((n + batch - 1) // batch)]
    return torch.cat(chunks)
