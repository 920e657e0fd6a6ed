"""Vehicle-routing instances: the Nazari generator, TSPLIB and CVRPLIB files, costs, checks.

- :func:`generate_vrp`: the random capacitated VRP of Nazari, Oroojlooy, Snyder and Takac
  (2018): depot and customers uniform in the unit square, integer demands 1 to 9, vehicle
  capacity 20 / 30 / 40 / 50 for 10 / 20 / 50 / 100 customers. Seeded.
- :func:`read_instance`: a TSPLIB ``.tsp`` or CVRPLIB ``.vrp`` file, parsed by the ``vrplib``
  package after our own line-by-line check, so that a malformed file gets an error naming
  its line.
- :func:`read_solution`, :func:`write_solution`, :func:`find_known_solution`: CVRPLIB
  ``.sol`` files and TSPLIB ``.opt.tour`` files.
- :func:`route_cost` and :func:`distance_matrix`: costs under the instance's own convention
  (TSPLIB ``EUC_2D`` rounds every edge to the nearest integer).
- :func:`check_solution`: the one feasibility check every solver's answer goes through; an
  infeasible solution raises :class:`InfeasibleSolutionError`.

Solutions are lists of routes; a route lists the customers it visits in order, by node index
(the depot is node 0 and is left out: every route starts and ends there). This is the
CVRPLIB ``.sol`` numbering when the depot is the file's first node.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NAZARI_CAPACITY",
    "InfeasibleSolutionError",
    "KnownSolution",
    "RoutingInstance",
    "VRPBatch",
    "check_solution",
    "distance_matrix",
    "find_known_solution",
    "generate_vrp",
    "read_instance",
    "read_solution",
    "route_cost",
    "routes_from_sequence",
    "write_solution",
]

# Vehicle capacity for each problem size in Nazari et al. (2018), Section 5.
NAZARI_CAPACITY = {10: 20, 20: 30, 50: 40, 100: 50}

# Edge-weight conventions with coordinates that we can compute; EXACT is plain Euclidean, for
# generated instances in the unit square.
_DISTANCE_TYPES = ("EUC_2D", "CEIL_2D", "ATT", "EXACT")


class InfeasibleSolutionError(ValueError):
    """A solution breaks a constraint: demand unserved, capacity exceeded, a bad route."""


# ---------------------------------------------------------------------------------------------
# Generated instances


@dataclass
class VRPBatch:
    """A batch of CVRP instances of one size.

    Attributes:
        locs (Tensor[B, N + 1, 2], float32): coordinates; node 0 is the depot.
        demands (Tensor[B, N + 1], int64): demand of every node; the depot's is 0.
        capacity (Tensor[B], int64): vehicle capacity of every instance.
    """

    locs: Tensor
    demands: Tensor
    capacity: Tensor

    def __post_init__(self):
        if self.locs.dim() != 3 or self.locs.shape[-1] != 2:
            raise ValueError(f"locs must be [B, N + 1, 2], got {tuple(self.locs.shape)}")
        if self.demands.shape != self.locs.shape[:2]:
            raise ValueError(
                f"demands must be [B, N + 1] = {tuple(self.locs.shape[:2])}, "
                f"got {tuple(self.demands.shape)}"
            )
        if self.capacity.shape != self.locs.shape[:1]:
            raise ValueError(
                f"capacity must be [B] = [{self.locs.shape[0]}], got {tuple(self.capacity.shape)}"
            )

    def __len__(self) -> int:
        return self.locs.shape[0]

    @property
    def num_customers(self) -> int:
        return self.locs.shape[1] - 1

    def slice(self, start: int, stop: int) -> VRPBatch:
        """Instances ``start:stop``."""
        return VRPBatch(self.locs[start:stop], self.demands[start:stop], self.capacity[start:stop])

    def to(self, device: str | torch.device) -> VRPBatch:
        return VRPBatch(self.locs.to(device), self.demands.to(device), self.capacity.to(device))


def generate_vrp(
    num_customers: int,
    count: int,
    seed: int | None = None,
    capacity: int | None = None,
    generator: torch.Generator | None = None,
) -> VRPBatch:
    """Random CVRP instances as in Nazari et al. (2018).

    Args:
        num_customers: customers per instance (N).
        count: instances (B).
        seed: seeds a fresh generator; give this or ``generator``.
        capacity: vehicle capacity; None takes the paper's for N in 10, 20, 50, 100.
        generator: the random source, advanced by the call.

    Returns:
        A :class:`VRPBatch` on the CPU. The same seed gives the same instances.

    Raises:
        ValueError: a count or size below 1, no capacity for an N outside the paper's sizes,
            or a capacity below the largest demand (9).

    Example:
        >>> batch = generate_vrp(20, 4, seed=0)
        >>> batch.locs.shape, int(batch.capacity[0])
        (torch.Size([4, 21, 2]), 30)
    """
    if num_customers < 1:
        raise ValueError(f"num_customers must be at least 1, got {num_customers}")
    if count < 0:
        raise ValueError(f"count must be at least 0, got {count}")
    if capacity is None:
        if num_customers not in NAZARI_CAPACITY:
            raise ValueError(
                f"capacity: no published capacity for {num_customers} customers "
                f"(known for {sorted(NAZARI_CAPACITY)}); give one"
            )
        capacity = NAZARI_CAPACITY[num_customers]
    if capacity < 9:
        raise ValueError(f"capacity must be at least 9, the largest demand, got {capacity}")
    if generator is None:
        if seed is None:
            raise ValueError("give a seed or a generator")
        generator = torch.Generator().manual_seed(seed)

    locs = torch.rand(count, num_customers + 1, 2, generator=generator)
    demands = torch.randint(1, 10, (count, num_customers + 1), generator=generator)
    demands[:, 0] = 0
    return VRPBatch(locs, demands, torch.full((count,), capacity, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Distances and costs


def _nint(x: np.ndarray) -> np.ndarray:
    # TSPLIB's nint rounds halves up: (int)(x + 0.5).
    return np.floor(x + 0.5)


def distance_matrix(coords: np.ndarray, edge_weight_type: str = "EXACT") -> np.ndarray:
    """All pairwise distances under a TSPLIB convention.

    Args:
        coords (ndarray[n, 2]): node coordinates.
        edge_weight_type: ``EUC_2D`` (Euclidean rounded to the nearest integer per edge),
            ``CEIL_2D`` (rounded up), ``ATT`` (TSPLIB's pseudo-Euclidean) or ``EXACT``
            (Euclidean, unrounded).

    Returns:
        ndarray[n, n] of float64.

    Raises:
        ValueError: an unknown edge weight type.
    """
    kind = edge_weight_type.upper()
    if kind not in _DISTANCE_TYPES:
        raise ValueError(
            f"edge_weight_type must be one of {', '.join(_DISTANCE_TYPES)}, got {kind!r}"
        )
    coords = np.asarray(coords, dtype=np.float64)
    diff = coords[:, None, :] - coords[None, :, :]
    squared = (diff**2).sum(-1)
    if kind == "EUC_2D":
        return _nint(np.sqrt(squared))
    if kind == "CEIL_2D":
        return np.ceil(np.sqrt(squared))
    if kind == "ATT":
        exact = np.sqrt(squared / 10.0)
        rounded = _nint(exact)
        return np.where(rounded < exact, rounded + 1, rounded)
    return np.sqrt(squared)


def route_cost(distances: np.ndarray, routes: Sequence[Sequence[int]]) -> float:
    """Total length of the routes, each from the depot (node 0) through its customers and back.

    Args:
        distances (ndarray[n, n]): from :func:`distance_matrix`.
        routes: customer indices per route.

    Example:
        >>> d = distance_matrix(np.array([[0, 0], [3, 4], [0, 1]]), "EUC_2D")
        >>> route_cost(d, [[1], [2]])
        12.0
    """
    total = 0.0
    for route in routes:
        if len(route) == 0:
            continue
        path = [0, *route, 0]
        total += float(distances[path[:-1], path[1:]].sum())
    return total


# ---------------------------------------------------------------------------------------------
# The feasibility check


def routes_from_sequence(sequence: Sequence[int]) -> list[list[int]]:
    """Cut a node sequence that starts and ends at the depot (0) into routes.

    Consecutive depot visits (finished instances wait at the depot) give no empty routes.

    Raises:
        InfeasibleSolutionError: the sequence does not start or end at the depot.

    Example:
        >>> routes_from_sequence([0, 3, 1, 0, 2, 0, 0])
        [[3, 1], [2]]
    """
    sequence = [int(node) for node in sequence]
    if not sequence or sequence[0] != 0:
        raise InfeasibleSolutionError("the vehicle does not start at the depot (node 0)")
    if sequence[-1] != 0:
        raise InfeasibleSolutionError(
            f"the vehicle does not return to the depot: the sequence ends at node {sequence[-1]}"
        )
    routes, current = [], []
    for node in sequence[1:]:
        if node == 0:
            if current:
                routes.append(current)
            current = []
        else:
            current.append(node)
    return routes


def check_solution(
    routes: Sequence[Sequence[int]],
    demands: Sequence[int] | np.ndarray | Tensor,
    capacity: float | None,
    deliveries: Sequence[Sequence[float]] | None = None,
) -> None:
    """Raise unless the routes serve every demand within the vehicle capacity.

    Without ``deliveries`` every visit delivers the customer's whole demand, so each customer
    must be visited exactly once. With ``deliveries`` (split delivery) each visit delivers the
    amount given for it: positive, the amounts of a customer summing to its demand, and a
    customer visited at most once per route.

    Args:
        routes: customer indices (1..n) per route; every route starts and ends at the depot,
            which it does not list.
        demands: demand per node, the depot's (index 0) first.
        capacity: the vehicle capacity, or None for a vehicle without one (TSP).
        deliveries: amounts delivered, one per visit and parallel to ``routes``, or None.

    Raises:
        InfeasibleSolutionError: (a ValueError) naming the first broken constraint.
    """
    demands = np.asarray(
        demands.detach().cpu() if isinstance(demands, Tensor) else demands, dtype=np.float64
    )
    n = len(demands) - 1
    if deliveries is not None and len(deliveries) != len(routes):
        raise InfeasibleSolutionError(
            f"deliveries has {len(deliveries)} routes, the solution {len(routes)}"
        )
    served = np.zeros(n + 1)
    visits = np.zeros(n + 1, dtype=np.int64)
    for r, route in enumerate(routes):
        if len(route) == 0:
            raise InfeasibleSolutionError(f"route {r + 1} is empty")
        for node in route:
            if not 1 <= int(node) <= n:
                raise InfeasibleSolutionError(
                    f"route {r + 1} visits node {node}, which is not a customer (1..{n}); "
                    "a depot visit ends a route"
                )
        amounts = demands[[int(node) for node in route]]
        if deliveries is not None:
            if len(deliveries[r]) != len(route):
                raise InfeasibleSolutionError(
                    f"route {r + 1} has {len(route)} visits but {len(deliveries[r])} amounts"
                )
            amounts = np.asarray(deliveries[r], dtype=np.float64)
        if deliveries is not None:
            if len(set(int(node) for node in route)) != len(route):
                raise InfeasibleSolutionError(f"route {r + 1} visits a customer twice")
            if (amounts <= 0).any():
                raise InfeasibleSolutionError(f"route {r + 1} delivers a non-positive amount")
        load = float(amounts.sum())
        if capacity is not None and load > capacity + 1e-6:
            raise InfeasibleSolutionError(
                f"route {r + 1} carries {load:g}, above the vehicle capacity {capacity:g}"
            )
        np.add.at(served, np.asarray(route, dtype=np.int64), amounts)
        np.add.at(visits, np.asarray(route, dtype=np.int64), 1)

    if deliveries is None:
        twice = np.flatnonzero(visits[1:] > 1)
        if len(twice):
            raise InfeasibleSolutionError(
                f"customer {int(twice[0]) + 1} is visited {int(visits[twice[0] + 1])} times"
            )
    missing = np.flatnonzero(np.abs(served[1:] - demands[1:]) > 1e-6)
    for index in missing:
        customer = int(index) + 1
        raise InfeasibleSolutionError(
            f"customer {customer} receives {served[customer]:g} of its demand {demands[customer]:g}"
        )
    # Without split delivery every customer is visited, those without demand (a TSP) too.
    unvisited = np.flatnonzero(visits[1:] == 0)
    if deliveries is None and len(unvisited):
        raise InfeasibleSolutionError(f"customer {int(unvisited[0]) + 1} is never visited")


# ---------------------------------------------------------------------------------------------
# Instance files


@dataclass
class RoutingInstance:
    """One instance read from a file.

    Attributes:
        name: the file's NAME (or its stem).
        coords (ndarray[n + 1, 2], float64): node coordinates; index 0 is the depot (the
            file's first node, for a TSP any node can serve).
        demands (ndarray[n + 1], int64): demand per node (0 at the depot; all 0 for a TSP).
        capacity: vehicle capacity, None for a TSP (one vehicle without a capacity).
        edge_weight_type: the distance convention (see :func:`distance_matrix`).
        kind: ``"cvrp"`` or ``"tsp"``.
        path: the file it was read from.
    """

    name: str
    coords: np.ndarray
    demands: np.ndarray
    capacity: int | None
    edge_weight_type: str
    kind: str
    path: str | None = None

    @property
    def num_customers(self) -> int:
        return len(self.coords) - 1

    def distances(self) -> np.ndarray:
        """Pairwise distances under the instance's convention."""
        return distance_matrix(self.coords, self.edge_weight_type)

    def cost(self, routes: Sequence[Sequence[int]]) -> float:
        """The routes' total length under the instance's convention."""
        return route_cost(self.distances(), routes)

    def check(self, routes: Sequence[Sequence[int]], deliveries=None) -> None:
        """:func:`check_solution` against this instance (a TSP must be one route)."""
        if self.kind == "tsp" and len(routes) != 1:
            raise InfeasibleSolutionError(
                f"a TSP tour is one route, the solution has {len(routes)}"
            )
        check_solution(routes, self.demands, self.capacity, deliveries)


_SECTION_SHAPES = {
    # section -> (numbers per line, how many are integers from the left)
    "NODE_COORD_SECTION": (3, 1),
    "DEMAND_SECTION": (2, 2),
}
_INTEGER_KEYS = ("DIMENSION", "CAPACITY")


def _number(token: str, integer: bool) -> bool:
    try:
        value = int(token) if integer else float(token)
    except ValueError:
        return False
    return integer or math.isfinite(value)


def _scan(path: str, lines: list[str]) -> dict:
    """Check a TSPLIB/CVRPLIB file line by line; raise a ValueError naming the first bad line."""
    header: dict[str, tuple[str, int]] = {}
    section, section_line, counts = None, 0, {}
    node_lines: dict[str, dict[int, int]] = {}
    demand_lines: dict[int, tuple[int, int]] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        where = f"{path}, line {number}"
        if not line:
            continue
        if line == "EOF":
            break
        word = line.split()[0].rstrip(":").upper()
        if word.endswith("_SECTION"):
            section, section_line = word, number
            counts[section] = (0, number)
            continue
        if section is None or (":" in line and not _number(line.split()[0], False)):
            if ":" not in line:
                raise ValueError(f"{where}: expected 'KEY : VALUE' or a section name, got {line!r}")
            key, value = (part.strip() for part in line.split(":", 1))
            key = key.upper()
            if key in _INTEGER_KEYS and not _number(value, True):
                raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
            header[key] = (value, number)
            section = None
            continue
        tokens = line.split()
        if section == "DEPOT_SECTION":
            if len(tokens) != 1 or not _number(tokens[0], True):
                raise ValueError(f"{where}: DEPOT_SECTION lines hold one integer, got {line!r}")
            if int(tokens[0]) != -1:
                counts[section] = (counts[section][0] + 1, section_line)
            continue
        if section in _SECTION_SHAPES:
            size, integers = _SECTION_SHAPES[section]
            if len(tokens) != size or not all(
                _number(token, i < integers) for i, token in enumerate(tokens)
            ):
                kinds = ["integer"] * integers + ["number"] * (size - integers)
                raise ValueError(
                    f"{where}: {section} lines hold {size} values ({', '.join(kinds)}), "
                    f"got {line!r}"
                )
            # Node ids must name each node once; vrplib reads rows in order and would not say.
            node = int(tokens[0])
            seen = node_lines.setdefault(section, {})
            if node in seen:
                raise ValueError(f"{where}: node {node} already appears on line {seen[node]}")
            seen[node] = number
            if section == "DEMAND_SECTION":
                demand_lines[node] = (int(tokens[1]), number)
        counts[section] = (counts[section][0] + 1, section_line)

    if "DIMENSION" not in header:
        raise ValueError(f"{path}: the header has no DIMENSION line")
    dimension, dimension_line = int(header["DIMENSION"][0]), header["DIMENSION"][1]
    for name in ("NODE_COORD_SECTION", "DEMAND_SECTION"):
        if name in counts and counts[name][0] != dimension:
            raise ValueError(
                f"{path}, line {counts[name][1]}: {name} has {counts[name][0]} lines, but "
                f"DIMENSION (line {dimension_line}) says {dimension}"
            )
    for lines_of in node_lines.values():
        for node, number in lines_of.items():
            if not 1 <= node <= dimension:
                raise ValueError(
                    f"{path}, line {number}: node {node} is outside 1..{dimension} (DIMENSION)"
                )
    return {"header": header, "sections": counts, "demands": demand_lines}


def read_instance(path: str | os.PathLike) -> RoutingInstance:
    """Read a TSPLIB ``.tsp`` or CVRPLIB ``.vrp`` file with coordinates.

    The file is first checked line by line (header lines ``KEY : VALUE`` with integer
    DIMENSION and CAPACITY, three numbers per coordinate line, two integers per demand line,
    section lengths equal to DIMENSION), then parsed by ``vrplib``. A CVRP's depot must be
    its first node, as in every CVRPLIB instance, so that ``.sol`` customer numbers are node
    indices.

    Args:
        path: the file.

    Returns:
        A :class:`RoutingInstance`.

    Raises:
        ValueError: a malformed file (the message names the file and line), a type other
            than TSP or CVRP, no coordinates (explicit weight matrices are not supported), an
            edge weight type we cannot compute, more than one depot or a depot other than
            node 1, or a demand above the capacity.
        OSError: the file cannot be read.
        ImportError: ``vrplib`` is not installed.
    """
    path = os.fspath(path)
    with open(path) as file:
        lines = file.read().splitlines()
    scanned = _scan(path, lines)
    header = scanned["header"]

    kind = (header.get("TYPE", ("", 0))[0].split() or [""])[0].upper()
    if kind not in ("TSP", "CVRP"):
        raise ValueError(f"{path}: TYPE must be TSP or CVRP, got {kind or 'none'}")
    weight_type = header.get("EDGE_WEIGHT_TYPE", ("", 0))[0].upper()
    if weight_type not in _DISTANCE_TYPES[:3]:
        line = header.get("EDGE_WEIGHT_TYPE", ("", "?"))[1]
        raise ValueError(
            f"{path}, line {line}: EDGE_WEIGHT_TYPE must be one of EUC_2D, CEIL_2D, ATT "
            f"(coordinate instances), got {weight_type or 'none'}"
        )
    if "NODE_COORD_SECTION" not in scanned["sections"]:
        raise ValueError(f"{path}: no NODE_COORD_SECTION")
    if kind == "CVRP":
        if "CAPACITY" not in header:
            raise ValueError(f"{path}: a CVRP file needs a CAPACITY line")
        if "DEMAND_SECTION" not in scanned["sections"]:
            raise ValueError(f"{path}: a CVRP file needs a DEMAND_SECTION")
        if "DEPOT_SECTION" not in scanned["sections"]:
            raise ValueError(f"{path}: a CVRP file needs a DEPOT_SECTION naming node 1")
        capacity_text, capacity_line = header["CAPACITY"]
        if int(capacity_text) <= 0:
            raise ValueError(
                f"{path}, line {capacity_line}: CAPACITY must be positive, got {capacity_text}"
            )
        for node, (demand, number) in sorted(scanned["demands"].items()):
            if node == 1 and demand != 0:
                raise ValueError(
                    f"{path}, line {number}: the depot (node 1) has demand {demand}, expected 0"
                )
            if not 0 <= demand <= int(capacity_text):
                raise ValueError(
                    f"{path}, line {number}: node {node} has demand {demand}, outside "
                    f"0..{capacity_text} (CAPACITY, line {capacity_line})"
                )

    try:
        import vrplib
    except ImportError as error:
        raise ImportError("reading routing files needs vrplib: pip install vrplib") from error
    try:
        data = vrplib.read_instance(path, compute_edge_weights=False)
    except Exception as error:  # vrplib raises assorted types for bad files
        raise ValueError(f"{path}: vrplib cannot parse the file: {error}") from error

    coords = np.asarray(data["node_coord"], dtype=np.float64)
    name = str(data.get("name", os.path.splitext(os.path.basename(path))[0]))
    if kind == "TSP":
        demands = np.zeros(len(coords), dtype=np.int64)
        return RoutingInstance(name, coords, demands, None, weight_type, "tsp", path)

    demands = np.asarray(data["demand"], dtype=np.int64)
    capacity = int(data["capacity"])
    depots = np.atleast_1d(np.asarray(data.get("depot", [0])))
    if len(depots) != 1 or int(depots[0]) != 0:
        line = scanned["sections"]["DEPOT_SECTION"][1]
        raise ValueError(
            f"{path}, line {line}: DEPOT_SECTION must name node 1 alone, got "
            f"{[int(d) + 1 for d in depots]}"
        )
    if demands[0] != 0:
        raise ValueError(f"{path}: the depot (node 1) has demand {demands[0]}, expected 0")
    if (demands < 0).any() or demands.max() > capacity:
        worst = int(np.argmax(np.where(demands < 0, capacity + 1, demands)))
        raise ValueError(
            f"{path}: node {worst + 1} has demand {demands[worst]}, outside 0..{capacity} "
            "(the capacity)"
        )
    return RoutingInstance(name, coords, demands, capacity, weight_type, "cvrp", path)


@dataclass
class KnownSolution:
    """A solution file: routes in node indices, and the cost it states (None if none)."""

    routes: list[list[int]]
    stated_cost: float | None
    path: str


def _read_tour(path: str, lines: list[str]) -> KnownSolution:
    """A TSPLIB ``.opt.tour``: node ids after TOUR_SECTION, up to -1 or EOF."""
    nodes, inside, stated = [], False, None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not inside:
            if line.upper().startswith("TOUR_SECTION"):
                inside = True
            elif line.upper().startswith("COMMENT"):
                found = re.search(r"\(([\d.]+)\)", line)
                stated = float(found.group(1)) if found else None
            continue
        if not line or line == "EOF":
            continue
        for token in line.split():
            if not _number(token, True):
                raise ValueError(f"{path}, line {number}: tour entries are integers, got {token!r}")
            if int(token) == -1:
                inside = False
                break
            nodes.append(int(token) - 1)
        if not inside:
            break
    if not nodes:
        raise ValueError(f"{path}: no TOUR_SECTION with nodes")
    # Rotate the cycle to start at node 0 (our depot) and drop it.
    if 0 not in nodes:
        raise ValueError(f"{path}: the tour does not visit node 1")
    start = nodes.index(0)
    return KnownSolution([nodes[start + 1 :] + nodes[:start]], stated, path)


def read_solution(path: str | os.PathLike) -> KnownSolution:
    """Read a CVRPLIB ``.sol`` (via ``vrplib``) or TSPLIB ``.opt.tour`` file.

    Returns:
        A :class:`KnownSolution`; ``.sol`` customer numbers are node indices (depot 0),
        tour node ids (1-based) become indices, rotated so that the tour starts at node 0.

    Raises:
        ValueError: a malformed file, naming the line.
        OSError: the file cannot be read.
    """
    path = os.fspath(path)
    with open(path) as file:
        lines = file.read().splitlines()
    if path.endswith(".tour"):
        return _read_tour(path, lines)

    routes, stated = [], None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}, line {number}"
        if line.lower().startswith("route"):
            if ":" not in line:
                raise ValueError(f"{where}: expected 'Route #k: customers', got {line!r}")
            tokens = line.split(":", 1)[1].split()
            if not tokens or not all(_number(token, True) for token in tokens):
                raise ValueError(f"{where}: a route lists customer numbers, got {line!r}")
            routes.append([int(token) for token in tokens])
        elif line.lower().startswith("cost"):
            value = line.split(None, 1)[1] if len(line.split()) > 1 else ""
            if not _number(value, False):
                raise ValueError(f"{where}: expected 'Cost <number>', got {line!r}")
            stated = float(value)
    if not routes:
        raise ValueError(f"{path}: no 'Route #k:' lines")

    # vrplib reads the same file; its answer must agree with ours.
    try:
        import vrplib
    except ImportError:
        return KnownSolution(routes, stated, path)
    parsed = vrplib.read_solution(path)
    if [list(map(int, r)) for r in parsed["routes"]] != routes:
        raise ValueError(f"{path}: vrplib reads different routes from this file")
    return KnownSolution(routes, stated, path)


def write_solution(path: str | os.PathLike, routes: Sequence[Sequence[int]], cost: float) -> None:
    """Write routes in the CVRPLIB ``.sol`` format (``Route #k: ...`` lines, then ``Cost``).

    Customer numbers are node indices (the depot, node 0, is not listed). A cost that is a
    whole number is written without decimals, as CVRPLIB does. The file is written beside
    its destination and renamed into place.
    """
    path = os.fspath(path)
    lines = [
        f"Route #{k}: {' '.join(str(int(c)) for c in route)}"
        for k, route in enumerate((r for r in routes if len(r)), start=1)
    ]
    text = f"{cost:.0f}" if float(cost).is_integer() else f"{cost:.6f}"
    lines.append(f"Cost {text}")
    partial = path + ".partial"
    with open(partial, "w") as file:
        file.write("\n".join(lines) + "\n")
    os.replace(partial, path)


def find_known_solution(instance_path: str | os.PathLike) -> KnownSolution | None:
    """The ``.sol`` or ``.opt.tour`` file beside an instance (same stem), read; or None."""
    stem = os.path.splitext(os.fspath(instance_path))[0]
    for suffix in (".sol", ".opt.tour"):
        if os.path.exists(stem + suffix):
            return read_solution(stem + suffix)
    return None
