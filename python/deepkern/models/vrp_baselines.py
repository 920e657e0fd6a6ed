"""Classical CVRP solvers to compare the learned policies against.

- :func:`clarke_wright`: the parallel savings heuristic of Clarke and Wright (1964), our own.
- :func:`solve_ortools`: Google OR-Tools' routing solver (guided local search, time limit).
- :func:`solve_pyvrp`: PyVRP's hybrid genetic search, the near-optimal reference.

Every solver takes a distance matrix with the depot at index 0, integer demands and a vehicle
capacity, and returns routes of customer indices (see :mod:`deepkern.data.routing`), checked
with :func:`deepkern.data.routing.check_solution` before they are returned. OR-Tools and PyVRP
work on integer distances: a float matrix is scaled by ``scale`` and rounded for the search,
so their answers are optimal for the rounded matrix; costs are always measured on the
matrix as given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deepkern.data.routing import check_solution

__all__ = ["clarke_wright", "solve_ortools", "solve_pyvrp"]


def _check_inputs(distances, demands, capacity) -> tuple[np.ndarray, np.ndarray]:
    distances = np.asarray(distances, dtype=np.float64)
    demands = np.asarray(demands, dtype=np.int64)
    n = len(demands)
    if distances.shape != (n, n):
        raise ValueError(f"distances must be [{n}, {n}] to match demands, got {distances.shape}")
    if capacity is not None and demands.max(initial=0) > capacity:
        raise ValueError(
            f"capacity {capacity} is below the largest demand {int(demands.max())}: no solution"
        )
    return distances, demands


def clarke_wright(
    distances: np.ndarray, demands: Sequence[int], capacity: float | None
) -> list[list[int]]:
    """The parallel Clarke-Wright savings heuristic.

    Every customer starts on a route of its own. Pairs (i, j) are taken in decreasing order
    of their saving ``d[0, i] + d[0, j] - d[i, j]`` (ties by index); two routes merge through
    i and j when both are ends of different routes and the merged load fits. Without a
    capacity (TSP) any routes left at the end are joined into one.

    Args:
        distances (ndarray[n + 1, n + 1]): symmetric distances, depot at 0.
        demands: demand per node, depot first.
        capacity: vehicle capacity, or None for none.

    Returns:
        Routes of customer indices, checked feasible.

    Example:
        >>> d = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=float)
        >>> clarke_wright(d, [0, 1, 1], capacity=2)
        [[1, 2]]
    """
    distances, demands = _check_inputs(distances, demands, capacity)
    n = len(demands) - 1
    if n == 0:
        return []
    limit = np.inf if capacity is None else float(capacity)

    routes: dict[int, list[int]] = {i: [i] for i in range(1, n + 1)}
    owner = {i: i for i in range(1, n + 1)}
    loads = {i: float(demands[i]) for i in range(1, n + 1)}
    i_index, j_index = np.triu_indices(n, k=1)
    i_index, j_index = i_index + 1, j_index + 1
    savings = distances[0, i_index] + distances[0, j_index] - distances[i_index, j_index]
    # Stable sort on the negated savings: equal savings keep the (i, j) order.
    order = np.argsort(-savings, kind="stable")

    for k in order:
        if savings[k] < 0:
            break
        i, j = int(i_index[k]), int(j_index[k])
        a, b = owner[i], owner[j]
        if a == b or loads[a] + loads[b] > limit:
            continue
        first, second = routes[a], routes[b]
        if first[-1] != i:
            if first[0] != i:
                continue
            first = first[::-1]
        if second[0] != j:
            if second[-1] != j:
                continue
            second = second[::-1]
        routes[a] = first + second
        loads[a] += loads.pop(b)
        for node in routes.pop(b):
            owner[node] = a

    result = [routes[key] for key in sorted(routes)]
    if capacity is None and len(result) > 1:
        result = [[node for route in result for node in route]]
    check_solution(result, demands, capacity)
    return result


def _integer_matrix(distances: np.ndarray, scale: float) -> np.ndarray:
    return np.rint(distances * scale).astype(np.int64)


def solve_ortools(
    distances: np.ndarray,
    demands: Sequence[int],
    capacity: float | None,
    time_limit: float = 1.0,
    scale: float = 1.0,
    vehicles: int | None = None,
) -> list[list[int]]:
    """OR-Tools routing: cheapest-arc start, guided local search until ``time_limit``.

    Args:
        distances (ndarray[n + 1, n + 1]): distances, depot at 0.
        demands: demand per node, depot first.
        capacity: vehicle capacity, or None for a single vehicle without one (TSP).
        time_limit: seconds of search.
        scale: distances are multiplied by this and rounded to integers for the search
            (1 for TSPLIB instances, whose distances are integers already; 1e4 or so for the
            unit square).
        vehicles: fleet size; default one per customer, which never runs short.

    Returns:
        Routes of customer indices, checked feasible.

    Raises:
        ImportError: ``ortools`` is not installed.
        RuntimeError: OR-Tools found no solution within the time limit.
    """
    try:
        from ortools.constraint_solver import pywrapcp, routing_enums_pb2
    except ImportError as error:
        raise ImportError("the OR-Tools baseline needs ortools: pip install ortools") from error
    if not time_limit > 0:
        raise ValueError(f"time_limit must be positive, got {time_limit}")
    distances, demands = _check_inputs(distances, demands, capacity)
    n = len(demands) - 1
    if n == 0:
        return []
    matrix = _integer_matrix(distances, scale).tolist()
    fleet = 1 if capacity is None else (vehicles or n)

    manager = pywrapcp.RoutingIndexManager(n + 1, fleet, 0)
    routing = pywrapcp.RoutingModel(manager)

    def distance(from_index: int, to_index: int) -> int:
        return matrix[manager.IndexToNode(from_index)][manager.IndexToNode(to_index)]

    routing.SetArcCostEvaluatorOfAllVehicles(routing.RegisterTransitCallback(distance))
    if capacity is not None:
        demand_list = demands.tolist()

        def demand(index: int) -> int:
            return demand_list[manager.IndexToNode(index)]

        routing.AddDimensionWithVehicleCapacity(
            routing.RegisterUnaryTransitCallback(demand), 0, [int(capacity)] * fleet, True, "load"
        )

    params = pywrapcp.DefaultRoutingSearchParameters()
    params.first_solution_strategy = routing_enums_pb2.FirstSolutionStrategy.PATH_CHEAPEST_ARC
    params.local_search_metaheuristic = (
        routing_enums_pb2.LocalSearchMetaheuristic.GUIDED_LOCAL_SEARCH
    )
    params.time_limit.FromMilliseconds(max(1, int(time_limit * 1000)))
    solution = routing.SolveWithParameters(params)
    if solution is None:
        raise RuntimeError(f"OR-Tools found no solution in {time_limit} s")

    routes = []
    for vehicle in range(fleet):
        index = solution.Value(routing.NextVar(routing.Start(vehicle)))
        route = []
        while not routing.IsEnd(index):
            route.append(manager.IndexToNode(index))
            index = solution.Value(routing.NextVar(index))
        if route:
            routes.append(route)
    check_solution(routes, demands, capacity)
    return routes


def solve_pyvrp(
    distances: np.ndarray,
    demands: Sequence[int],
    capacity: float | None,
    time_limit: float = 1.0,
    scale: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """PyVRP's hybrid genetic search until ``time_limit`` seconds.

    Args:
        distances, demands, capacity, scale: as for :func:`solve_ortools`.
        time_limit: seconds of search.
        seed: PyVRP's random seed.

    Returns:
        Routes of customer indices, checked feasible.

    Raises:
        ImportError: ``pyvrp`` is not installed.
        RuntimeError: PyVRP's best solution is infeasible.
    """
    try:
        import pyvrp
        from pyvrp.stop import MaxRuntime
    except ImportError as error:
        raise ImportError("the PyVRP baseline needs pyvrp: pip install pyvrp") from error
    if not time_limit > 0:
        raise ValueError(f"time_limit must be positive, got {time_limit}")
    distances, demands = _check_inputs(distances, demands, capacity)
    n = len(demands) - 1
    if n == 0:
        return []
    matrix = _integer_matrix(distances, scale)

    model = pyvrp.Model()
    load_limit = int(demands.sum()) if capacity is None else int(capacity)
    model.add_vehicle_type(num_available=1 if capacity is None else n, capacity=[load_limit])
    # Every node gets its own location, the depot's first, so location i is node i; the
    # coordinates are unused: all distances come from the edges.
    locations = [model.add_location(x=0, y=0) for _ in range(n + 1)]
    model.add_depot(locations[0])
    for location, demand in zip(locations[1:], demands[1:]):
        model.add_client(location, delivery=[int(demand)])
    for i, frm in enumerate(locations):
        for j, to in enumerate(locations):
            if i != j:
                model.add_edge(frm, to, distance=int(matrix[i, j]))
    result = model.solve(stop=MaxRuntime(time_limit), seed=seed, display=False)
    if not result.is_feasible():
        raise RuntimeError(f"PyVRP found no feasible solution in {time_limit} s")

    # A route lists activities; a client activity's idx counts clients from 0.
    routes = [
        [int(activity.idx) + 1 for activity in route if activity.is_client()]
        for route in result.best.routes()
    ]
    routes = [route for route in routes if route]
    check_solution(routes, demands, capacity)
    return routes
