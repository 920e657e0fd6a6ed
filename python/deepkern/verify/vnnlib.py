"""Reads VNN-LIB property files into a :class:`~deepkern.verify.spec.Specification`.

A VNN-LIB file is SMT-LIB: it declares real constants ``X_0 .. X_{n-1}`` (the network's inputs)
and ``Y_0 .. Y_{m-1}`` (its outputs) and asserts a formula over them that a counterexample
meets. Every assertion must hold at once; within one, ``and`` and ``or`` nest freely over
linear comparisons (``<=``, ``>=``, ``<``, ``>``, ``=``) of sums ``(+ ...)``, differences and
constant multiples ``(* c Y_j)``. The formula is brought into disjunctive normal form; each
conjunction gives an input box (every input needs a lower and an upper bound there) and linear
output rows ``C y <= d``. Conjunctions with the same box share a region.

A strict comparison moves its bound by one float64 step to the side it excludes: inputs and
outputs are floating-point numbers, so ``y < d`` is ``y <= d'`` for the double ``d'`` just below
``d``, and a counterexample on the boundary itself is never reported. Input bounds that need a
division are rounded outward, so that a proof that no counterexample exists stays a proof.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from deepkern.verify.spec import Disjunct, Region, Specification

# Terms in disjunctive normal form beyond this many mean a blow-up, not a property.
MAX_CONJUNCTIONS = 100_000

_TOKEN = re.compile(r"(?P<space>\s+)|(?P<comment>;[^\n]*)|(?P<paren>[()])|(?P<word>[^\s();]+)")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_VARIABLE = re.compile(r"([XY])_(0|[1-9]\d*)")
_IGNORED_COMMANDS = {"set-logic", "set-info", "set-option", "check-sat", "get-model", "exit"}


class VnnlibError(ValueError):
    """The VNN-LIB file is malformed or asks for something this reader does not support."""


@dataclass
class _Word:
    text: str
    line: int


@dataclass
class _List:
    items: list
    line: int


@dataclass
class _Linear:
    """``sum(coefficients[v] * v) + constant``; variables are ``("X", i)`` or ``("Y", j)``."""

    coefficients: dict = field(default_factory=dict)
    constant: float = 0.0

    def scaled(self, factor: float) -> _Linear:
        coefficients = {v: c * factor for v, c in self.coefficients.items()}
        return _Linear(coefficients, self.constant * factor)

    def plus(self, other: _Linear) -> _Linear:
        coefficients = dict(self.coefficients)
        for variable, coefficient in other.coefficients.items():
            coefficients[variable] = coefficients.get(variable, 0.0) + coefficient
        coefficients = {v: c for v, c in coefficients.items() if c != 0.0}
        return _Linear(coefficients, self.constant + other.constant)


@dataclass(frozen=True)
class _Atom:
    """The constraint ``expression <= 0`` (``< 0`` when ``strict``), from the comparison on
    ``line``."""

    expression: _Linear
    line: int
    strict: bool = False


def parse_vnnlib(path: str, inputs: int, outputs: int) -> Specification:
    """Parses a VNN-LIB file into the specification of its counterexamples.

    Args:
        path: the ``.vnnlib`` file.
        inputs: how many inputs the network has (the file must declare ``X_0 .. X_{inputs-1}``).
        outputs: how many outputs it has (the file must declare ``Y_0 .. Y_{outputs-1}``).

    Returns:
        A :class:`Specification`: one region per distinct input box (float64 bounds
        ``[inputs]``), each with the disjuncts ``coefficients [k, outputs] @ y <= bounds [k]``
        that make an input of that box a counterexample.

    Raises:
        VnnlibError: malformed s-expressions, undeclared or misnamed variables, declarations
            that do not match ``inputs`` and ``outputs``, a conjunction that leaves an input
            without a lower or upper bound, constraints that mix inputs and outputs or couple
            several inputs, unsupported operators; the message names the file and line.
        OSError: the file cannot be read.

    Example:
        >>> spec = parse_vnnlib("prop_1.vnnlib", inputs=5, outputs=5)
        >>> spec.regions[0].disjuncts[0].coefficients  # -Y_0 <= -3.99...
        tensor([[-1., 0., 0., 0., 0.]], dtype=torch.float64)
    """
    if inputs < 1 or outputs < 1:
        raise ValueError(f"inputs and outputs must be positive, got {inputs} and {outputs}")
    with open(path, encoding="utf-8") as file:
        try:
            text = file.read()
        except UnicodeDecodeError as error:
            raise VnnlibError(f"{path}: not a text file ({error.reason})") from error
    try:
        return _Reader(inputs, outputs).read(text)
    except VnnlibError as error:
        raise VnnlibError(f"{path}:{error}") from error


def _error(line: int, message: str) -> VnnlibError:
    return VnnlibError(f"{line}: {message}")


def _parse_expressions(text: str) -> list:
    """The s-expressions of a file, as nested ``_List`` and ``_Word`` with line numbers."""
    stack: list[_List] = [_List([], 1)]
    line = 1
    position = 0
    for match in _TOKEN.finditer(text):
        if match.start() != position:
            raise _error(line, f"unexpected character {text[position]!r}")
        position = match.end()
        kind, token = match.lastgroup, match.group()
        if kind == "paren" and token == "(":
            stack.append(_List([], line))
        elif kind == "paren":
            if len(stack) == 1:
                raise _error(line, "')' without a matching '('")
            finished = stack.pop()
            stack[-1].items.append(finished)
        elif kind == "word":
            stack[-1].items.append(_Word(token, line))
        line += token.count("\n") if kind in ("space", "comment") else 0
    if position != len(text):
        raise _error(line, f"unexpected character {text[position]!r}")
    if len(stack) > 1:
        raise _error(stack[-1].line, "'(' is never closed")
    return stack[0].items


class _Reader:
    def __init__(self, inputs: int, outputs: int):
        self.counts = {"X": inputs, "Y": outputs}
        self.declared: dict[str, tuple[str, int]] = {}
        self.last_line = 1

    def read(self, text: str) -> Specification:
        asserted = []
        for command in _parse_expressions(text):
            if not isinstance(command, _List) or not command.items:
                raise _error(command.line, "expected a command in parentheses")
            head = self._head(command)
            self.last_line = command.line
            if head == "declare-const":
                self._declare(command)
            elif head == "assert":
                if len(command.items) != 2:
                    raise _error(command.line, "assert takes exactly one formula")
                asserted.append(self._formula(command.items[1]))
            elif head not in _IGNORED_COMMANDS:
                raise _error(command.line, f"unsupported command {head!r}")
        self._check_declarations()
        return self._specification(self._conjoin(asserted, self.last_line))

    # -- declarations ----------------------------------------------------------------------

    def _declare(self, command: _List) -> None:
        items = command.items
        if len(items) != 3 or not all(isinstance(i, _Word) for i in items):
            raise _error(command.line, "expected (declare-const NAME Real)")
        name, sort = items[1].text, items[2].text
        if sort != "Real":
            raise _error(command.line, f"{name} must be declared Real, got {sort}")
        match = _VARIABLE.fullmatch(name)
        if match is None:
            raise _error(command.line, f"variable {name!r} must be named X_<i> or Y_<j>")
        if name in self.declared:
            raise _error(command.line, f"{name} is declared twice")
        kind, index = match.group(1), int(match.group(2))
        if index >= self.counts[kind]:
            what = "inputs" if kind == "X" else "outputs"
            raise _error(
                command.line, f"{name} is declared, but the network has {self.counts[kind]} {what}"
            )
        self.declared[name] = (kind, index)

    def _check_declarations(self) -> None:
        for kind, what in (("X", "inputs"), ("Y", "outputs")):
            count = sum(1 for k, _ in self.declared.values() if k == kind)
            if count != self.counts[kind]:
                raise _error(
                    self.last_line,
                    f"the file declares {count} {kind}_ variables, "
                    f"the network has {self.counts[kind]} {what}",
                )

    # -- formulas in disjunctive normal form -----------------------------------------------

    @staticmethod
    def _head(expression: _List) -> str:
        head = expression.items[0]
        if not isinstance(head, _Word):
            raise _error(expression.line, "expected an operator after '('")
        return head.text

    def _formula(self, expression) -> list[tuple[_Atom, ...]]:
        """The formula as a list of conjunctions of atoms (their disjunction)."""
        if isinstance(expression, _Word) or not expression.items:
            raise _error(expression.line, "expected a formula in parentheses")
        head = self._head(expression)
        arguments = expression.items[1:]
        if head == "and":
            return self._conjoin([self._formula(a) for a in arguments], expression.line)
        if head == "or":
            if not arguments:
                raise _error(expression.line, "(or) needs at least one formula")
            disjunction = []
            for argument in arguments:
                disjunction.extend(self._formula(argument))
            if len(disjunction) > MAX_CONJUNCTIONS:
                raise _error(expression.line, f"more than {MAX_CONJUNCTIONS} disjuncts")
            return disjunction
        if head in ("<=", ">=", "<", ">", "="):
            return [tuple(self._comparison(head, arguments, expression.line))]
        raise _error(expression.line, f"unsupported operator {head!r} in a formula")

    @staticmethod
    def _conjoin(formulas: list, line: int) -> list[tuple[_Atom, ...]]:
        """The conjunction of formulas in normal form, itself in normal form."""
        # Single conjunctions (most assertions: one bound each) are shared by every case, so
        # only the disjunctions multiply out.
        shared: list[_Atom] = []
        cases: list[tuple[_Atom, ...]] = [()]
        for formula in formulas:
            if len(formula) == 1:
                shared.extend(formula[0])
                continue
            if len(cases) * len(formula) > MAX_CONJUNCTIONS:
                raise _error(line, f"the formula expands into more than {MAX_CONJUNCTIONS} cases")
            cases = [case + extra for case in cases for extra in formula]
        shared_atoms = tuple(shared)
        return [shared_atoms + case for case in cases]

    def _comparison(self, operator: str, arguments: list, line: int) -> list[_Atom]:
        if len(arguments) < 2:
            raise _error(line, f"({operator} ...) needs at least two terms")
        terms = [self._term(argument) for argument in arguments]
        atoms = []
        # SMT-LIB chains comparisons: (<= a b c) is a <= b and b <= c.
        strict = operator in ("<", ">")
        for left, right in zip(terms, terms[1:]):
            if operator in ("<=", "<", "="):
                atoms.append(_Atom(left.plus(right.scaled(-1.0)), line, strict))
            if operator in (">=", ">", "="):
                atoms.append(_Atom(right.plus(left.scaled(-1.0)), line, strict))
        return atoms

    def _term(self, expression) -> _Linear:
        if isinstance(expression, _Word):
            text = expression.text
            if _NUMBER.fullmatch(text):
                return _Linear({}, float(text))
            if text not in self.declared:
                raise _error(expression.line, f"{text!r} is not a declared variable")
            return _Linear({self.declared[text]: 1.0}, 0.0)

        if not expression.items:
            raise _error(expression.line, "empty term '()'")
        head = self._head(expression)
        terms = [self._term(argument) for argument in expression.items[1:]]
        if not terms:
            raise _error(expression.line, f"({head}) needs at least one term")
        if head == "+":
            total = _Linear()
            for term in terms:
                total = total.plus(term)
            return total
        if head == "-":
            if len(terms) == 1:
                return terms[0].scaled(-1.0)
            total = terms[0]
            for term in terms[1:]:
                total = total.plus(term.scaled(-1.0))
            return total
        if head == "*":
            variable_terms = [t for t in terms if t.coefficients]
            if len(variable_terms) > 1:
                raise _error(expression.line, "(* ...) of two variables is not linear")
            factor = math.prod(t.constant for t in terms if not t.coefficients)
            base = variable_terms[0] if variable_terms else _Linear({}, 1.0)
            return base.scaled(factor)
        if head == "/":
            if len(terms) != 2 or terms[1].coefficients or terms[1].constant == 0.0:
                raise _error(expression.line, "(/ a c) needs a non-zero constant divisor c")
            return terms[0].scaled(1.0 / terms[1].constant)
        raise _error(expression.line, f"unsupported operator {head!r} in a term")

    # -- from conjunctions to regions ------------------------------------------------------

    def _specification(self, conjunctions) -> Specification:
        inputs, outputs = self.counts["X"], self.counts["Y"]
        regions: dict[tuple[bytes, bytes], Region] = {}
        for conjunction in conjunctions:
            box = self._box(conjunction, inputs)
            if box is None:
                continue
            rows = self._output_rows(conjunction, outputs)
            if rows is None:
                continue
            lower, upper = box
            key = (lower.tobytes(), upper.tobytes())
            if key not in regions:
                regions[key] = Region(torch.from_numpy(lower), torch.from_numpy(upper))
            coefficients, bounds = rows
            regions[key].disjuncts.append(
                Disjunct(torch.from_numpy(coefficients), torch.from_numpy(bounds))
            )
        if not regions:
            raise _error(self.last_line, "every input region of the property is empty")
        return Specification(list(regions.values()), inputs, outputs)

    def _box(self, conjunction, inputs: int):
        """The input box of one conjunction, or None when it is empty."""
        lower = np.full(inputs, -np.inf)
        upper = np.full(inputs, np.inf)
        for atom in conjunction:
            kinds = {kind for kind, _ in atom.expression.coefficients}
            if kinds == {"X", "Y"}:
                raise _error(atom.line, "a constraint mixing inputs and outputs is not supported")
            if kinds != {"X"}:
                continue
            if len(atom.expression.coefficients) > 1:
                raise _error(atom.line, "a constraint coupling several inputs is not supported")
            (((_, index), coefficient),) = atom.expression.coefficients.items()

            # coefficient * x + constant <= 0 bounds x by -constant / coefficient.
            # (Adding 0.0 turns -0.0 into 0.0.)
            # A strict bound excludes its own value; one that needs a division is rounded
            # outward instead (no float32 input lies within a double's step of such a bound).
            bound = -atom.expression.constant / coefficient + 0.0
            exact = abs(coefficient) == 1.0
            if coefficient > 0:
                if exact and atom.strict:
                    bound = np.nextafter(bound, -np.inf)
                elif not exact:
                    bound = np.nextafter(bound, np.inf)
                upper[index] = min(upper[index], bound)
            else:
                if exact and atom.strict:
                    bound = np.nextafter(bound, np.inf)
                elif not exact:
                    bound = np.nextafter(bound, -np.inf)
                lower[index] = max(lower[index], bound)

        line = conjunction[0].line if conjunction else self.last_line
        for index in range(inputs):
            for values, which in ((lower, "lower"), (upper, "upper")):
                if not np.isfinite(values[index]):
                    raise _error(line, f"X_{index} has no {which} bound in this case")
        if (lower > upper).any():
            return None
        return lower, upper

    @staticmethod
    def _output_rows(conjunction, outputs: int):
        """``(C [k, outputs], d [k])`` of one conjunction, or None when it is false."""
        rows, bounds = [], []
        for atom in conjunction:
            expression = atom.expression
            kinds = {kind for kind, _ in expression.coefficients}
            if not kinds:
                if expression.constant > 0 or (atom.strict and expression.constant == 0):
                    return None
                continue
            if kinds != {"Y"}:
                continue
            row = np.zeros(outputs)
            for (_, index), coefficient in expression.coefficients.items():
                row[index] = coefficient
            rows.append(row)
            bound = 0.0 - expression.constant
            bounds.append(np.nextafter(bound, -np.inf) if atom.strict else bound)
        if not rows:
            # No condition on the outputs: every input of the box is a counterexample, which
            # the row 0 y <= 0 (always met) says in the form the solver reads.
            rows, bounds = [np.zeros(outputs)], [0.0]
        coefficients = np.array(rows, dtype=np.float64).reshape(len(rows), outputs)
        return coefficients, np.array(bounds, dtype=np.float64)


__all__ = ["MAX_CONJUNCTIONS", "VnnlibError", "parse_vnnlib"]
