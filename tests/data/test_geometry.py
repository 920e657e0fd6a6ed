"""Geometry labels: Held-Karp against brute force, hulls and triangulations against SciPy,
canonical forms, the heuristic solvers, polygons, and seeded generation."""

import itertools

import numpy as np
import pytest
import torch
from scipy import spatial

from deepkern.data import geometry as g


def test_uniform_points_are_seeded_and_in_the_unit_square():
    a = g.uniform_points(4, 7, seed=3)
    assert a.shape == (4, 7, 2) and a.dtype == torch.float64
    assert torch.equal(a, g.uniform_points(4, 7, seed=3))
    assert not torch.equal(a, g.uniform_points(4, 7, seed=4))
    assert float(a.min()) >= 0 and float(a.max()) < 1
    assert g.uniform_points(2, 3, seed=0, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        g.uniform_points(2, 0, seed=0)


# ---------------------------------------------------------------------------------------------
# Tours


@pytest.mark.parametrize("n", [4, 5, 6, 7, 8])
def test_held_karp_matches_brute_force(n):
    points = g.uniform_points(6, n, seed=n)
    lengths, tours = g.held_karp(points)
    assert lengths.shape == (6,) and tours.shape == (6, n)
    for p, length, tour in zip(points, lengths, tours):
        best, best_tour = g.brute_force_tour(p)
        assert float(length) == pytest.approx(best, abs=1e-12)
        assert tour.tolist() == best_tour
        assert float(g.tour_length(p, tour)) == pytest.approx(best, abs=1e-12)


def test_held_karp_hand_worked_cases():
    # The corners of the unit square, listed crosswise: the optimum is the perimeter, 4.
    square = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    length, tour = g.held_karp(square)
    assert float(length) == pytest.approx(4.0) and tour.tolist() == [0, 2, 1, 3]
    # Points on a line: the tour goes out and back, twice the span.
    line = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    assert float(g.held_karp(line)[0]) == pytest.approx(6.0)
    # Tiny instances.
    assert float(g.held_karp(torch.zeros(1, 2))[0]) == 0.0
    three = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert float(g.held_karp(three)[0]) == pytest.approx(12.0)


def test_held_karp_mean_optimum_of_five_cities_is_the_known_one():
    # The expected optimal tour of 5 uniform points in the unit square is about 2.12.
    lengths, _ = g.held_karp(g.uniform_points(4000, 5, seed=0))
    assert float(lengths.mean()) == pytest.approx(2.12, abs=0.02)


def test_held_karp_limits_and_chunks():
    with pytest.raises(ValueError, match="held_karp takes 1 to 16 cities"):
        g.held_karp(torch.rand(1, 17, 2))
    with pytest.raises(ValueError, match="shape"):
        g.held_karp(torch.rand(2, 5, 3))
    points = g.uniform_points(5, 7, seed=1)
    whole = g.held_karp(points)
    chunked = g.held_karp(points, max_bytes=1)  # one instance per chunk
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_canonical_tour_is_unique_over_rotations_and_reversals():
    tour = [3, 1, 4, 0, 2, 5]
    forms = set()
    for shift in range(6):
        rotated = tour[shift:] + tour[:shift]
        forms.add(tuple(g.canonical_tour(rotated)))
        forms.add(tuple(g.canonical_tour(rotated[::-1])))
    assert forms == {(0, 2, 5, 3, 1, 4)}
    with pytest.raises(ValueError, match="visit each"):
        g.canonical_tour([0, 1, 1])


@pytest.mark.parametrize("method", ["lkh", "local"])
def test_heuristic_tours_find_the_optimum_of_small_instances(method):
    if method == "lkh":
        pytest.importorskip("elkai")
    points = g.uniform_points(4, 9, seed=5)
    optimal, _ = g.held_karp(points)
    lengths, tours = g.heuristic_tours(points, method=method)
    for tour in tours.tolist():
        assert tour == g.canonical_tour(tour)
    assert torch.all(lengths >= optimal - 1e-9)
    # LKH is optimal at this size; 2-opt with Or-opt from four starts nearly so.
    slack = 1e-9 if method == "lkh" else 0.03 * float(optimal.max())
    assert float((lengths - optimal).max()) <= slack
    with pytest.raises(ValueError, match="method must be"):
        g.heuristic_tours(points, method="concorde")


def test_local_search_improves_a_bad_tour():
    points = g.uniform_points(1, 12, seed=8)[0]
    length, tour = g.local_search_tour(points, restarts=2)
    assert sorted(tour) == list(range(12))
    assert length == pytest.approx(float(g.tour_length(points, tour)))
    assert length < float(g.tour_length(points, list(range(12))))
    assert length <= 1.05 * float(g.held_karp(points)[0])


def test_tour_length_hand_case():
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert float(g.tour_length(square, [0, 1, 2, 3])) == pytest.approx(4.0)
    assert float(g.tour_length(square, [0, 2, 1, 3])) == pytest.approx(2 + 2 * 2**0.5)


# ---------------------------------------------------------------------------------------------
# Hulls and triangulations


def _signed_area(points, polygon):
    xy = np.asarray(points)[polygon]
    x, y = xy[:, 0], xy[:, 1]
    return (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


@pytest.mark.parametrize("n", [5, 10, 30])
def test_convex_hull_is_qhulls_in_canonical_order(n):
    for points in g.uniform_points(10, n, seed=n):
        hull = g.convex_hull(points)
        assert set(hull) == set(spatial.ConvexHull(points.numpy()).vertices.tolist())
        assert hull[0] == min(hull) and len(set(hull)) == len(hull)
        assert _signed_area(points, hull) > 0  # counter-clockwise
        # Every point lies left of (or on) every hull edge.
        xy = points.numpy()
        for i in range(len(hull)):
            a, b = xy[hull[i]], xy[hull[(i + 1) % len(hull)]]
            cross = (b[0] - a[0]) * (xy[:, 1] - a[1]) - (b[1] - a[1]) * (xy[:, 0] - a[0])
            assert cross.min() > -1e-12


def test_convex_hull_hand_case_and_errors():
    points = torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert g.convex_hull(points) == [1, 4, 2, 3]
    with pytest.raises(ValueError, match="at least 3 points"):
        g.convex_hull(points[:2])
    with pytest.raises(ValueError, match="no two-dimensional"):
        g.convex_hull(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    with pytest.raises(ValueError, match="shape"):
        g.convex_hull(torch.zeros(4, 3))


@pytest.mark.parametrize("n", [4, 5, 10, 20])
def test_delaunay_triangles_are_qhulls_in_canonical_order(n):
    for points in g.uniform_points(10, n, seed=n):
        triangles = g.delaunay_triangles(points)
        expected = {tuple(sorted(s)) for s in spatial.Delaunay(points.numpy()).simplices.tolist()}
        assert set(triangles) == expected and len(triangles) == len(expected)
        assert all(a < b < c for a, b, c in triangles)
        hull = len(g.convex_hull(points))
        assert len(triangles) == 2 * n - 2 - hull  # Euler's formula
        centres = [g._incentre(points.numpy(), t) for t in triangles]
        assert centres == sorted(centres)
        # The empty-circle property, checked directly: for a counter-clockwise triangle abc,
        # det[[a - d, |a - d|^2], [b - d, ...], [c - d, ...]] > 0 iff d is inside its circle.
        xy = points.numpy()
        for t in triangles:
            abc = xy[list(t)]
            u, w = abc[1] - abc[0], abc[2] - abc[0]
            orientation = np.sign(u[0] * w[1] - u[1] * w[0])
            for k in set(range(n)) - set(t):
                rel = abc - xy[k]
                matrix = np.column_stack([rel, (rel**2).sum(1)])
                assert orientation * np.linalg.det(matrix) < 1e-12


def test_delaunay_hand_case():
    # A square with its centre: four triangles, one per side, ordered by incentre x then y.
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    assert g.delaunay_triangles(points) == [(0, 3, 4), (0, 1, 4), (2, 3, 4), (1, 2, 4)]


# ---------------------------------------------------------------------------------------------
# Polygons


def test_polygon_area_and_simplicity():
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert g.polygon_area(square, [0, 1, 2, 3]) == pytest.approx(1.0)
    assert g.polygon_area(square, [3, 2, 1, 0]) == pytest.approx(1.0)
    assert g.is_simple_polygon(square, [0, 1, 2, 3])
    assert not g.is_simple_polygon(square, [0, 2, 1, 3])  # a bow tie
    assert not g.is_simple_polygon(square, [0, 1])
    assert not g.is_simple_polygon(square, [0, 1, 2, 0])
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert not g.is_simple_polygon(line, [0, 1, 2])
    # Every ordering of five points in convex position but the cyclic ones crosses itself.
    pentagon = torch.tensor([[np.cos(a), np.sin(a)] for a in np.arange(5) * 2 * np.pi / 5])
    for order in itertools.permutations(range(1, 5)):
        cycle = [0, *order]
        cyclic = cycle in ([0, 1, 2, 3, 4], [0, 4, 3, 2, 1])
        assert g.is_simple_polygon(pentagon, cycle) == cyclic
