"""Pass: cse — share common subexpressions.

Requires: a DAG whose nodes carry op, args and their defining attributes.
Ensures: structurally identical computations are one node (e.g. `logp - logp_old` written in
the ratio and in a KL term is computed once). Two nodes are identical when op, ordered
arguments and defining attributes (value, quantity, role, …) agree; `+` and `*` also match
with swapped arguments. The surviving node keeps the first statement name; other names are
kept as aliases so that every spec name still appears in the generated code.
"""

from __future__ import annotations

import networkx as nx

from .. import ir

_KEY_ATTRS = ("value", "quantity", "fn", "role", "offset", "rows", "scope", "term", "name_ref")
_COMMUTATIVE = {"+", "*", "min", "max"}


def _key(g, n):
    a = g.nodes[n]
    args = a["args"]
    if a["op"] in _COMMUTATIVE:
        args = tuple(sorted(args))
    extra = tuple((k, repr(a.get(k))) for k in _KEY_ATTRS if k in a)
    return (a["op"], args, extra)


def cse(g: nx.DiGraph) -> nx.DiGraph:
    g = ir.copy(g)
    seen: dict = {}
    for n in list(nx.topological_sort(g)):
        a = g.nodes[n]
        if a["op"] in ("minimize", "keep", "select", "alias", "def", "pseudo"):
            continue
        if a["op"] == "const" and not a.get("folded"):
            # identical literals written in different places stay distinct: they print the same anyway
            continue
        k = _key(g, n)
        if k not in seen:
            seen[k] = n
            continue
        keep = seen[k]
        if a.get("name"):
            # keep the name: this node becomes an alias of the shared one
            for x in list(g.predecessors(n)):
                g.remove_edge(x, n)
            a.update(op="alias", args=(keep,))
            g.add_edge(keep, n)
            continue
        ir.replace_uses(g, n, keep)
        g.remove_node(n)
    return g
