"""Pass: dead — remove every node that no output depends on.

Requires: outputs listed in graph metadata (terms, keeps, selects).
Ensures: only ancestors of outputs remain, so a quantity no longer read (e.g. `logp_ref`
after a KL weight folded to 0) disappears, and with it the model that would compute it.
Named statements that became unused are removed too: they cost nothing at run time.
"""

from __future__ import annotations

import networkx as nx

from .. import ir


def dead(g: nx.DiGraph) -> nx.DiGraph:
    g = ir.copy(g)
    live = set()
    for o in ir.outputs(g):
        live.add(o)
        live |= nx.ancestors(g, o)
    g.remove_nodes_from([n for n in list(g.nodes) if n not in live])
    for n, a in g.nodes(data=True):
        if "call_args" in a:
            a["call_args"] = tuple(x for x in a["call_args"] if x in g)
    return g
