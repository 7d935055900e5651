"""Syntax tree → canonical text, with the fewest parentheses the grammar needs.

`parse_expr(unparse(e)) == e` holds for every expression the parser can produce (spans aside):
a sub-expression is put in parentheses exactly when its own precedence is lower than the
position it stands in requires (see grammar.lark, lowest to highest):

    or  <  and  <  not  <  comparisons (non-associative)  <  + -  <  * /  <  unary -
        <  **  (right operand: a unary)  <  postfix x[role]  <  atoms (names, numbers, calls, ...)
"""

from __future__ import annotations

from . import ast as A

# precedence levels, lowest first
OR, AND, NOT, CMP, SUM, PROD, UNARY, POW, POSTFIX, ATOM = range(1, 11)
EXPR = OR  # any expression (call arguments, list items, parenthesized)

_BIN = {"+": SUM, "-": SUM, "*": PROD, "/": PROD, "**": POW}


def precedence(e: A.Expr) -> int:
    """The grammar level that `e` is produced at without parentheses."""
    if isinstance(e, A.BoolOp):
        return OR if e.op == "or" else AND
    if isinstance(e, A.Not):
        return NOT
    if isinstance(e, A.Compare):
        return CMP
    if isinstance(e, A.BinOp):
        return _BIN[e.op]
    if isinstance(e, A.Neg):
        return UNARY
    if isinstance(e, A.Index):
        return POSTFIX
    return ATOM


def _operands(e: A.Expr) -> tuple[int, int]:
    """The lowest levels allowed for the (left, right) operand of a binary node."""
    if isinstance(e, A.BoolOp):
        return (OR, AND) if e.op == "or" else (AND, NOT)
    if isinstance(e, A.Compare):
        return SUM, SUM  # non-associative: a comparison operand is parenthesized
    if e.op in ("+", "-"):
        return SUM, PROD
    if e.op in ("*", "/"):
        return PROD, UNARY
    if e.op == "**":
        return POSTFIX, UNARY
    raise ValueError(f"unknown binary operator {e.op!r}")


def number_text(n: A.Number) -> str:
    if n.text:
        return n.text
    v = n.value
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int):
        return str(v)
    text = repr(float(v))
    if text in ("inf", "nan", "-inf"):
        raise ValueError(f"number {v!r} has no literal in the language")
    return text


def _atom(e: A.Expr) -> str:
    if isinstance(e, A.Number):
        return number_text(e)
    if isinstance(e, A.Str):
        return f'"{e.value}"'
    if isinstance(e, A.Bool):
        return "true" if e.value else "false"
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.Call):
        parts = [unparse(a) for a in e.args]
        parts += [f"{k.name} = {unparse(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(parts)})"
    if isinstance(e, A.ListExpr):
        return "[" + ", ".join(unparse(i) for i in e.items) + "]"
    raise TypeError(f"not an expression: {e!r}")


def _at(e: A.Expr, level: int) -> str:
    """`e` as text fit to stand where the grammar expects `level` (parenthesized if lower)."""
    text = unparse(e)
    return f"({text})" if precedence(e) < level else text


def unparse(e: A.Expr) -> str:
    """Canonical text of an expression."""
    if isinstance(e, (A.BinOp, A.Compare, A.BoolOp)):
        lo, ro = _operands(e)
        return f"{_at(e.left, lo)} {e.op} {_at(e.right, ro)}"
    if isinstance(e, A.Neg):
        return "-" + _at(e.operand, UNARY)
    if isinstance(e, A.Not):
        return "not " + _at(e.operand, NOT)
    if isinstance(e, A.Index):
        return f"{_at(e.value, POSTFIX)}[{e.role}]"
    return _atom(e)


def unparse_stmt(s: A.Stmt) -> str:
    """Canonical text of one statement (without indentation or comment)."""
    if isinstance(s, A.Assign):
        text = s.name + (f": {s.type}" if s.type is not None else "") + " = " + unparse(s.value)
        if s.doc is not None:
            text += f' "{s.doc}"'
        return text
    if isinstance(s, A.Keep):
        return f"keep {s.scope} where {unparse(s.cond)}"
    if isinstance(s, A.Minimize):
        named = f"{s.name} = " if s.name is not None else ""
        return f"minimize {named}{unparse(s.value)}"
    raise TypeError(f"not a statement: {s!r}")
