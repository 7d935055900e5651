"""The compiler's intermediate representation: the checked spec graph plus metadata.

A node is one operation (`op`) with ordered arguments (`args`, node ids), a `level`
(action/response/group/batch), a `phase` (const/score/model/loss: when it can be computed),
`grad` (whether gradients flow through it) and the `span` of the spec text it came from.
Statements carry `name` and `section`. Graph-level metadata lives in `graph.graph`:
`terms`, `keeps`, `selects` (output node ids), `params`, `group_size`, `sample_group_size`,
`roles`, `train`, `schedules`, `name`, `path`.
"""

from __future__ import annotations

import networkx as nx

from alignspec.dsl.builtins import LEVELS, PHASES

REQUIRED = ("op", "args", "level", "phase", "grad", "span")


def outputs(g: nx.DiGraph) -> list[str]:
    """The nodes whose values leave the graph: loss terms, filters and selectors."""
    return list(g.graph.get("terms", [])) + list(g.graph.get("keeps", [])) + list(g.graph.get("selects", []))


def new_id(g: nx.DiGraph, prefix: str = "n") -> str:
    i = g.graph.get("_next", g.number_of_nodes() + 1000)
    while f"{prefix}{i}" in g:
        i += 1
    g.graph["_next"] = i + 1
    return f"{prefix}{i}"


def add_node(g: nx.DiGraph, op: str, args, **attrs) -> str:
    nid = new_id(g)
    g.add_node(nid, op=op, args=tuple(args), **attrs)
    for a in args:
        g.add_edge(a, nid)
    return nid


def replace_uses(g: nx.DiGraph, old: str, new: str) -> None:
    """Point every consumer of `old` (and the graph outputs) at `new`."""
    for user in list(g.successors(old)):
        a = g.nodes[user]
        a["args"] = tuple(new if x == old else x for x in a["args"])
        if "call_args" in a:
            a["call_args"] = tuple(new if x == old else x for x in a["call_args"])
        g.remove_edge(old, user)
        g.add_edge(new, user)
    for key in ("terms", "keeps", "selects"):
        if key in g.graph:
            g.graph[key] = [new if x == old else x for x in g.graph[key]]


def copy(g: nx.DiGraph) -> nx.DiGraph:
    """A copy whose node attribute dicts and graph metadata can be changed freely."""
    h = nx.DiGraph()
    h.graph.update({k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                    for k, v in g.graph.items()})
    for n, a in g.nodes(data=True):
        h.add_node(n, **dict(a))
    h.add_edges_from(g.edges())
    return h


def verify(g: nx.DiGraph, after: str = "") -> None:
    """Debug-mode invariants, checked after every pass in tests."""
    where = f" after {after}" if after else ""
    if not nx.is_directed_acyclic_graph(g):
        raise AssertionError(f"graph has a cycle{where}")
    for n, a in g.nodes(data=True):
        for key in REQUIRED:
            if key not in a:
                raise AssertionError(f"node {n} ({a.get('op')}) lacks {key!r}{where}")
        if a["level"] not in LEVELS and a["level"] is not None:
            raise AssertionError(f"node {n} has level {a['level']!r}{where}")
        if a["phase"] not in PHASES:
            raise AssertionError(f"node {n} has phase {a['phase']!r}{where}")
        for x in a["args"]:
            if x not in g:
                raise AssertionError(f"node {n} reads missing node {x}{where}")
            if not g.has_edge(x, n):
                raise AssertionError(f"edge {x} → {n} missing{where}")
        for x in g.predecessors(n):
            if x not in a["args"] and x not in a.get("call_args", ()):
                raise AssertionError(f"stray edge {x} → {n}{where}")
        for x in a["args"]:
            pa = g.nodes[x]
            if PHASES.index(pa["phase"]) > PHASES.index(a["phase"]):
                raise AssertionError(f"node {n} ({a['op']}, {a['phase']}) reads later-phase {x} ({pa['phase']}){where}")
    for o in outputs(g):
        if o not in g:
            raise AssertionError(f"output {o} missing{where}")
