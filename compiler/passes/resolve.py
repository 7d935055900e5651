"""Pass: resolve — from a checked spec to the compiler's graph.

Requires: a Spec from `alignspec.dsl.check` (names, `extends` and imports already resolved,
levels checked, parameter overrides applied).
Ensures: a fresh graph (the spec is not modified) whose `param` nodes carry their effective
values, with the metadata later passes read: terms, keeps, selects, params, group sizes,
roles, train settings (with the span of each `train` line) and schedules, declared
parameter defaults, the spec's name and path.
"""

from __future__ import annotations

import networkx as nx

from .. import ir


def resolve(spec) -> nx.DiGraph:
    g = ir.copy(spec.graph)
    values = spec.param_values()
    for n, a in g.nodes(data=True):
        if a["op"] == "param":
            a["value"] = values[a["name_ref"]]
    sample_n = spec.graph.graph.get("sample_group_size")
    train_sec = spec.resolved.sections.get("train")
    train_spans = {st.name: st.span for st in train_sec.body if hasattr(st, "name")} if train_sec else {}
    g.graph.update(
        name=spec.name, path=spec.path, params=values,
        param_docs={p.name: p.doc for p in spec.params.values()},
        param_defaults={p.name: p.default for p in spec.params.values()},
        train_spans=train_spans,
        group_size=spec.group_size, roles=dict(spec.roles),
        sample_group_size=sample_n or spec.group_size,
        train=dict(spec.train), schedules=dict(spec.schedules), data=spec.data,
        terms=list(g.graph.get("terms", [])), keeps=list(g.graph.get("keeps", [])),
        selects=list(g.graph.get("selects", [])),
    )
    return g
