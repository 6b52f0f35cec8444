"""The mesh corpus: canonical meshes, reproducible per step, with a held-out part apart from training."""
import torch

from vqhps.data.corpus import corpus_batch, corpus_test_set


def test_corpus_batches_are_canonical_reproducible_and_held_out(body):
    a = corpus_batch(body, "train", 3, 2, seed=0)
    assert torch.equal(a, corpus_batch(body, "train", 3, 2, seed=0))
    assert a.mean(1).abs().max() < 1e-5  # centred on the vertex mean
    assert not torch.allclose(a, corpus_batch(body, "train", 4, 2, seed=0))
    test = corpus_test_set(body, 3, seed=0, batch=2)
    assert test.shape == (3, body.n_vertices, 3) and torch.equal(test, corpus_test_set(body, 3, seed=0, batch=2))
    assert not any(torch.allclose(t, m) for t in test for m in a)
