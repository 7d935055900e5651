"""Pass: phases — decide what runs when, and what the run must provide.

Requires: a folded, dead-code-free graph; train settings in the metadata.
Ensures:
- `logp_old` is replaced by `stopgrad(logp)` when each rollout feeds exactly one update
  (1 epoch, 1 mini-batch, 1 iteration) and only the loss reads it: no extra "old" forward.
  Otherwise the run must provide it from a no-grad forward before the updates ("old_logp").
- every node's `phase` is recomputed: score (right after scoring: scores, filters,
  selection; a role index `x[chosen]` of a spec with a select section waits for the
  selection, so it is at least model), model (once per rollout, after the no-grad forwards: advantages), loss (each
  update, with gradients); `grad` is recomputed likewise.
- metadata `inputs` (name → level of everything read from the batch) and `requires` (the
  models, forwards and services this parametrization needs) describe exactly the live graph.
- a SpecError (at the first `minimize`) when folding left no term with a gradient
  (`ampo` with beta = 0 and alpha = 0 minimizes a constant).
"""

from __future__ import annotations

import networkx as nx

from alignspec.dsl.builtins import EXTERNAL_REQUIRES, PHASES, QUANTITIES

from .. import ir


def phases(g: nx.DiGraph) -> nx.DiGraph:
    g = ir.copy(g)
    train = g.graph.get("train", {})
    single_update = all(train.get(k, 1) == 1 for k in ("epochs", "minibatches", "iterations"))
    old = _input(g, "logp_old")
    if old is not None:
        users_in_loss = all(g.nodes[u]["phase"] == "loss" for u in g.successors(old))
        if single_update and users_in_loss:
            logp = _input(g, "logp")
            if logp is None:
                q = QUANTITIES["logp"]
                logp = ir.add_node(g, "input", [], quantity="logp", level=q.level, phase=q.phase, grad=True,
                                   requires=q.requires, span=g.nodes[old]["span"])
            a = g.nodes[old]
            a.update(op="stopgrad", args=(logp,), phase="loss", grad=False, quantity=None,
                     note="logp_old = stopgrad(logp): each rollout is used for one update")
            a["name"] = a.get("name") or "logp_old"
            g.add_edge(logp, old)
    for n in nx.topological_sort(g):
        a = g.nodes[n]
        if a["op"] in ("input",):
            continue
        if a["args"]:
            a["phase"] = max((g.nodes[x]["phase"] for x in a["args"]), key=PHASES.index)
            if a["op"] in ("stopgrad", "keep", "select") or a["op"] in ("<", "<=", ">", ">=", "==", "!=", "and", "or", "not"):
                a["grad"] = False
            else:
                a["grad"] = any(g.nodes[x]["grad"] for x in a["args"])
        if a["op"] in ("external", "select", "keep"):
            a["phase"] = max(a["phase"], "score", key=PHASES.index)
        if a["op"] == "index" and g.graph.get("selects"):
            # roles name rows of the selected group: read them after selection, not before
            a["phase"] = max(a["phase"], "model", key=PHASES.index)
    terms = g.graph.get("terms", [])
    if terms and not any(g.nodes[t]["grad"] for t in terms):
        from alignspec.dsl.load import error
        zeros = ", ".join(f"{k} = {v}" for k, v in g.graph.get("params", {}).items() if v == 0 and not isinstance(v, bool))
        raise error("with these parameter values" + (f" ({zeros})" if zeros else "") + " no loss term depends on a "
                    "trained quantity (logp, value, entropy, rm_score): nothing would learn",
                    g.nodes[terms[0]]["span"], "phase", "choose parameter values that keep a trained term")
    inputs, requires = {}, set()
    for n, a in g.nodes(data=True):
        if a["op"] == "input":
            inputs[a["quantity"]] = a["level"]
            requires |= set(a.get("requires", ()))
        elif a["op"] == "external":
            inputs[a["fn"]] = "response"
            requires.add(EXTERNAL_REQUIRES[a["fn"]])
        elif a["op"] == "select" and a.get("requires"):
            inputs["embedding"] = "response"
            requires |= set(a["requires"])
    if any(l == "action" for l in inputs.values()) or any(a["level"] == "action" for _, a in g.nodes(data=True)):
        inputs.setdefault("mask", "action")
    if "logp_old" in inputs:
        requires.add("old_logp")
    requires |= set(g.graph.get("sample_requires", ()))
    g.graph["inputs"] = dict(sorted(inputs.items()))
    g.graph["requires"] = frozenset(requires)
    g.graph["single_update"] = single_update
    return g


def _input(g, name):
    for n, a in g.nodes(data=True):
        if a["op"] == "input" and a.get("quantity") == name:
            return n
    return None
