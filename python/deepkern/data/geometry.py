"""Planar point sets with exact labels: convex hulls, Delaunay triangulations, TSP tours.

The three problems of Pointer Networks (Vinyals, Fortunato and Jaitly, 2015), each with one
canonical label per point set so that a sequence model has a single right answer to learn:

- :func:`uniform_points`: point sets drawn uniformly from the unit square, from a seed.
- :func:`convex_hull`: the hull's vertices from SciPy's Qhull, counter-clockwise, starting at
  the smallest index.
- :func:`delaunay_triangles`: the triangles from SciPy's Qhull, each as an increasing index
  triple, ordered by their incentres (x first, then y), the order the paper uses.
- :func:`held_karp`: optimal tours by dynamic programming over subsets (exact, batched on
  tensors; practical up to about 15 cities), and :func:`heuristic_tours`: LKH through the
  ``elkai`` package, or our own 2-opt and Or-opt local search, for larger sets (not exact).
- :func:`canonical_tour`: a tour starting at city 0, then towards the smaller of city 0's two
  neighbours, so every tour has one spelling.
- Geometry the metrics need: :func:`tour_length`, :func:`polygon_area`,
  :func:`is_simple_polygon`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "brute_force_tour",
    "canonical_tour",
    "convex_hull",
    "delaunay_triangles",
    "held_karp",
    "heuristic_tours",
    "is_simple_polygon",
    "local_search_tour",
    "optimal_tours",
    "polygon_area",
    "tour_length",
    "uniform_points",
]

# Held-Karp keeps 2^(n-1) (n-1) partial costs per instance: 16 cities take 3.9 MB each, and
# every extra city doubles it. Above this size use heuristic_tours.
HELD_KARP_MAX_CITIES = 16


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_points(points, name: str = "points") -> np.ndarray:
    array = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape [n, 2], got {tuple(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    return array.astype(np.float64)


def uniform_points(count: int, n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``count`` sets of ``n`` points drawn uniformly from the unit square.

    Args:
        count: how many point sets.
        n: points per set.
        seed: seeds a private ``torch.Generator``: the same seed gives the same points.
        dtype: float32 or float64.

    Returns:
        Tensor[count, n, 2] of the given dtype.

    Example:
        >>> uniform_points(2, 5, seed=0).shape
        torch.Size([2, 5, 2])
    """
    _check_count("count", count, 0)
    _check_count("n", n, 1)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(count, n, 2, generator=generator, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# Convex hulls and Delaunay triangulations (Qhull through SciPy)


def _scipy_spatial():
    try:
        from scipy import spatial
    except ImportError as error:
        raise ImportError("hull and Delaunay labels need scipy: pip install scipy") from error
    return spatial


def convex_hull(points) -> list[int]:
    """The convex hull's vertex indices, counter-clockwise, starting at the smallest index.

    Args:
        points (Tensor[n, 2] or array): n >= 3 points, not all on one line.

    Returns:
        The hull's vertices as indices into ``points`` (points on an edge are not vertices).

    Raises:
        ValueError: fewer than three points, or all of them on one line.
    """
    array = _check_points(points)
    if len(array) < 3:
        raise ValueError(f"a convex hull needs at least 3 points, got {len(array)}")
    spatial = _scipy_spatial()
    try:
        hull = spatial.ConvexHull(array)
    except spatial.QhullError as error:
        raise ValueError("the points have no two-dimensional convex hull") from error
    # Qhull lists the vertices of a planar hull counter-clockwise.
    vertices = [int(v) for v in hull.vertices]
    start = vertices.index(min(vertices))
    return vertices[start:] + vertices[:start]


def _incentre(array: np.ndarray, triangle: Sequence[int]) -> tuple[float, float]:
    a, b, c = (array[i] for i in triangle)
    # Each vertex weighs by the length of the side opposite to it.
    wa, wb, wc = np.linalg.norm(b - c), np.linalg.norm(c - a), np.linalg.norm(a - b)
    centre = (wa * a + wb * b + wc * c) / (wa + wb + wc)
    return float(centre[0]), float(centre[1])


def delaunay_triangles(points) -> list[tuple[int, int, int]]:
    """The Delaunay triangulation as increasing index triples, ordered by incentre.

    Args:
        points (Tensor[n, 2] or array): n >= 3 points, not all on one line.

    Returns:
        One (i, j, k) with i < j < k per triangle, sorted by the incentre's x, then its y.

    Raises:
        ValueError: fewer than three points, or all of them on one line.
    """
    array = _check_points(points)
    if len(array) < 3:
        raise ValueError(f"a triangulation needs at least 3 points, got {len(array)}")
    spatial = _scipy_spatial()
    try:
        simplices = spatial.Delaunay(array).simplices
    except spatial.QhullError as error:
        raise ValueError("the points have no two-dimensional triangulation") from error
    triangles = [tuple(sorted(int(v) for v in simplex)) for simplex in simplices]
    return sorted(triangles, key=lambda t: _incentre(array, t))


# ---------------------------------------------------------------------------------------------
# Tours


def _distances(points: Tensor) -> Tensor:
    return (points[..., :, None, :] - points[..., None, :, :]).norm(dim=-1)


def tour_length(points, tours) -> Tensor:
    """Lengths of closed tours.

    Args:
        points (Tensor[..., n, 2]): the cities.
        tours (LongTensor[..., n] or nested lists): each a visiting order, closed back to its
            first city.

    Returns:
        Tensor[...] of the points' dtype (float64 for arrays).
    """
    points = torch.as_tensor(points)
    if not points.is_floating_point():
        points = points.double()
    tours = torch.as_tensor(tours, dtype=torch.long, device=points.device)
    ordered = torch.gather(points, -2, tours[..., None].expand(*tours.shape, 2))
    return (ordered - ordered.roll(-1, dims=-2)).norm(dim=-1).sum(-1)


def canonical_tour(tour: Sequence[int]) -> list[int]:
    """The spelling of a closed tour that starts at city 0 and goes on to the smaller of 0's
    two neighbours: rotations and reversals of one tour all map to the same list."""
    tour = [int(c) for c in tour]
    if sorted(tour) != list(range(len(tour))):
        raise ValueError(f"a tour must visit each of 0..{len(tour) - 1} once, got {tour}")
    start = tour.index(0)
    tour = tour[start:] + tour[:start]
    if len(tour) > 2 and tour[1] > tour[-1]:
        tour = [0] + tour[:0:-1]
    return tour


def brute_force_tour(points) -> tuple[float, list[int]]:
    """The optimal tour by trying every order (n <= 10): the reference Held-Karp is tested on."""
    array = _check_points(points)
    n = len(array)
    if n > 10:
        raise ValueError(f"brute force is for n <= 10 points, got {n}")
    if n == 1:
        return 0.0, [0]
    distance = np.linalg.norm(array[:, None] - array[None], axis=-1)
    best, best_tour = math.inf, None
    for rest in itertools.permutations(range(1, n)):
        tour = (0, *rest)
        length = sum(distance[tour[i], tour[(i + 1) % n]] for i in range(n))
        if length < best:
            best, best_tour = length, tour
    return float(best), canonical_tour(best_tour)


def held_karp(points: Tensor, max_bytes: int = 1 << 28) -> tuple[Tensor, Tensor]:
    """Optimal tours by the Held-Karp dynamic programme, for a batch of instances at once.

    cost[S, j] is the shortest path that starts at city 0, visits the set S of other cities
    and ends at j in S; sets are filled in order of size, each size in one tensor operation
    across all its sets and the whole batch. Time O(2^n n^2) and memory O(2^n n) per instance.

    Args:
        points (Tensor[B, n, 2] or Tensor[n, 2]): 1 <= n <= 16 cities per instance; computed
            in float64.
        max_bytes: working memory per chunk of instances (the batch is split to fit).

    Returns:
        (lengths Tensor[B] float64, tours LongTensor[B, n]); tours in canonical form
        (:func:`canonical_tour`). A single instance gives a scalar and a [n] tensor.

    Raises:
        ValueError: a bad shape, or n above 16 (use :func:`heuristic_tours`).
    """
    points = torch.as_tensor(points)
    single = points.dim() == 2
    if single:
        points = points[None]
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must have shape [B, n, 2] or [n, 2], got {tuple(points.shape)}")
    batch, n, _ = points.shape
    if not 1 <= n <= HELD_KARP_MAX_CITIES:
        raise ValueError(
            f"held_karp takes 1 to {HELD_KARP_MAX_CITIES} cities, got {n}; "
            "use heuristic_tours for more"
        )
    points = points.detach().double().cpu()
    if n <= 3:
        tours = torch.arange(n).expand(batch, n).clone()
        lengths = tour_length(points, tours)
    else:
        m = n - 1
        widest = max(math.comb(m, k) for k in range(m + 1))
        per_instance = (1 << m) * m * 9 + widest * m * m * 8 * 2
        chunk = max(1, max_bytes // per_instance)
        parts = [_held_karp_chunk(points[i : i + chunk]) for i in range(0, batch, chunk)]
        lengths = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0).double()
        tours = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, n).long()
    if single:
        return lengths[0], tours[0]
    return lengths, tours


def _held_karp_chunk(points: Tensor) -> tuple[Tensor, Tensor]:
    batch, n, _ = points.shape
    m = n - 1  # the cities other than 0, numbered 0..m-1 in the subsets
    distance = _distances(points)
    inner = distance[:, 1:, 1:]  # inner[b, i, j]: from city i+1 to city j+1
    bits = 1 << torch.arange(m)
    sizes = torch.tensor([bin(s).count("1") for s in range(1 << m)])

    cost = torch.full((batch, 1 << m, m), math.inf, dtype=torch.float64)
    parent = torch.zeros((batch, 1 << m, m), dtype=torch.int8)
    cost[:, bits, torch.arange(m)] = distance[:, 0, 1:]
    # to_j_from_i[b, j, i] = inner[b, i, j], laid out for the broadcast below.
    to_j_from_i = inner.transpose(1, 2)
    for size in range(2, m + 1):
        sets = torch.nonzero(sizes == size).squeeze(1)
        # For last city j: the set without j. A j outside the set gives a larger set, not yet
        # filled (still infinite), and an i outside the set without j is infinite too.
        without = sets[:, None] ^ bits[None, :]
        candidates = cost[:, without, :] + to_j_from_i[:, None, :, :]
        best, argbest = candidates.min(dim=-1)
        cost[:, sets, :] = best
        parent[:, sets, :] = argbest.to(torch.int8)

    full = (1 << m) - 1
    lengths, last = (cost[:, full, :] + distance[:, 1:, 0]).min(dim=-1)
    rows = torch.arange(batch)
    order = torch.empty((batch, m), dtype=torch.long)
    subset = torch.full((batch,), full, dtype=torch.long)
    for position in range(m - 1, -1, -1):
        order[:, position] = last
        previous = parent[rows, subset, last].long()
        subset = subset ^ bits[last]
        last = previous
    tours = torch.cat([torch.zeros(batch, 1, dtype=torch.long), order + 1], dim=1)
    tours = torch.stack([torch.tensor(canonical_tour(t.tolist())) for t in tours])
    return lengths, tours


def optimal_tours(points: Tensor) -> tuple[Tensor, Tensor]:
    """Optimal tours (Held-Karp) in canonical form: (lengths Tensor[B], tours LongTensor[B, n]).

    Alias of :func:`held_karp` for batches; see there for the limits.
    """
    return held_karp(points)


def local_search_tour(points, restarts: int = 4, seed: int = 0) -> tuple[float, list[int]]:
    """A good tour by 2-opt and Or-opt local search from random starts (not exact).

    Each start is a random tour, improved until no reversal of a segment (2-opt) and no move of
    a run of 1 to 3 cities elsewhere (Or-opt) shortens it; the best local optimum is returned.
    Used when ``elkai`` is not installed. Tours of a few dozen cities usually end within a
    percent or two of the optimum.

    Returns:
        (length, canonical tour).
    """
    array = _check_points(points)
    _check_count("restarts", restarts, 1)
    n = len(array)
    if n <= 3:
        tour = list(range(n))
        return float(tour_length(torch.from_numpy(array), tour)), tour
    distance = np.linalg.norm(array[:, None] - array[None], axis=-1)
    rng = np.random.default_rng(seed)
    best, best_tour = math.inf, None
    for _ in range(restarts):
        tour = [0] + list(rng.permutation(np.arange(1, n)))
        tour = _improve(tour, distance)
        length = sum(distance[tour[i], tour[(i + 1) % n]] for i in range(n))
        if length < best - 1e-12:
            best, best_tour = length, tour
    return float(best), canonical_tour(best_tour)


def _improve(tour: list[int], distance: np.ndarray) -> list[int]:
    n = len(tour)
    improved = True
    while improved:
        improved = False
        # 2-opt: replace edges (a, b) and (c, d) by (a, c) and (b, d), reversing b..c.
        for i in range(n - 1):
            for j in range(i + 2, n if i > 0 else n - 1):
                a, b, c, d = tour[i], tour[i + 1], tour[j], tour[(j + 1) % n]
                gain = distance[a, b] + distance[c, d] - distance[a, c] - distance[b, d]
                if gain > 1e-12:
                    tour[i + 1 : j + 1] = tour[i + 1 : j + 1][::-1]
                    improved = True
        # Or-opt: move a run of 1 to 3 cities between two other neighbours (either way round).
        for length in (1, 2, 3):
            for start in range(n):
                run = [tour[(start + k) % n] for k in range(length)]
                before, after = tour[(start - 1) % n], tour[(start + length) % n]
                if after in run or before in run:
                    continue
                removed_gain = (
                    distance[before, run[0]] + distance[run[-1], after] - distance[before, after]
                )
                rest = [c for c in tour if c not in run]
                best_move = None
                for k in range(len(rest)):
                    p, q = rest[k], rest[(k + 1) % len(rest)]
                    for oriented in (run, run[::-1]):
                        added = distance[p, oriented[0]] + distance[oriented[-1], q]
                        gain = removed_gain - added + distance[p, q]
                        if gain > 1e-12 and (best_move is None or gain > best_move[0]):
                            best_move = (gain, k, oriented)
                if best_move is not None:
                    _, k, oriented = best_move
                    tour = rest[: k + 1] + list(oriented) + rest[k + 1 :]
                    improved = True
                    break
            if improved:
                break
    start = tour.index(0)
    return tour[start:] + tour[:start]


def heuristic_tours(
    points: Tensor, method: str = "auto", runs: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Near-optimal tours for instances too large for Held-Karp (not exact).

    Args:
        points (Tensor[B, n, 2]): the instances, n >= 3.
        method: "lkh" (the ``elkai`` package: LKH-3 on distances scaled by 10^6 and rounded),
            "local" (:func:`local_search_tour`), or "auto" (lkh when elkai is installed).
        runs: LKH runs, or local search restarts, per instance.
        seed: seeds the local search's starts.

    Returns:
        (lengths Tensor[B] float64, tours LongTensor[B, n]) in canonical form; lengths are
        measured in float64 on the points, not on the rounded distances.

    Raises:
        ValueError: a bad shape or method. ImportError: method "lkh" without elkai.
    """
    points = torch.as_tensor(points)
    if points.dim() != 3 or points.shape[-1] != 2 or points.shape[1] < 3:
        raise ValueError(f"points must have shape [B, n >= 3, 2], got {tuple(points.shape)}")
    if method not in ("auto", "lkh", "local"):
        raise ValueError(f"method must be 'auto', 'lkh' or 'local', got {method!r}")
    _check_count("runs", runs, 1)
    elkai = None
    if method in ("auto", "lkh"):
        try:
            import elkai
        except ImportError as error:
            if method == "lkh":
                raise ImportError("method 'lkh' needs elkai: pip install elkai") from error
    points = points.detach().double().cpu()
    tours = []
    for index, instance in enumerate(points):
        if elkai is not None:
            distance = np.rint(_distances(instance).numpy() * 1e6).astype(np.int64)
            tour = elkai.DistanceMatrix(distance.tolist()).solve_tsp(runs=runs)[:-1]
            tours.append(canonical_tour(tour))
        else:
            tours.append(local_search_tour(instance, runs, seed + index)[1])
    tours = torch.tensor(tours, dtype=torch.long).reshape(len(points), points.shape[1])
    return tour_length(points, tours), tours


# ---------------------------------------------------------------------------------------------
# Polygons


def polygon_area(points, polygon: Sequence[int]) -> float:
    """The area enclosed by the polygon through ``points[polygon]`` (shoelace formula; positive
    whatever the orientation; meaningful for simple polygons only)."""
    array = _check_points(points)
    if len(polygon) < 3:
        return 0.0
    xy = array[list(polygon)]
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def _segments_touch(p1, p2, q1, q2) -> bool:
    d1, d2 = _cross(q1, q2, p1), _cross(q1, q2, p2)
    d3, d4 = _cross(p1, p2, q1), _cross(p1, p2, q2)
    if ((d1 > 0) != (d2 > 0)) and ((d3 > 0) != (d4 > 0)) and 0 not in (d1, d2, d3, d4):
        return True

    # Collinear cases: an endpoint on the other segment.
    def on(a, b, c):
        return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(
            a[1], b[1]
        )

    return (
        (d1 == 0 and on(q1, q2, p1))
        or (d2 == 0 and on(q1, q2, p2))
        or (d3 == 0 and on(p1, p2, q1))
        or (d4 == 0 and on(p1, p2, q2))
    )


def is_simple_polygon(points, polygon: Sequence[int]) -> bool:
    """Whether the closed polygon through ``points[polygon]`` is simple: at least three distinct
    vertices, no repeated vertex, and no two non-adjacent edges that touch."""
    array = _check_points(points)
    k = len(polygon)
    if k < 3 or len(set(polygon)) != k:
        return False
    xy = array[list(polygon)]
    if polygon_area(array, polygon) == 0.0:
        return False
    for i in range(k):
        for j in range(i + 1, k):
            if j == i + 1 or (i == 0 and j == k - 1):
                continue  # adjacent edges share a vertex by construction
            if _segments_touch(xy[i], xy[(i + 1) % k], xy[j], xy[(j + 1) % k]):
                return False
    return True
