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


def test_a_batch_posed_with_its_chunk_equals_the_batch_posed_alone(body, monkeypatch):
    from vqhps.data import corpus

    monkeypatch.setattr(corpus, "POSE_PIECE", 5)  # a chunk of 64 meshes posed in 13 uneven pieces
    for index in (0, 37, corpus.CHUNK + 2):  # first, middle, and a batch of the next chunk
        pose, shape = corpus.corpus_parameters("train", index, 1, 0)
        with torch.no_grad():
            alone = body(pose, torch.as_tensor(shape)).vertices
        torch.testing.assert_close(corpus_batch(body, "train", index, 1, seed=0), alone - alone.mean(1, keepdim=True),
                                   rtol=0, atol=1e-6)
