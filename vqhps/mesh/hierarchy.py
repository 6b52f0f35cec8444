"""Pooling hierarchy of a template mesh: nested farthest-point samples and the conv / pool / unpool
graphs between them, computed from any mesh, deterministic, cached by content hash.

Level 0 is the full mesh; level ``l + 1`` is a farthest-point sample of level ``l``'s vertices, so the
levels are nested. Distances run along the mesh edges, each weighing ``length**a``: ``a`` rises from
``FINE_EXPONENT`` at the first coarse level (close to hop counts, following the mesh's own vertex
density) to 1 at the bottom (geodesic: tokens spread evenly over the surface). A component holding no
sample of a level is attached to it through (rescaled) Euclidean distances.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree

#: bump when the construction changes, so cached hierarchies are rebuilt
HIERARCHY_VERSION = 1
#: the paper's SMPL hierarchy 6890 -> 1925 -> 400 -> 54, used as ratios for other templates
SMPL_LEVELS = (6890, 1925, 400)
#: each fine vertex is unpooled from (at most) this many nearest coarse vertices
UNPOOL_NEIGHBOURS = 4
#: conv neighbourhoods of coarse levels: samples within this many covering radii, at least this many
CONV_RADIUS_FACTOR = 2.0
MIN_CONV_NEIGHBOURS = 5
#: edge-metric exponent of the first coarse level (0 = hop counts, 1 = geodesic; see metric_exponents)
FINE_EXPONENT = 0.25

_FIELDS_PER_LEVEL = ("level_vertices", "conv_index", "conv_mask")
_FIELDS_PER_STEP = ("pool_index", "pool_mask", "pool_weight", "unpool_index", "unpool_mask", "unpool_weight")


@dataclass
class MeshHierarchy:
    """Arrays of a pooling hierarchy. Lists have one entry per level (``conv_*``, ``level_vertices``)
    or per step ``l -> l + 1`` (``pool_*``, ``unpool_*``); padded neighbours have mask False, index 0
    and weight 0.

    - ``level_vertices[l]`` (N_l,) mesh indices of level ``l`` (level 0 is ``arange(V)``)
    - ``conv_index[l]`` (N_l, K_l) neighbours of each level-``l`` vertex within level ``l``, itself first
    - ``pool_index[l]`` (N_{l+1}, P_l) level-``l`` vertices pooled into each level-``l+1`` vertex,
      ``pool_weight[l]`` rows sum to 1
    - ``unpool_index[l]`` (N_l, U_l) level-``l+1`` vertices interpolated into each level-``l`` vertex,
      ``unpool_weight[l]`` rows sum to 1
    """

    template: np.ndarray
    faces: np.ndarray
    level_vertices: list[np.ndarray]
    conv_index: list[np.ndarray]
    conv_mask: list[np.ndarray]
    pool_index: list[np.ndarray]
    pool_mask: list[np.ndarray]
    pool_weight: list[np.ndarray]
    unpool_index: list[np.ndarray]
    unpool_mask: list[np.ndarray]
    unpool_weight: list[np.ndarray]
    #: covering radius of each level and pooling radius of each step, in the edge metric that sampled
    #: the coarser level (0 for the full mesh)
    cover_radius: np.ndarray
    pool_radius: np.ndarray
    hash: str
    settings: dict = field(default_factory=dict)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Vertex count of every level, the full mesh first and the bottom level last."""
        return tuple(int(v.shape[0]) for v in self.level_vertices)

    @property
    def n_levels(self) -> int:
        """Number of pooling steps (levels below the full mesh)."""
        return len(self.level_vertices) - 1

    # ---------------------------------------------------------------- torch helpers
    def conv_graph(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index long, mask bool) of the conv neighbourhoods of ``level``."""
        return torch.from_numpy(self.conv_index[level]).long(), torch.from_numpy(self.conv_mask[level])

    def pool_graph(self, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, mask, weight float32) pooling ``level`` -> ``level + 1``."""
        return (torch.from_numpy(self.pool_index[level]).long(), torch.from_numpy(self.pool_mask[level]),
                torch.from_numpy(self.pool_weight[level]).float())

    def unpool_graph(self, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, mask, weight float32) unpooling ``level + 1`` -> ``level``."""
        return (torch.from_numpy(self.unpool_index[level]).long(), torch.from_numpy(self.unpool_mask[level]),
                torch.from_numpy(self.unpool_weight[level]).float())

    def to_torch(self) -> dict[str, torch.Tensor]:
        """Every per-level array as a torch tensor, keyed ``<field>_<level>`` (as in the .npz)."""
        return {k: torch.from_numpy(v) for k, v in self._arrays().items()
                if k.split("_")[0] in ("level", "conv", "pool", "unpool")}

    # ---------------------------------------------------------------- persistence
    def _arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {
            "template": self.template, "faces": self.faces, "cover_radius": self.cover_radius,
            "pool_radius": self.pool_radius, "hash": np.array(self.hash),
            "settings": np.array(json.dumps(self.settings, sort_keys=True)),
        }
        for name in _FIELDS_PER_LEVEL + _FIELDS_PER_STEP:
            for i, arr in enumerate(getattr(self, name)):
                out[f"{name}_{i}"] = arr
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz atomically (temporary file in the same folder, then rename)."""
        from vqhps.checkpoint import atomic_write

        arrays = self._arrays()
        return atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MeshHierarchy":
        """Read a hierarchy written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        n_levels = sum(1 for k in data if k.startswith("level_vertices_"))
        lists = {name: [data[f"{name}_{i}"] for i in range(n_levels)] for name in _FIELDS_PER_LEVEL}
        lists.update({name: [data[f"{name}_{i}"] for i in range(n_levels - 1)] for name in _FIELDS_PER_STEP})
        return cls(template=data["template"], faces=data["faces"], cover_radius=data["cover_radius"],
                   pool_radius=data["pool_radius"], hash=str(data["hash"]),
                   settings=json.loads(str(data["settings"])), **lists)


# -------------------------------------------------------------------- public entry point
def resolve_level_sizes(n_vertices: int, level_sizes: tuple[int, ...] | None = None,
                        bottom_size: int = 54) -> tuple[int, ...]:
    """Vertex counts below the full mesh, bottom last. ``None`` scales the paper's SMPL ratios to
    ``n_vertices`` and drops levels that would not lie strictly between the mesh and the bottom."""
    if n_vertices <= bottom_size:
        raise ValueError(f"template has {n_vertices} vertices, not more than bottom_size={bottom_size}")
    if level_sizes is None:
        derived = [round(n_vertices * n / SMPL_LEVELS[0]) for n in SMPL_LEVELS[1:]]
        sizes = [n for n in derived if bottom_size < n < n_vertices] + [bottom_size]
    else:
        sizes = [int(n) for n in level_sizes]
        if not sizes or sizes[-1] > bottom_size:
            sizes.append(bottom_size)
        elif sizes[-1] < bottom_size:
            raise ValueError(f"level_sizes {tuple(level_sizes)} end below bottom_size={bottom_size}")
    chain = [n_vertices] + sizes
    if any(a <= b for a, b in zip(chain, chain[1:])):
        raise ValueError(f"level sizes must strictly decrease from the {n_vertices}-vertex mesh: {sizes}")
    return tuple(sizes)


def hierarchy_hash(vertices: np.ndarray, faces: np.ndarray, settings: dict) -> str:
    """sha1 of the template, the faces and the construction settings."""
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(vertices, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(faces, dtype=np.int64).tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def build_hierarchy(vertices: np.ndarray | torch.Tensor, faces: np.ndarray | torch.Tensor,
                    level_sizes: tuple[int, ...] | None = None, bottom_size: int = 54,
                    pool_neighbours: int = 16, max_neighbours: int = 26,
                    cache_dir: str | os.PathLike | None = None) -> MeshHierarchy:
    """Build (or load from ``cache_dir``) the hierarchy of a template mesh.

    ``vertices`` (V, 3), ``faces`` (F, 3); ``level_sizes`` excludes the full mesh and ends with
    ``bottom_size`` (see :func:`resolve_level_sizes`). ``pool_neighbours`` is the mean number of fine
    vertices pooled into a coarse one, ``max_neighbours`` caps conv and pool neighbourhoods (a pool
    neighbourhood only exceeds it to keep every fine vertex covered).
    """
    verts = _as_numpy(vertices, np.float64)
    tris = _as_numpy(faces, np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3 or tris.ndim != 2 or tris.shape[1] != 3:
        raise ValueError(f"expected vertices (V, 3) and faces (F, 3), got {verts.shape} and {tris.shape}")
    if tris.size and (tris.min() < 0 or tris.max() >= len(verts)):
        raise ValueError("faces index vertices outside the template")
    sizes = resolve_level_sizes(len(verts), level_sizes, bottom_size)
    settings = {"version": HIERARCHY_VERSION, "level_sizes": list(sizes), "bottom_size": bottom_size,
                "pool_neighbours": pool_neighbours, "max_neighbours": max_neighbours,
                "unpool_neighbours": UNPOOL_NEIGHBOURS, "conv_radius_factor": CONV_RADIUS_FACTOR,
                "min_conv_neighbours": MIN_CONV_NEIGHBOURS,
                "metric_exponents": list(metric_exponents(len(sizes)))}
    digest = hierarchy_hash(verts, tris, settings)

    cache_path = Path(cache_dir) / f"hierarchy_{digest}.npz" if cache_dir is not None else None
    if cache_path is not None and cache_path.exists():
        cached = _load_valid(cache_path, digest)
        if cached is not None:
            return cached
    hierarchy = _build(verts, tris, sizes, pool_neighbours, max_neighbours, digest, settings)
    if cache_path is not None:
        hierarchy.save(cache_path)
    return hierarchy


def _load_valid(path: Path, digest: str) -> MeshHierarchy | None:
    """The cached hierarchy, or None when the file is unreadable or belongs to other settings."""
    try:
        cached = MeshHierarchy.load(path)
    except Exception:  # noqa: BLE001 - a broken cache file is simply rebuilt
        return None
    return cached if cached.hash == digest else None


def _as_numpy(x: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


# -------------------------------------------------------------------- construction
def metric_exponents(n_levels: int) -> tuple[float, ...]:
    """Exponent ``a`` of the edge metric ``length**a`` used to sample each coarse level.

    Rises from ``FINE_EXPONENT`` (close to hop counts: samples follow the mesh's own vertex density,
    so dense hands and faces keep detail) to 1 (geodesic: the bottom tokens spread evenly over the
    body). The gradual change keeps pool neighbourhoods bounded on meshes of uneven density."""
    if n_levels == 1:
        return (1.0,)
    return tuple(float(a) for a in np.linspace(FINE_EXPONENT, 1.0, n_levels))


@dataclass
class _Mesh:
    """Edge graph of the template with component labels."""

    pos: np.ndarray
    edges: np.ndarray
    length: np.ndarray
    comp: np.ndarray
    n_comp: int

    @classmethod
    def from_faces(cls, pos: np.ndarray, faces: np.ndarray) -> "_Mesh":
        edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        edges = np.unique(np.sort(edges, axis=1), axis=0)
        edges = edges[edges[:, 0] != edges[:, 1]]
        length = np.linalg.norm(pos[edges[:, 0]] - pos[edges[:, 1]], axis=1)
        # csgraph treats stored zeros as missing edges: keep coincident vertices connected
        scale = float(np.ptp(pos, axis=0).max()) if len(pos) else 1.0
        length = np.maximum(length, 1e-9 * max(scale, 1e-12))
        mesh = cls(pos=pos, edges=edges, length=length, comp=np.zeros(len(pos), dtype=np.int64), n_comp=1)
        mesh.n_comp, mesh.comp = connected_components(mesh.metric(1.0).graph, directed=False)
        return mesh

    def metric(self, exponent: float) -> "_Metric":
        """Edge weights ``length**exponent``; Euclidean distances are converted to the same units
        through the median edge length (a straight segment of ``m`` median edges weighs ``m`` edges)."""
        w = self.length ** exponent
        n = len(self.pos)
        graph = sp.coo_matrix((np.concatenate([w, w]),
                               (np.concatenate([self.edges[:, 0], self.edges[:, 1]]),
                                np.concatenate([self.edges[:, 1], self.edges[:, 0]]))), shape=(n, n)).tocsr()
        median = float(np.median(self.length)) if len(self.length) else 1.0
        return _Metric(self, graph, median ** (exponent - 1.0))


@dataclass
class _Metric:
    """A mesh with one edge metric: Dijkstra along edges, scaled Euclidean distance across components."""

    mesh: _Mesh
    graph: sp.csr_matrix
    euclid_scale: float

    def euclid(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.norm(a - b, axis=-1) * self.euclid_scale


def _build(verts: np.ndarray, faces: np.ndarray, sizes: tuple[int, ...], pool_neighbours: int,
           max_neighbours: int, digest: str, settings: dict) -> MeshHierarchy:
    mesh = _Mesh.from_faces(verts, faces)
    metrics = [mesh.metric(a) for a in metric_exponents(len(sizes))]
    level_vertices = [np.arange(len(verts), dtype=np.int64)]
    cover = [0.0]
    for n, metric in zip(sizes, metrics):
        picks, radius = _farthest_points(metric, level_vertices[-1], n)
        level_vertices.append(picks)
        cover.append(radius)

    conv = [_ring_neighbourhoods(metrics[0].graph)]
    for level in range(1, len(level_vertices)):
        conv.append(_radius_neighbourhoods(metrics[level - 1], level_vertices[level],
                                           CONV_RADIUS_FACTOR * cover[level], max_neighbours))

    steps: dict[str, list[np.ndarray]] = {name: [] for name in _FIELDS_PER_STEP}
    pool_radius = []
    for level in range(len(sizes)):
        graphs, r = _pool_graphs(metrics[level], level_vertices[level], level_vertices[level + 1],
                                 cover[level + 1], pool_neighbours, max_neighbours)
        pool_radius.append(r)
        for name, arr in zip(_FIELDS_PER_STEP, graphs):
            steps[name].append(arr)

    return MeshHierarchy(template=verts, faces=faces, level_vertices=level_vertices,
                         conv_index=[c[0] for c in conv], conv_mask=[c[1] for c in conv],
                         cover_radius=np.array(cover), pool_radius=np.array(pool_radius), hash=digest,
                         settings=settings, **steps)


def _farthest_points(metric: _Metric, candidates: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Farthest-point sample of ``n`` of the ``candidates`` (mesh indices), in pick order, and its
    covering radius over the candidates.

    Distances run along the whole mesh: geodesic inside components that hold a pick, scaled
    Euclidean to the nearest pick elsewhere. The start is the candidate farthest from the centroid.
    Each pick runs Dijkstra only up to its own distance, the largest distance it can still improve.
    """
    mesh = metric.mesh
    pos, comp = mesh.pos, mesh.comp
    n_vert = len(pos)
    selectable = np.zeros(n_vert, dtype=bool)
    selectable[candidates] = True
    centre = pos[candidates].mean(axis=0)
    current = int(candidates[np.argmax(np.linalg.norm(pos[candidates] - centre, axis=1))])
    current_dist = np.inf
    d_geo = np.full(n_vert, np.inf)
    d_euc = np.full(n_vert, np.inf)
    comp_has_pick = np.zeros(mesh.n_comp, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        order[i] = current
        selectable[current] = False
        if comp_has_pick[comp[current]]:
            dist = dijkstra(metric.graph, indices=current, limit=current_dist)
        else:
            dist = dijkstra(metric.graph, indices=current)
            comp_has_pick[comp[current]] = True
        np.minimum(d_geo, dist, out=d_geo)
        if comp_has_pick.all():
            d_now = d_geo.copy()
        else:
            np.minimum(d_euc, metric.euclid(pos, pos[current]), out=d_euc)
            d_now = np.where(comp_has_pick[comp], d_geo, d_euc)
        cover = float(d_now[candidates].max()) if i == n - 1 else 0.0
        d_now[~selectable] = -np.inf
        current = int(np.argmax(d_now))
        current_dist = float(d_now[current])
    return order, max(cover, 0.0)


def _ring_neighbourhoods(graph: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Each vertex followed by its 1-ring (sorted by index), padded."""
    rows = [np.concatenate([[v], np.sort(graph.indices[graph.indptr[v]:graph.indptr[v + 1]])])
            for v in range(graph.shape[0])]
    return _pad(rows)


def _radius_neighbourhoods(metric: _Metric, members: np.ndarray, radius: float,
                           max_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Each level vertex followed by the level vertices within ``radius`` (at least the
    ``MIN_CONV_NEIGHBOURS - 1`` nearest within twice that), nearest first, at most ``max_neighbours``."""
    lookup = _lookup(members, len(metric.mesh.pos))
    rows: list[list[int]] = [[i] for i in range(len(members))]
    for src, tgt, dist in _pairs_within(metric, members, lookup >= 0, 2.0 * radius):
        keep = lookup[tgt] != src
        src, tgt, dist = src[keep], lookup[tgt[keep]], dist[keep]
        for s, t, d in _grouped_nearest(src, tgt, dist, max_neighbours - 1):
            rank = np.arange(len(t))
            rows[s].extend(t[(d <= radius) | (rank < MIN_CONV_NEIGHBOURS - 1)].tolist())
    return _pad([np.asarray(r) for r in rows])


def _pool_graphs(metric: _Metric, fine: np.ndarray, coarse: np.ndarray, coarse_cover: float,
                 pool_neighbours: int, max_neighbours: int) -> tuple[tuple[np.ndarray, ...], float]:
    """Pool and unpool graphs between a level and the next coarser one (mesh indices, nested).

    Pool: each coarse vertex takes the fine vertices within a radius (chosen so neighbourhoods hold
    ``pool_neighbours`` on average, at most ``max_neighbours``), plus every fine vertex whose nearest
    coarse vertex it is, so each fine vertex is covered. Unpool: each fine vertex takes its
    ``UNPOOL_NEIGHBOURS`` nearest coarse vertices. Weights are Gaussian in distance, rows sum to 1.
    """
    pos = metric.mesh.pos
    n_coarse, n_fine = len(coarse), len(fine)
    lookup = _lookup(fine, len(pos))
    target = min(pool_neighbours, n_fine)
    limit = 2.0 * coarse_cover
    while True:
        src, tgt, dist = (np.concatenate(a) for a in zip(*_pairs_within(metric, coarse, lookup >= 0, limit)))
        tgt = lookup[tgt]
        capped_mean = np.minimum(np.bincount(src, minlength=n_coarse), max_neighbours).mean()
        if capped_mean >= min(target, max_neighbours) or limit > _graph_extent(metric):
            break
        limit *= 2.0
    radius = _pool_radius(src, dist, n_coarse, target, max_neighbours)

    # fine vertices with no coarse vertex in their component: scaled Euclidean fallback
    reached = np.zeros(n_fine, dtype=bool)
    reached[tgt] = True
    lost = np.flatnonzero(~reached)
    if lost.size:
        k = min(UNPOOL_NEIGHBOURS, n_coarse)
        d_e, i_e = cKDTree(pos[coarse]).query(pos[fine[lost]], k=k)
        src = np.concatenate([src, i_e.reshape(len(lost), k).ravel()])
        tgt = np.concatenate([tgt, np.repeat(lost, k)])
        dist = np.concatenate([dist, d_e.reshape(len(lost), k).ravel() * metric.euclid_scale])

    # pairs grouped by fine vertex, nearest coarse first (ties: lowest coarse index)
    by_fine = np.lexsort((src, dist, tgt))
    starts = np.flatnonzero(np.r_[True, tgt[by_fine][1:] != tgt[by_fine][:-1]])
    ends = np.append(starts[1:], len(by_fine))
    owner_pair = by_fine[starts]

    pool_rows: list[list[int]] = [[] for _ in range(n_coarse)]
    sel = np.flatnonzero(dist <= radius)
    for s, p, _ in _grouped_nearest(src[sel], sel, dist[sel], max_neighbours):
        pool_rows[s].extend(p.tolist())
    taken = np.zeros(len(src), dtype=bool)
    taken[[p for r in pool_rows for p in r]] = True
    for p in owner_pair[~taken[owner_pair]]:
        pool_rows[src[p]].append(int(p))
    pool_pairs = [np.asarray(r, dtype=np.int64) for r in pool_rows]
    pool_pairs = [p[np.lexsort((tgt[p], dist[p]))] for p in pool_pairs]
    sigma = 0.5 * max(radius, coarse_cover, 1e-12)
    pool = _pad([tgt[p] for p in pool_pairs], [_gauss(dist[p], sigma) for p in pool_pairs])

    near = [by_fine[a:min(b, a + UNPOOL_NEIGHBOURS)] for a, b in zip(starts, ends)]
    sigma_up = max(coarse_cover, 1e-12)
    unpool = _pad([src[p] for p in near], [_gauss(dist[p], sigma_up) for p in near])
    return pool + unpool, radius


def _graph_extent(metric: _Metric) -> float:
    """An upper bound of any finite graph distance: the sum of all edge weights."""
    return float(metric.graph.data.sum()) / 2.0


def _pool_radius(src: np.ndarray, dist: np.ndarray, n_coarse: int, target: int, cap: int) -> float:
    """Smallest pair distance at which neighbourhoods capped at ``cap`` hold ``target`` on average."""
    candidates = np.unique(dist)

    def mean_count(r: float) -> float:
        return float(np.minimum(np.bincount(src[dist <= r], minlength=n_coarse), cap).mean())

    lo, hi = 0, len(candidates) - 1
    if mean_count(candidates[hi]) < target:
        return float(candidates[hi])
    while lo < hi:
        mid = (lo + hi) // 2
        if mean_count(candidates[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


# -------------------------------------------------------------------- small helpers
def _pairs_within(metric: _Metric, sources: np.ndarray, target_mask: np.ndarray,
                  limit: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(source position, target mesh index, graph distance) of all pairs within ``limit``,
    Dijkstra run in chunks of sources to bound memory."""
    chunk = max(1, 4_000_000 // max(len(metric.mesh.pos), 1))
    limit = float(limit) * (1 + 1e-9) + 1e-15
    for a in range(0, len(sources), chunk):
        d = dijkstra(metric.graph, indices=sources[a:a + chunk], limit=limit)
        d[:, ~target_mask] = np.inf
        s, t = np.nonzero(np.isfinite(d))
        yield s + a, t, d[s, t]


def _grouped_nearest(src: np.ndarray, payload: np.ndarray, dist: np.ndarray,
                     k: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """For each source, the payloads and distances of its ``k`` nearest pairs (ties: payload)."""
    if k <= 0 or len(src) == 0:
        return
    order = np.lexsort((payload, dist, src))
    src, payload, dist = src[order], payload[order], dist[order]
    starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
    ends = np.append(starts[1:], len(src))
    for a, b in zip(starts, ends):
        yield int(src[a]), payload[a:min(b, a + k)], dist[a:min(b, a + k)]


def _lookup(members: np.ndarray, n: int) -> np.ndarray:
    """Mesh index -> position in ``members`` (-1 when absent)."""
    lookup = np.full(n, -1, dtype=np.int64)
    lookup[members] = np.arange(len(members))
    return lookup


def _gauss(d: np.ndarray, sigma: float) -> np.ndarray:
    w = np.exp(-0.5 * (np.asarray(d, dtype=np.float64) / sigma) ** 2)
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / max(len(w), 1))


def _pad(rows: list[np.ndarray], weights: list[np.ndarray] | None = None
         ) -> tuple[np.ndarray, ...]:
    """Ragged rows -> (index (N, K) int64, mask (N, K) bool[, weight (N, K) float32])."""
    width = max((len(r) for r in rows), default=1)
    index = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        index[i, :len(r)] = r
        mask[i, :len(r)] = True
    if weights is None:
        return index, mask
    weight = np.zeros((len(rows), width), dtype=np.float32)
    for i, w in enumerate(weights):
        weight[i, :len(w)] = w
    return index, mask, weight
