"""Routing data: the Nazari generator, TSPLIB/CVRPLIB files, costs and the feasibility check."""

import os
import shutil

import numpy as np
import pytest
import torch

from deepkern.data import routing
from deepkern.data.routing import InfeasibleSolutionError, check_solution


def _shared_routing_data() -> str:
    # The benchmark files live in shared/data/routing beside the repository (or beside the
    # folder that holds its worktrees); DEEPKERN_ROUTING_DATA overrides.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [
        os.environ.get("DEEPKERN_ROUTING_DATA", ""),
        os.path.join(root, "..", "shared", "data", "routing"),
        os.path.join(root, "..", "..", "shared", "data", "routing"),
    ]
    return next((os.path.abspath(c) for c in candidates if c and os.path.isdir(c)), "")


SHARED = _shared_routing_data()
needs_data = pytest.mark.skipif(not SHARED, reason="shared routing data absent")

CVRP = ["A-n32-k5", "A-n80-k10", "E-n51-k5", "E-n76-k10"]
# TSPLIB's published optima of these instances.
TSP_OPTIMA = {"eil51": 426, "berlin52": 7542, "st70": 675, "eil76": 538}


def _cvrp(name):
    return os.path.join(SHARED, "cvrplib", f"{name}.vrp")


def _tsp(name):
    return os.path.join(SHARED, "tsplib", f"{name}.tsp")


# ---------------------------------------------------------------------------------------------
# Generator


def test_generator_follows_nazari():
    for size, capacity in routing.NAZARI_CAPACITY.items():
        batch = routing.generate_vrp(size, 3, seed=1)
        assert batch.locs.shape == (3, size + 1, 2)
        assert batch.capacity.tolist() == [capacity] * 3
    batch = routing.generate_vrp(20, 2000, seed=0)
    demands = batch.demands[:, 1:]
    assert (batch.demands[:, 0] == 0).all()
    assert int(demands.min()) == 1 and int(demands.max()) == 9
    # Uniform on 1..9: mean 5, every value about 1/9 of the time.
    assert abs(float(demands.float().mean()) - 5.0) < 0.05
    counts = torch.bincount(demands.flatten(), minlength=10)[1:].float() / demands.numel()
    assert (counts - 1 / 9).abs().max() < 0.01
    assert 0 <= float(batch.locs.min()) and float(batch.locs.max()) < 1
    assert abs(float(batch.locs.mean()) - 0.5) < 0.01


def test_generator_is_deterministic():
    a, b = routing.generate_vrp(10, 8, seed=5), routing.generate_vrp(10, 8, seed=5)
    assert torch.equal(a.locs, b.locs) and torch.equal(a.demands, b.demands)
    c = routing.generate_vrp(10, 8, seed=6)
    assert not torch.equal(a.locs, c.locs)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        routing.generate_vrp(10, 2, generator=g1).locs,
        routing.generate_vrp(10, 2, generator=g2).locs,
    )


def test_generator_errors():
    with pytest.raises(ValueError, match="capacity"):
        routing.generate_vrp(15, 2, seed=0)
    assert int(routing.generate_vrp(15, 2, seed=0, capacity=25).capacity[0]) == 25
    with pytest.raises(ValueError, match="capacity must be at least 9"):
        routing.generate_vrp(10, 2, seed=0, capacity=5)
    with pytest.raises(ValueError, match="num_customers"):
        routing.generate_vrp(0, 2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        routing.generate_vrp(10, 2)


# ---------------------------------------------------------------------------------------------
# Distances


def test_distance_conventions_by_hand():
    coords = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [10.0, 0.0]])
    euc = routing.distance_matrix(coords, "EUC_2D")
    assert euc[0, 1] == 5 and euc[0, 2] == 1 and euc[0, 3] == 10
    assert routing.distance_matrix(coords, "CEIL_2D")[0, 2] == 2
    # ATT: sqrt(100 / 10) = 3.16 rounds to 3, which is below it, so 4.
    assert routing.distance_matrix(coords, "ATT")[0, 3] == 4
    assert routing.distance_matrix(coords, "EXACT")[0, 2] == pytest.approx(2**0.5)
    # nint rounds halves up: (0, 0)-(0.5, 0) is 0.5 -> 1.
    assert routing.distance_matrix(np.array([[0, 0], [0.5, 0]]), "EUC_2D")[0, 1] == 1
    assert routing.route_cost(euc, [[1], [2, 3]]) == 5 + 5 + 1 + 9 + 10
    with pytest.raises(ValueError, match="edge_weight_type"):
        routing.distance_matrix(coords, "GEO")


# ---------------------------------------------------------------------------------------------
# Files


@needs_data
@pytest.mark.parametrize("name", CVRP)
def test_cvrplib_optimum_cost_equals_stated_cost(name):
    instance = routing.read_instance(_cvrp(name))
    assert instance.kind == "cvrp" and instance.edge_weight_type == "EUC_2D"
    assert instance.num_customers == int(name.split("-n")[1].split("-")[0]) - 1
    assert instance.demands[0] == 0 and instance.capacity >= instance.demands.max()
    known = routing.find_known_solution(_cvrp(name))
    instance.check(known.routes)
    assert instance.cost(known.routes) == known.stated_cost
    assert len(known.routes) >= int(name.split("-k")[1])


@needs_data
@pytest.mark.parametrize("name", list(TSP_OPTIMA))
def test_tsplib_optimal_tour_cost(name):
    instance = routing.read_instance(_tsp(name))
    assert instance.kind == "tsp" and instance.capacity is None
    known = routing.find_known_solution(_tsp(name))
    assert len(known.routes) == 1 and len(known.routes[0]) == instance.num_customers
    instance.check(known.routes)
    assert instance.cost(known.routes) == TSP_OPTIMA[name]


@needs_data
def test_solution_round_trip(tmp_path):
    import vrplib

    instance = routing.read_instance(_cvrp("E-n51-k5"))
    known = routing.read_solution(os.path.join(SHARED, "cvrplib", "E-n51-k5.sol"))
    path = tmp_path / "copy.sol"
    routing.write_solution(path, known.routes, instance.cost(known.routes))
    again = routing.read_solution(path)
    assert again.routes == known.routes and again.stated_cost == known.stated_cost
    assert vrplib.read_solution(str(path))["cost"] == known.stated_cost
    # A fractional cost keeps its decimals.
    routing.write_solution(tmp_path / "f.sol", [[1, 2]], 3.25)
    assert routing.read_solution(tmp_path / "f.sol").stated_cost == 3.25
    assert routing.find_known_solution(tmp_path / "nothing.vrp") is None


def _corrupt(tmp_path, source, line_number, replacement):
    lines = open(source).read().splitlines()
    if replacement is None:
        del lines[line_number - 1]
    else:
        lines[line_number - 1] = replacement
    path = tmp_path / os.path.basename(source)
    path.write_text("\n".join(lines) + "\n")
    return path


@needs_data
@pytest.mark.parametrize(
    "line, replacement, message",
    [
        (10, " 3 50 five", r"line 10: NODE_COORD_SECTION"),
        (11, " 4 49", r"line 11: NODE_COORD_SECTION"),
        (4, "DIMENSION : 32.5", r"line 4: DIMENSION must be an integer"),
        (6, "CAPACITY : lots", r"line 6: CAPACITY must be an integer"),
        (3, "TYPE CVRP", r"line 3: expected 'KEY : VALUE'"),
        (42, "2 19 4", r"line 42: DEMAND_SECTION"),
        (10, None, r"line 7: NODE_COORD_SECTION has 31 lines, but DIMENSION \(line 4\)"),
    ],
)
def test_malformed_vrp_names_the_line(tmp_path, line, replacement, message):
    path = _corrupt(tmp_path, _cvrp("A-n32-k5"), line, replacement)
    with pytest.raises(ValueError, match=message):
        routing.read_instance(path)


@needs_data
def test_malformed_solutions_and_semantics(tmp_path):
    bad_sol = tmp_path / "x.sol"
    bad_sol.write_text("Route #1: 1 2\nRoute #2: 3 x\nCost 10\n")
    with pytest.raises(ValueError, match="line 2"):
        routing.read_solution(bad_sol)
    bad_sol.write_text("Route #1: 1 2\nCost ten\n")
    with pytest.raises(ValueError, match="line 2: expected 'Cost"):
        routing.read_solution(bad_sol)
    bad_tour = tmp_path / "x.opt.tour"
    bad_tour.write_text("NAME : x\nTOUR_SECTION\n1\n2\nthree\n-1\n")
    with pytest.raises(ValueError, match="line 5"):
        routing.read_solution(bad_tour)

    # Well-formed lines but impossible contents.
    heavy = _corrupt(tmp_path, _cvrp("A-n32-k5"), 42, "2 101")
    with pytest.raises(ValueError, match="node 2 has demand 101"):
        routing.read_instance(heavy)
    explicit = _corrupt(tmp_path, _cvrp("A-n32-k5"), 5, "EDGE_WEIGHT_TYPE : EXPLICIT")
    with pytest.raises(ValueError, match="line 5: EDGE_WEIGHT_TYPE"):
        routing.read_instance(explicit)
    with pytest.raises(OSError):
        routing.read_instance(tmp_path / "missing.vrp")


@needs_data
def test_reading_does_not_touch_the_shared_copy(tmp_path):
    copy = tmp_path / "eil51.tsp"
    shutil.copy(_tsp("eil51"), copy)
    assert routing.read_instance(copy).num_customers == 50
    assert routing.find_known_solution(copy) is None


# ---------------------------------------------------------------------------------------------
# The feasibility check

DEMANDS = [0, 4, 3, 5, 2]


def test_checker_accepts_feasible_solutions():
    check_solution([[1, 2], [3, 4]], DEMANDS, capacity=7)
    check_solution([[1, 2, 3, 4]], [0, 0, 0, 0, 0], capacity=None)
    # Split delivery: customer 3 gets 5 as 2 + 3.
    check_solution([[1, 3], [2, 3, 4]], DEMANDS, capacity=7, deliveries=[[4, 3], [3, 2, 2]])


@pytest.mark.parametrize(
    "routes, deliveries, message",
    [
        ([[1, 2], [3]], None, "customer 4 receives 0"),
        ([[1, 2], [3, 4], [2]], None, "customer 2 is visited 2 times"),
        ([[1, 2], [2], [3, 4]], None, "customer 2 is visited 2 times"),
        ([[1, 3], [2, 4]], None, "route 1 carries 9, above the vehicle capacity 7"),
        ([[1, 0, 2], [3, 4]], None, "node 0, which is not a customer"),
        ([[1, 2], [3, 5]], None, "node 5, which is not a customer"),
        ([[1, 2], [], [3, 4]], None, "route 2 is empty"),
        ([[1, 3], [2, 3, 4]], [[4, 2], [3, 2, 2]], "customer 3 receives 4 of its demand 5"),
        ([[1, 3], [2, 3, 4]], [[4, 3], [3, 3, 2]], "route 2 carries 8"),
        ([[1, 3, 3], [2, 4]], [[4, 2, 3], [3, 2]], "route 1 visits a customer twice"),
        ([[1, 3], [2, 3, 4]], [[4, 3], [3, -1, 2]], "non-positive"),
        ([[1, 2], [3, 4]], [[4, 3]], "deliveries has 1 routes"),
    ],
)
def test_checker_rejects_each_infeasibility(routes, deliveries, message):
    with pytest.raises(InfeasibleSolutionError, match=message):
        check_solution(routes, DEMANDS, capacity=7, deliveries=deliveries)


def test_sequences_must_start_and_end_at_the_depot():
    assert routing.routes_from_sequence([0, 1, 2, 0, 0, 3, 0, 0]) == [[1, 2], [3]]
    with pytest.raises(InfeasibleSolutionError, match="does not return to the depot"):
        routing.routes_from_sequence([0, 1, 2, 0, 3])
    with pytest.raises(InfeasibleSolutionError, match="does not start at the depot"):
        routing.routes_from_sequence([1, 2, 0])


@needs_data
def test_a_tsp_tour_is_one_route():
    instance = routing.read_instance(_tsp("eil51"))
    tour = list(range(1, 51))
    instance.check([tour])
    with pytest.raises(InfeasibleSolutionError, match="one route"):
        instance.check([tour[:25], tour[25:]])
    with pytest.raises(InfeasibleSolutionError, match="never visited|receives"):
        instance.check([tour[:-1]])


def _tiny_cvrp(tmp_path, *, coords=None, demands=None, capacity="10", depot=True) -> str:
    coords = coords or ["1 0 0", "2 0 3", "3 4 0"]
    demands = demands or ["1 0", "2 4", "3 5"]
    lines = ["NAME : tiny", "TYPE : CVRP", f"DIMENSION : {len(coords)}"]
    lines += ["EDGE_WEIGHT_TYPE : EUC_2D", f"CAPACITY : {capacity}", "NODE_COORD_SECTION"]
    lines += coords + ["DEMAND_SECTION"] + demands
    lines += ["DEPOT_SECTION", "1", "-1"] if depot else []
    path = tmp_path / "tiny.vrp"
    path.write_text("\n".join(lines + ["EOF"]) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(coords=["1 0 0", "1 0 3", "3 4 0"]), "line 8: node 1 already appears on line 7"),
        (dict(coords=["1 0 0", "2 0 3", "30 4 0"]), "line 9: node 30 is outside 1..3"),
        (dict(demands=["1 0", "2 -4", "3 5"]), r"line 12: node 2 has demand -4, outside 0\.\.10"),
        (dict(demands=["1 0", "2 40", "3 5"]), "line 12: node 2 has demand 40"),
        (dict(demands=["1 3", "2 4", "3 5"]), r"line 11: the depot \(node 1\) has demand 3"),
        (dict(capacity="0"), "line 5: CAPACITY must be positive"),
        (dict(depot=False), "needs a DEPOT_SECTION"),
    ],
)
def test_bad_node_ids_demands_capacity_and_depot_name_the_line(tmp_path, changes, message):
    pytest.importorskip("vrplib")
    with pytest.raises(ValueError, match=message):
        routing.read_instance(_tiny_cvrp(tmp_path, **changes))


def test_a_well_formed_tiny_instance_reads(tmp_path):
    pytest.importorskip("vrplib")
    instance = routing.read_instance(_tiny_cvrp(tmp_path))
    assert instance.num_customers == 2 and instance.capacity == 10
