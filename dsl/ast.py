"""The syntax tree of a spec file: frozen dataclasses, every node with its span.

Spans do not take part in equality, so two trees compare equal when they say the same thing,
wherever it was written (the property `parse(fmt(s)) == parse(s)` relies on this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .errors import NOWHERE, Span


def _span() -> Span:
    return field(default=NOWHERE, compare=False, hash=False, repr=False)


# ---------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Number:
    value: float
    text: str = field(default="", compare=False, hash=False)
    span: Span = _span()


@dataclass(frozen=True)
class Str:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span = _span()


@dataclass(frozen=True)
class Keyword:
    name: str
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...] = ()
    kwargs: tuple[Keyword, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / **
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Compare:
    op: str  # < <= > >= == !=
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class BoolOp:
    op: str  # and / or
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Not:
    operand: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Index:
    """`h[chosen]`: the value of a response-level quantity at one role of each group."""

    value: "Expr"
    role: str
    span: Span = _span()


@dataclass(frozen=True)
class ListExpr:
    items: tuple["Expr", ...]
    span: Span = _span()


Expr = Union[Number, Str, Bool, Name, Call, BinOp, Neg, Compare, BoolOp, Not, Index, ListExpr]


# ---------------------------------------------------------------- statements
@dataclass(frozen=True)
class Assign:
    """`name [: type] = value ["doc"]` (type and doc only in `params`)."""

    name: str
    value: Expr
    type: str | None = None
    doc: str | None = None
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True)
class Keep:
    """`keep groups|responses where cond` (filter section)."""

    scope: str
    cond: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Minimize:
    """`minimize [name =] value` (loss section); the loss is the sum of all terms."""

    value: Expr
    name: str | None = None
    span: Span = _span()


Stmt = Union[Assign, Keep, Minimize]


@dataclass(frozen=True)
class Section:
    kind: str
    body: tuple[Stmt, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Import:
    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Data:
    kind: str
    span: Span = _span()


@dataclass(frozen=True)
class Def:
    """`def name(a, b) = expr`: a small function written in the language, inlined at each use."""

    name: str
    params: tuple[str, ...]
    body: Expr
    span: Span = _span()


Item = Union[Import, Data, Def, Section]


@dataclass(frozen=True)
class SpecFile:
    kind: str  # "algorithm" | "library"
    name: str
    extends: str | None
    items: tuple[Item, ...]
    span: Span = _span()
    path: str = field(default="<string>", compare=False, hash=False)
    source: str = field(default="", compare=False, hash=False, repr=False)
    comments: tuple[tuple[int, int, str], ...] = field(default=(), compare=False, hash=False, repr=False)

    # convenience views -------------------------------------------------------
    def sections(self, kind: str) -> list[Section]:
        return [i for i in self.items if isinstance(i, Section) and i.kind == kind]

    @property
    def imports(self) -> list[Import]:
        return [i for i in self.items if isinstance(i, Import)]

    @property
    def defs(self) -> list[Def]:
        return [i for i in self.items if isinstance(i, Def)]

    @property
    def data(self) -> Data | None:
        found = [i for i in self.items if isinstance(i, Data)]
        return found[-1] if found else None


def walk(expr: Expr):
    """Yield `expr` and every sub-expression, parents first."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def children(node: Expr) -> list[Expr]:
    if isinstance(node, Call):
        return list(node.args) + [k.value for k in node.kwargs]
    if isinstance(node, (BinOp, Compare, BoolOp)):
        return [node.left, node.right]
    if isinstance(node, (Neg, Not)):
        return [node.operand]
    if isinstance(node, Index):
        return [node.value]
    if isinstance(node, ListExpr):
        return list(node.items)
    return []
