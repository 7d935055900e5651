"""A checked spec: its parameters (`Param`), pipeline stages (`Stage`) and the `Spec` itself,
and the typing of parameter values (`coerce`: defaults, overrides, schedules).

The checker (dsl/check.py) builds a `Spec`; the compiler, the runtime and the editor read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx

from . import ast as A
from .builtins import MAX_INT
from .errors import Span
from .load import Resolved, error

PARAM_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


@dataclass
class Param:
    name: str
    type: str
    default: object
    value: object
    doc: str | None
    span: Span


@dataclass
class Stage:
    name: str
    spec: str
    links: dict[str, str]
    span: Span


@dataclass
class Spec:
    """A checked algorithm: its parameters, shape, graph and the text it came from."""

    name: str
    path: str
    resolved: Resolved
    params: dict[str, Param]
    data: str | None
    group_size: int
    roles: dict[str, tuple[int, int]]        # role → (first row within the group, rows)
    graph: nx.DiGraph
    train: dict[str, object] = field(default_factory=dict)
    schedules: dict[str, list] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)

    @property
    def is_pipeline(self) -> bool:
        return bool(self.stages)

    @property
    def source(self) -> str:
        return self.resolved.file.source

    def param_values(self) -> dict[str, object]:
        return {p.name: p.value for p in self.params.values()}

    def __repr__(self) -> str:
        return f"Spec({self.name!r}, {self.graph.number_of_nodes()} nodes)"


def _literal(expr: A.Expr):
    """The Python value of a literal expression, or raise ValueError."""
    if isinstance(expr, A.Number):
        return expr.value
    if isinstance(expr, A.Neg) and isinstance(expr.operand, A.Number):
        return -expr.operand.value
    if isinstance(expr, (A.Str, A.Bool)):
        return expr.value
    if isinstance(expr, A.ListExpr):
        return [_literal(i) for i in expr.items]
    raise ValueError


def _type_of(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "list"


def coerce(name: str, type_: str, value, span: Span, *, where: str):
    """Convert an override or default to the parameter's type, or raise a SpecError."""
    if isinstance(value, str) and type_ != "str":
        try:
            value = {"true": True, "false": False}[value.lower()] if type_ == "bool" else float(value)
        except (KeyError, ValueError):
            raise error(f"{where}: parameter {name!r} is a {type_}, got the string {value!r}", span, "type",
                        f"give a {type_}, e.g. {name}=0.1" if type_ != "bool" else "give true or false") from None
    if type_ == "bool":
        if not isinstance(value, bool):
            raise error(f"{where}: parameter {name!r} is a bool, got {value!r}", span, "type")
        return value
    if type_ in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: parameter {name!r} is a number ({type_}), got {value!r}", span, "type")
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{where}: parameter {name!r} is not a finite number (got {value!r})", span, "type",
                        "give a finite number")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise error(f"{where}: parameter {name!r} is too large ({len(str(abs(value)))} digits; "
                        f"the largest is {MAX_INT})", span, "type", "write large numbers with an exponent, e.g. 1e30")
        if type_ == "int":
            if float(value) != int(value):
                raise error(f"{where}: parameter {name!r} is an int, got {value!r}", span, "type")
            if abs(value) > MAX_INT:
                raise error(f"{where}: parameter {name!r} is too large for an int (the largest is {MAX_INT})",
                            span, "type")
            return int(value)
        return float(value)
    if type_ == "str" and not isinstance(value, str):
        raise error(f"{where}: parameter {name!r} is a string, got {value!r}", span, "type")
    return value
