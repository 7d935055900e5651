"""Pass: check_levels — re-derive every node's level from its arguments and verify it.

Requires: every node has `op`, `args` and a `level` (set by the checker).
Ensures: the graph is unchanged; raises SpecError (pointing at the spec span) if any node's
level disagrees with what its operation gives for its arguments' levels, so a later pass that
rewrote nodes cannot silently break the level discipline.
"""

from __future__ import annotations

import networkx as nx

from alignspec.dsl.builtins import FUNCTIONS, RANK
from alignspec.dsl.load import error

_FIXED = {"index": "group", "select": "group", "keep": "group", "minimize": "batch", "external": "response"}


def expected_level(g: nx.DiGraph, n: str) -> str | None:
    a = g.nodes[n]
    op, args = a["op"], a["args"]
    if op in ("const", "param", "str"):
        return "batch"
    if op in ("input", "pseudo"):
        return a["level"]
    if op in _FIXED:
        return _FIXED[op]
    levels = [g.nodes[x]["level"] for x in args]
    fn = FUNCTIONS.get(op)
    if op == "batch_sorted":  # read at the rank's rows: the level of `k` (docs/language.md)
        return levels[1]
    if fn is not None and fn.kind not in ("elementwise",):
        return fn.gives or levels[0]
    present = {l for l in levels if l not in (None, "batch")}
    if {"group", "action"} <= present:
        raise error("level mismatch: a per-token value combined with a per-group value", a["span"], "level")
    return max(levels, key=RANK.__getitem__) if levels else "batch"


def check_levels(g: nx.DiGraph) -> nx.DiGraph:
    for n in nx.topological_sort(g):
        a = g.nodes[n]
        want = expected_level(g, n)
        if want != a["level"]:
            raise error(f"internal level error: {a['op']} is {a['level']}-level but its arguments give {want}",
                        a["span"], "level")
    return g
