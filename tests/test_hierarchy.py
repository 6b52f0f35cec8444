"""Mesh hierarchy: exact level sizes, nesting, full coverage by pool and unpool graphs on one- and
multi-component meshes, determinism and the on-disk cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from vqhps.mesh import hierarchy as hmod
from vqhps.mesh.hierarchy import MeshHierarchy, build_hierarchy, resolve_level_sizes

ARRAY_FIELDS = ("level_vertices", "conv_index", "conv_mask", "pool_index", "pool_mask", "pool_weight",
                "unpool_index", "unpool_mask", "unpool_weight")


@pytest.fixture(scope="module")
def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=4)


@pytest.fixture(scope="module")
def two_pieces() -> tuple[np.ndarray, np.ndarray]:
    """A sphere and a smaller, distant sphere: two connected components."""
    a = trimesh.creation.icosphere(subdivisions=3)
    b = trimesh.creation.icosphere(subdivisions=2)
    verts = np.concatenate([a.vertices, 0.5 * b.vertices + [4.0, 0.0, 0.0]])
    faces = np.concatenate([a.faces, b.faces + len(a.vertices)])
    return verts, faces


@pytest.fixture(scope="module")
def sphere_hierarchy(sphere) -> MeshHierarchy:
    return build_hierarchy(sphere.vertices, sphere.faces)


def _assert_same(h1: MeshHierarchy, h2: MeshHierarchy) -> None:
    assert h1.hash == h2.hash
    assert h1.sizes == h2.sizes
    for name in ARRAY_FIELDS:
        for a, b in zip(getattr(h1, name), getattr(h2, name), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), name


def _assert_graphs_cover(h: MeshHierarchy) -> None:
    """Every fine vertex is pooled into some coarse vertex and reached when unpooling."""
    for level in range(h.n_levels):
        n_fine, n_coarse = h.sizes[level], h.sizes[level + 1]
        idx, mask, w = h.pool_index[level], h.pool_mask[level], h.pool_weight[level]
        assert idx.shape[0] == n_coarse and idx[mask].max() < n_fine
        covered = np.zeros(n_fine, dtype=bool)
        covered[idx[mask]] = True
        assert covered.all(), f"level {level}: {np.sum(~covered)} fine vertices not pooled"
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
        assert (w[~mask] == 0).all() and (w[mask] >= 0).all()

        uidx, umask, uw = h.unpool_index[level], h.unpool_mask[level], h.unpool_weight[level]
        assert uidx.shape[0] == n_fine and uidx[umask].max() < n_coarse
        assert umask.any(axis=1).all(), f"level {level}: some fine vertices receive nothing"
        np.testing.assert_allclose(uw.sum(1), 1.0, atol=1e-5)


def test_derived_sizes_follow_smpl_ratios(sphere, sphere_hierarchy):
    v = len(sphere.vertices)
    assert sphere_hierarchy.sizes == (v, round(v * 1925 / 6890), round(v * 400 / 6890), 54)


def test_explicit_sizes_are_exact(sphere):
    h = build_hierarchy(sphere.vertices, sphere.faces, level_sizes=(900, 300, 40), bottom_size=40)
    assert h.sizes == (len(sphere.vertices), 900, 300, 40)
    assert [len(c) for c in h.conv_index] == list(h.sizes)
    h = build_hierarchy(sphere.vertices, sphere.faces, level_sizes=(500, 120))
    assert h.sizes[-1] == 54 and h.sizes[1:] == (500, 120, 54)


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError, match="decrease"):
        resolve_level_sizes(1000, (300, 400, 54))
    with pytest.raises(ValueError, match="bottom_size"):
        resolve_level_sizes(40, None, bottom_size=54)


def test_levels_are_nested_and_conv_neighbourhoods_start_with_self(sphere_hierarchy):
    h = sphere_hierarchy
    for level in range(h.n_levels):
        assert set(h.level_vertices[level + 1]) <= set(h.level_vertices[level])
        assert len(np.unique(h.level_vertices[level + 1])) == h.sizes[level + 1]
    for level, (idx, mask) in enumerate(zip(h.conv_index, h.conv_mask)):
        assert np.array_equal(idx[:, 0], np.arange(h.sizes[level]))
        assert mask[:, 0].all() and mask.sum(1).max() <= 26
        assert mask.sum(1).min() >= 2, "every vertex should see at least one neighbour"


def test_pool_and_unpool_cover_every_vertex(sphere_hierarchy):
    _assert_graphs_cover(sphere_hierarchy)
    mean_pool = [m.sum(1).mean() for m in sphere_hierarchy.pool_mask]
    assert all(12 <= m <= 20 for m in mean_pool), mean_pool


def test_two_components(two_pieces):
    verts, faces = two_pieces
    h = build_hierarchy(verts, faces, level_sizes=(300, 120, 54))
    assert h.sizes == (len(verts), 300, 120, 54)
    _assert_graphs_cover(h)
    # both pieces keep bottom tokens, and pooling never mixes the far-apart pieces
    piece = (np.arange(len(verts)) >= 642).astype(int)
    assert set(piece[h.level_vertices[-1]]) == {0, 1}
    for level in range(h.n_levels):
        fine, coarse = piece[h.level_vertices[level]], piece[h.level_vertices[level + 1]]
        idx, mask = h.pool_index[level], h.pool_mask[level]
        assert (fine[idx][mask] == np.repeat(coarse, mask.sum(1))).all()


def test_small_component_without_samples_is_still_covered():
    """A tiny piece that gets no coarse sample is attached through the Euclidean fallback."""
    big = trimesh.creation.icosphere(subdivisions=3)
    tiny = trimesh.creation.icosphere(subdivisions=1)
    verts = np.concatenate([big.vertices, 0.02 * tiny.vertices + [1.05, 0.0, 0.0]])
    faces = np.concatenate([big.faces, tiny.faces + len(big.vertices)])
    h = build_hierarchy(verts, faces, level_sizes=(200, 100, 54))
    tiny_ids = set(range(len(big.vertices), len(verts)))
    assert not tiny_ids & set(h.level_vertices[1]), "fixture expects the tiny piece to go unsampled"
    _assert_graphs_cover(h)


def test_build_is_deterministic(two_pieces):
    verts, faces = two_pieces
    _assert_same(build_hierarchy(verts, faces), build_hierarchy(verts.copy(), faces.copy()))


def test_hash_depends_on_template_and_settings(sphere, sphere_hierarchy):
    moved = sphere.vertices * 1.01
    assert build_hierarchy(moved, sphere.faces).hash != sphere_hierarchy.hash
    assert build_hierarchy(sphere.vertices, sphere.faces, pool_neighbours=12).hash != sphere_hierarchy.hash


def test_cache_hit_skips_rebuild(sphere, tmp_path, monkeypatch):
    first = build_hierarchy(sphere.vertices, sphere.faces, cache_dir=tmp_path)
    files = list(tmp_path.glob("hierarchy_*.npz"))
    assert [f.name for f in files] == [f"hierarchy_{first.hash}.npz"]
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"

    def no_rebuild(*args, **kwargs):
        raise AssertionError("hierarchy rebuilt although a valid cache file exists")

    monkeypatch.setattr(hmod, "_build", no_rebuild)
    _assert_same(first, build_hierarchy(sphere.vertices, sphere.faces, cache_dir=tmp_path))


def test_corrupt_cache_is_rebuilt(sphere, tmp_path):
    first = build_hierarchy(sphere.vertices, sphere.faces, cache_dir=tmp_path)
    path = tmp_path / f"hierarchy_{first.hash}.npz"
    path.write_bytes(b"not an npz")
    _assert_same(first, build_hierarchy(sphere.vertices, sphere.faces, cache_dir=tmp_path))
    _assert_same(first, MeshHierarchy.load(path))


def test_torch_helpers(sphere_hierarchy):
    idx, mask, w = sphere_hierarchy.pool_graph(0)
    assert idx.dtype == torch.long and mask.dtype == torch.bool and w.dtype == torch.float32
    assert w.shape == idx.shape
    tensors = sphere_hierarchy.to_torch()
    assert tensors["unpool_index_0"].shape == sphere_hierarchy.unpool_index[0].shape
