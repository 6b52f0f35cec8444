"""The token-table cache: a stored table is the one ``token_table`` computes, is read back instead of
re-encoding for the same inputs, and is not used when any input it depends on changes (Mesh-VQ-VAE
weights, body tensors, poses, shapes, device, batch size); a broken file is encoded again."""
from __future__ import annotations

import copy

import pytest
import torch

from vqhps import hps_training as H
from vqhps import token_cache
from vqhps.data import synthetic
from vqhps.vqvae_training import load_mesh_vqvae

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vqvaes(smoke_artifacts, body):
    return {stage: load_mesh_vqvae(smoke_artifacts, body, stage) for stage in ("finetune", "pretrain")}


@pytest.fixture(scope="module")
def arrays(smoke_artifacts):
    return {k: v[:6] for k, v in synthetic.load_split(smoke_artifacts, "train").items()}


def _cfg(smoke_cfg, tmp_path):
    cfg = copy.deepcopy(smoke_cfg)
    cfg.paths.results = tmp_path / "results"
    cfg.runtime.progress = False
    return cfg


def test_a_cached_table_is_the_encoded_one_and_is_read_back(smoke_cfg, tmp_path, body, vqvaes, arrays, monkeypatch):
    cfg, vqvae = _cfg(smoke_cfg, tmp_path), vqvaes["finetune"]
    expected = H.token_table(vqvae, body, arrays, CPU, H.TOKEN_BATCH)
    first = H.cached_token_table(cfg, vqvae, body, arrays, CPU)
    assert torch.equal(first, expected)
    assert len(list(H.token_cache_dir(cfg).glob("*.pt"))) == 1
    monkeypatch.setattr(H, "token_table", lambda *a, **k: pytest.fail("the cached table was encoded again"))
    again = H.cached_token_table(cfg, vqvae, body, arrays, CPU)
    assert torch.equal(again, expected) and again.dtype == torch.long
    # another Mesh-VQ-VAE is another table, encoded afresh
    with pytest.raises(pytest.fail.Exception, match="encoded again"):
        H.cached_token_table(cfg, vqvaes["pretrain"], body, arrays, CPU)


def test_the_key_follows_every_input(body, vqvaes, arrays):
    vqvae = vqvaes["finetune"]
    key = lambda v=vqvae, b=body, a=arrays, device=CPU, batch=256: token_cache.table_key(v, b, a, device, batch)  # noqa: E731
    base = key()
    assert key(v=copy.deepcopy(vqvae), a={k: v.copy() for k, v in arrays.items()}) == base  # same content
    assert key(v=vqvaes["pretrain"]) != base
    nudged = copy.deepcopy(vqvae)
    with torch.no_grad():
        next(nudged.encoder.parameters()).view(-1)[0] += 1e-3  # the encoder alone changes the ids
    assert key(v=nudged) != base
    moved = copy.deepcopy(body)
    moved.template += 1e-4
    assert key(b=moved) != base
    for field in ("pose", "shape"):
        changed = {k: v.copy() for k, v in arrays.items()}
        changed[field][0] += 0.01
        assert key(a=changed) != base, field
    assert key(a={k: v[:5] for k, v in arrays.items()}) != base
    assert key(device=torch.device("meta")) != base and key(batch=5) != base
    assert key(v=copy.deepcopy(vqvae).train()) != base


def test_a_broken_or_misshaped_file_is_encoded_again(tmp_path):
    table, calls = torch.arange(12).view(2, 2, 3), []

    def build():
        calls.append(1)
        return table.clone()

    torch.save(torch.zeros(2, 2, 4, dtype=torch.long), tmp_path / "k.pt")  # another token count
    assert torch.equal(token_cache.load_or_build(tmp_path, "k", build, CPU, (2, 2, 3)), table)
    assert len(calls) == 1
    assert torch.equal(token_cache.load_or_build(tmp_path, "k", build, CPU, (2, 2, 3)), table)
    assert len(calls) == 1  # the rewritten file is read back
    (tmp_path / "k.pt").write_bytes(b"not a tensor")
    assert torch.equal(token_cache.load_or_build(tmp_path, "k", build, CPU, (2, 2, 3)), table)
    assert len(calls) == 2
