"""Pass: plan — the run plan from the spec's data, sample, filter, select and train sections.

Requires: a graph after ``phases`` (metadata: name, data, sample call, group sizes, roles,
keeps, selects, train settings with their spans, schedules, effective params and their
declared defaults).
Ensures: ``graph["plan"]`` is a ``RunPlan`` (compiler/plan.py) in which every sampler option
naming a param holds that param's value and every option left out holds its default; the
data kind is the spec's, or the one its shape implies (pairs for 2-row groups without a
sampler, demonstrations without a sampler, prompts with one); ``logprob_temperature =
"sampling"`` is resolved to the one temperature the spec samples at (a SpecError at the
train line otherwise). Nothing else of the graph changes.
"""

from __future__ import annotations

import networkx as nx

from alignspec.dsl import ast as A
from alignspec.dsl.errors import Span
from alignspec.dsl.load import error

from .. import ir
from ..plan import SAMPLER_OPTIONS, FilterPlan, RolePlan, RunPlan, SamplerPlan, SelectPlan


def plan(g: nx.DiGraph) -> nx.DiGraph:
    g = ir.copy(g)
    meta = g.graph
    params = meta["params"]
    call = meta.get("sample")
    G = meta["group_size"]
    if call is not None:
        sampler = _sampler(call, params)
        data = meta.get("data") or "prompts"
    else:
        data = meta.get("data") or ("pairs" if G == 2 else "demonstrations")
        kind = {"pairs": "pairs", "unpaired": "unpaired"}.get(data, "demonstration")
        sampler = SamplerPlan(kind, rows=2 if kind == "pairs" else 1)
    train = meta.get("train", {})
    filters = tuple(FilterPlan(g.nodes[k].get("scope", "groups"), g.nodes[k]["span"].line)
                    for k in meta.get("keeps", []))
    selects = tuple(SelectPlan(g.nodes[s]["role"], g.nodes[s]["fn"], g.nodes[s]["rows"], g.nodes[s]["span"].line)
                    for s in meta.get("selects", []))
    roles = tuple(RolePlan(name, first, rows) for name, (first, rows) in meta.get("roles", {}).items())
    meta["plan"] = RunPlan(
        name=meta["name"], data=data, sampler=sampler,
        sample_group_size=meta["sample_group_size"], group_size=G, roles=roles,
        filters=filters, selects=selects,
        refill=bool(filters) or any(s.kind == "tree_search" for s in sampler.walk()),
        epochs=int(train.get("epochs", 1)), minibatches=int(train.get("minibatches", 1)),
        iterations=int(train.get("iterations", 1)), reference=str(train.get("reference", "fixed")),
        logprob_temperature=_logprob_temperature(meta, sampler),
        schedules=tuple((k, tuple(v)) for k, v in meta.get("schedules", {}).items()),
        param_defaults=tuple(meta.get("param_defaults", {}).items()),
    )
    return g


def _value(v: A.Expr, params: dict):
    """A sampler option: a literal, a param's value, or a bare name (``model = reference``)."""
    if isinstance(v, (A.Number, A.Str, A.Bool)):
        return v.value
    if isinstance(v, A.Name):
        return params[v.id] if v.id in params else v.id
    raise AssertionError(f"sampler option {v!r} passed the checker")  # the checker allows no other


def _sampler(call: A.Call, params: dict) -> SamplerPlan:
    opts = dict(SAMPLER_OPTIONS.get(call.func, {}))
    for kw in call.kwargs:
        opts[kw.name] = _value(kw.value, params)
    parts = tuple(_sampler(a, params) for a in call.args if isinstance(a, A.Call))
    if call.func == "concat":
        rows = sum(p.rows for p in parts)
    elif call.func == "tree_search":
        rows = 2
    elif call.func in ("generate", "flow_sde", "rollout"):
        rows = int(opts["n"])
    else:
        rows = 1
    return SamplerPlan(call.func, rows=rows, options=tuple(opts.items()), parts=parts, line=call.span.line)


def _logprob_temperature(meta: dict, sampler: SamplerPlan) -> float:
    """``train: logprob_temperature``: a number, or ``"sampling"``: the temperature the spec's
    model samplers draw at (TRL and verl divide the logits by it); 1 by default."""
    t = meta.get("train", {}).get("logprob_temperature", 1)
    if t != "sampling":
        return float(t)
    temps = sorted({float(s.option("temperature", 1.0)) for s in sampler.walk()
                    if s.kind in ("generate", "tree_search", "rollout")})
    if len(temps) != 1:
        span = meta.get("train_spans", {}).get("logprob_temperature") or Span(meta.get("path") or "<spec>", 1, 1, 1, 1)
        raise error(f"{meta['name']}: logprob_temperature = \"sampling\" needs one sampling temperature, "
                    f"found {temps or 'none'}", span, "train", "set train: logprob_temperature to a number")
    return temps[0]
