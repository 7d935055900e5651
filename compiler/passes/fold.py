"""Pass: fold — fold the parameters and constants that decide the algorithm's structure.

Requires: `param` nodes carry their effective values (pass resolve).
Ensures: constant function calls are evaluated (`exp(0.5)` becomes a number); arithmetic
identities with a known 0 or 1 are simplified (`x - 0 * y` → `x`, `1 * x` → `x`, `x / 1` → `x`),
so that a weight of 0 disconnects its term (e.g. beta = 0 cuts the KL term and, after pass
dead, its reference model). Parameters used in arithmetic otherwise stay named. Nothing that
changes a value is rewritten: a clip that can never bind stays.
"""

from __future__ import annotations

import math

import networkx as nx

from .. import ir

_EVAL = {"exp": math.exp, "log": math.log, "log1p": math.log1p, "expm1": math.expm1, "abs": abs, "sqrt": math.sqrt, "square": lambda x: x * x,
         "sigmoid": lambda x: 1 / (1 + math.exp(-x)), "tanh": math.tanh, "relu": lambda x: max(x, 0.0),
         "softplus": lambda x: math.log1p(math.exp(x)), "logsigmoid": lambda x: -math.log1p(math.exp(-x)),
         "sign": lambda x: (x > 0) - (x < 0), "min": min, "max": max, "stopgrad": lambda x: x,
         "clip": lambda x, lo, hi: min(max(x, lo), hi)}


def _known(g, n):
    a = g.nodes[n]
    return a["op"] in ("const", "param") and isinstance(a.get("value"), (int, float)) and not isinstance(a.get("value"), bool)


def _value(g, n):
    return g.nodes[n]["value"]


def fold(g: nx.DiGraph) -> nx.DiGraph:
    g = ir.copy(g)
    for n in list(nx.topological_sort(g)):
        if n not in g:
            continue
        a = g.nodes[n]
        op, args = a["op"], a["args"]
        if op in _EVAL and args and all(_known(g, x) for x in args):
            try:
                v = _EVAL[op](*[_value(g, x) for x in args])
            except (ValueError, OverflowError, ZeroDivisionError):
                continue
            a.update(op="const", value=float(v), args=(), folded=True)
            for x in list(g.predecessors(n)):
                g.remove_edge(x, n)
            continue
        keep = _simplify(g, n)
        if keep is not None and keep != n:
            _forward(g, n, keep)
    return g


def _is(g, n, v):
    return _known(g, n) and _value(g, n) == v


def _simplify(g, n):
    """The node that `n` reduces to, or None. May turn `n` into a neg or a zero constant."""
    a = g.nodes[n]
    op, args = a["op"], a["args"]
    if op == "*" and (_is(g, args[0], 0) or _is(g, args[1], 0)):
        return _zero(g, n)
    if op == "*" and _is(g, args[0], 1):
        return args[1]
    if op in ("*", "/") and _is(g, args[1], 1):
        return args[0]
    if op == "/" and _is(g, args[0], 0):
        return _zero(g, n)
    if op in ("+", "-") and _is(g, args[1], 0):
        return args[0]
    if op == "+" and _is(g, args[0], 0):
        return args[1]
    if op == "-" and _is(g, args[0], 0):
        a["op"], a["args"] = "neg", (args[1],)
        if args[0] != args[1]:
            g.remove_edge(args[0], n)
        return None
    if op == "neg" and _is(g, args[0], 0):
        return _zero(g, n)
    return None


def _zero(g, n):
    """Turn n into the scalar 0 when that keeps every consumer well-formed."""
    a = g.nodes[n]
    if a["level"] != "batch" and any(g.nodes[u]["op"] not in ("+", "-", "*", "/", "neg") for u in g.successors(n)):
        return None  # a reduction or function of a per-token zero keeps its per-token shape
    for x in list(g.predecessors(n)):
        g.remove_edge(x, n)
    a.update(op="const", value=0, args=(), level="batch", phase="const", grad=False, folded=True)
    return None


def _forward(g, n, keep):
    """Replace node n by its argument `keep`, moving n's name onto an alias if it had one."""
    a = g.nodes[n]
    if a.get("name"):
        for x in list(g.predecessors(n)):
            g.remove_edge(x, n)
        a.update(op="alias", args=(keep,))
        g.add_edge(keep, n)
        k = g.nodes[keep]
        a.update(level=k["level"], phase=k["phase"], grad=k["grad"])
        return
    ir.replace_uses(g, n, keep)
    g.remove_node(n)
