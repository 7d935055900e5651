"""Pass: lower — emit the generated PyTorch module (a string of Python source).

Requires: phases assigned (pass phases); levels checked; outputs in the metadata; the run
plan (pass plan), shown as a `PLAN = {...}` literal of plain values.
Ensures: deterministic source with three functions, one per phase, whose statements use the
spec's names, follow the spec's order and end with a comment `file.align:line`:
  score(batch)              no grad: scores, filters, selection → rows to keep + carried values
  advantage(batch)          no grad: values that read no-grad model outputs → carried values
  loss(batch, totals=None)  per update: (loss, terms, metrics)
Batch-wide reductions in `loss` divide by `totals` (tokens/responses/groups of the whole
optimizer batch, across micro-batches and processes) so accumulation is exact.
The module imports only torch, math and alignspec.ops.

The expressions (`_Emitter`: one node's Python text, names, stages) are in emit.py; this
module lays out the module's header and its three functions.
"""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx

from ..plan import plan_source
from .emit import _Emitter, _num, _pyname, _text


def lower(g: nx.DiGraph) -> nx.DiGraph:
    em = _Emitter(g)
    em.move_cheap_nodes()
    order = list(nx.lexicographical_topological_sort(g, key=lambda n: _pos(g, n)))
    stages = {"score": [], "advantage": [], "loss": []}
    for n in order:
        st = em.stage(n)
        if st and g.nodes[n]["op"] not in ("keep", "select", "minimize") and em.needs_var(n):
            stages[st].append(n)
    carried = {s: [] for s in stages}  # values computed in one stage and read by a later one
    for n in order:
        st = em.stage(n)
        for u in g.successors(n):
            su = em.stage(u)
            if st and su and st != su and n not in carried[st] and g.nodes[n]["op"] not in ("input", "external"):
                carried[st].append(n)
    for st in carried:
        for n in carried[st]:
            if n not in stages[st]:
                stages[st].append(n)
        stages[st].sort(key=order.index)
    for n in order:
        if em.needs_var(n) or any(n in c for c in carried.values()):
            em.var[n] = em.name_for(n)

    lines = _header(g, em)
    lines += _score_fn(g, em, stages["score"], carried["score"])
    lines += _advantage_fn(g, em, stages["advantage"], carried["advantage"])
    lines += _loss_fn(g, em, stages["loss"])
    g.graph["source"] = "\n".join(lines).rstrip() + "\n"
    return g


def _pos(g, n):
    a = g.nodes[n]
    s = a.get("stmt_span") or a["span"]
    return (0 if "common" not in (s.file or "") else 1, s.line, s.col, n)


def _stmt(em, n) -> str:
    text, _ = _rhs(em, n)
    where = em.where(n)
    return f"    {em.var[n]} = {text}" + (f"  # {where}" if where else "")


def _rhs(em, n):
    saved = em.var.pop(n)
    try:
        return em.expr(n)
    finally:
        em.var[n] = saved


def _loads(g, em, roots, stage):
    """`x = batch["x"]` for every input, external or earlier-stage value that a stage reads."""
    need = set()
    for n in _subtree(g, em, roots, stage):
        for x in g.nodes[n]["args"]:
            a = g.nodes[x]
            if a["op"] in ("input", "external") or em.stage(x) not in (stage, None):
                need.add(x)
    out = []
    for x in sorted(need, key=lambda x: _pos(g, x)):
        a = g.nodes[x]
        key = a.get("quantity") or a.get("fn") if a["op"] in ("input", "external") else em.var[x]
        out.append(f'    {em.var[x]} = batch["{key}"]')
    return out


_MASKED = ("sum_tokens", "mean_tokens", "token_mean_all", "token_sum_all", "whiten", "gae", "last_token", "suffix_sum")


def _prelude(g, em, roots, stage) -> list[str]:
    """`mask = ...` and `dtype = ...` when a stage's code (named statements and the
    expressions inlined into them) reads them."""
    nodes = _subtree(g, em, roots, stage)
    out = []
    if any(g.nodes[n]["op"] in _MASKED or (g.nodes[n]["op"] == "batch_quantile" and
                                             g.nodes[g.nodes[n]["args"][0]]["level"] == "action") for n in nodes):
        out.append('    mask = ops.valid_mask(batch["mask"])')
    if any(g.nodes[n]["op"] == "where" and all(em.scalar(x) for x in g.nodes[n]["args"][1:]) for n in nodes):
        out.append("    dtype = ops.float_dtype(batch)")
    return out


def _subtree(g, em, roots, stage):
    """Every node of `stage` that the roots need (through inlined expressions)."""
    seen, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(x for x in g.nodes[n]["args"]
                     if em.stage(x) == stage or (g.nodes[x]["op"] in ("alias", "def") and x not in em.var))
    return seen


def _header(g, em) -> list[str]:
    name, path = g.graph.get("name"), g.graph.get("path")
    inputs = ", ".join(f"{k} [{'B, T' if v == 'action' else 'B, D' if k == 'embedding' else 'B'}]"
                       for k, v in g.graph["inputs"].items())
    req = ", ".join(sorted(g.graph["requires"]))
    source = _text(Path(path).name) if path else "a spec"
    lines = [f'"""{_text(name)}: generated by alignspec from {source}. Do not edit; edit the spec.',
             "",
             f"Reads: {inputs}",
             f"Needs: {req}",
             '"""',
             "import math",
             "",
             "import torch",
             "import torch.nn.functional as F",
             "",
             "from alignspec import ops",
             "",
             "# parameters"]
    docs = g.graph.get("param_docs", {})
    used = {a["name_ref"] for _, a in g.nodes(data=True) if a["op"] == "param"}
    for p, v in g.graph["params"].items():
        doc = f"  # {_text(docs[p])}" if docs.get(p) else ""
        unused = "" if p in used else "  # (not read by this parametrization)"
        lines.append(f"{_pyname(p)} = {_num(v) if isinstance(v, float) else repr(v)}{doc or unused}")
    lines += ["",
              f"SAMPLE_GROUP = {g.graph['sample_group_size']}  # rows per group as sampled",
              f"GROUP = {g.graph['group_size']}  # rows per group in the training batch",
              f"ROLES = {g.graph.get('roles', {})!r}",
              ""]
    if "plan" in g.graph:
        lines += plan_source(g.graph["plan"]) + [""]
    return lines + [""]


def _score_fn(g, em, nodes, carried) -> list[str]:
    keeps, selects = g.graph.get("keeps", []), g.graph.get("selects", [])
    body = nodes
    lines = ['def score(batch):',
             '    """Once per rollout, right after scoring, without gradients: scores, filters, selection.',
             "",
             "    Returns the rows of `batch` that form the training batch (contiguous groups of GROUP)",
             "    and the values later stages read, already restricted to those rows.",
             '    """']
    lines += _prelude(g, em, body + keeps + selects, "score")
    lines += _loads(g, em, body + keeps + selects, "score")
    lines.append("    with torch.no_grad():")
    inner = [_stmt(em, n) for n in body if g.nodes[n]["op"] not in ("input", "external")]
    if keeps:
        conds = []
        for k in keeps:
            t, p = em.ref(g.nodes[k]["args"][0], k)
            conds.append(t if p >= 100 else f"({t})")
        where = em.where(keeps[0])
        inner.append(f"    keep = {' & '.join(conds)}" + (f"  # {where}" if where else ""))
    else:
        inner.append("    keep = None")
    if selects:
        inner.append("    picks = []")
        for s in selects:
            a = g.nodes[s]
            x = em.ref(a["args"][0], s)[0]
            fn, rows = a["fn"], a["rows"]
            excl = "exclude=ops.taken_mask(torch.cat(picks, 1), SAMPLE_GROUP) if picks else None"
            call = {"argmax": f"ops.select_argmax({x}, SAMPLE_GROUP, {excl})",
                    "argmin": f"ops.select_argmin({x}, SAMPLE_GROUP, {excl})",
                    "top_k": f"ops.select_top_k({x}, SAMPLE_GROUP, {rows}, {excl})",
                    "bottom_k": f"ops.select_bottom_k({x}, SAMPLE_GROUP, {rows}, {excl})",
                    "coreset": f'ops.select_coreset({x}, batch["embedding"], SAMPLE_GROUP, {rows}, {excl})',
                    "opt_select": f'ops.select_opt({x}, batch["embedding"], SAMPLE_GROUP, {rows}, {excl})'}[fn]
            inner.append(f"    picks.append({call})  # {a['role']}: {em.where(s)}")
        inner.append("    rows = ops.kept_rows(keep, SAMPLE_GROUP, torch.cat(picks, 1))")
    elif keeps:
        inner.append("    rows = ops.kept_rows(keep, SAMPLE_GROUP)")
    else:
        inner.append("    rows = None")
    lines += ["    " + l for l in inner]
    out = ['"rows": rows', '"keep": keep']
    for n in carried:
        lvl = g.nodes[n]["level"]
        v = em.var[n]
        if lvl in ("response", "action"):
            out.append(f'"{v}": {v} if rows is None else {v}[rows]')
        elif lvl == "group":
            out.append(f'"{v}": {v} if keep is None else {v}[keep]')
        else:
            out.append(f'"{v}": {v}')
    lines.append("    return {" + ", ".join(out) + "}")
    return lines + ["", ""]


def _advantage_fn(g, em, nodes, carried) -> list[str]:
    lines = ['def advantage(batch):',
             '    """Once per rollout, after the no-grad forwards (logp_old, logp_ref, value_old), without gradients."""']
    pre = _prelude(g, em, nodes, "advantage")
    if not any(l.startswith("    mask") for l in pre) and any(
            g.nodes[n].get("name") and g.nodes[n]["level"] == "action" for n in nodes):
        pre.insert(0, '    mask = ops.valid_mask(batch["mask"])')
    lines += pre
    lines += _loads(g, em, nodes, "advantage")
    lines.append("    with torch.no_grad():")
    lines += ["    " + _stmt(em, n) for n in nodes if g.nodes[n]["op"] not in ("input", "external")]
    metrics = []
    for n in nodes:
        a = g.nodes[n]
        if a.get("name") and a["level"] in ("action", "response"):
            v = em.var[n]
            m = f"ops.token_mean({v}, mask)" if a["level"] == "action" else f"{v}.float().mean()"
            metrics.append(f'"{a["name"]}/mean": {m}')
        elif a.get("name") and a["level"] == "batch":  # a batch statistic (KTO's z0)
            metrics.append(f'"{a["name"]}": {em.var[n]}')
    out = [f'"{em.var[n]}": {em.var[n]}' for n in carried]
    lines.append("        metrics = {" + ", ".join(metrics) + "}")
    lines.append("    return {" + ", ".join(out + ['"metrics": metrics']) + "}")
    return lines + ["", ""]


def _loss_fn(g, em, nodes) -> list[str]:
    terms = g.graph.get("terms", [])
    lines = ['def loss(batch, totals=None, with_metrics=True):',
             '    """One update\'s loss, with gradients. Returns (loss, terms, metrics).',
             "",
             "    `totals` holds the number of tokens, responses and groups of the whole optimizer batch",
             "    (summed over micro-batches and processes); by default, this batch's own.",
             "    Metrics (detached summaries for logging) are skipped when `with_metrics` is false.",
             '    """']
    all_nodes = nodes + terms
    lines.append('    mask = ops.valid_mask(batch["mask"])' if "mask" in g.graph["inputs"] else "    mask = None")
    lines += [ln for ln in _prelude(g, em, all_nodes, "loss") if not ln.startswith("    mask")]
    need = sorted({"tokens" if g.nodes[n]["op"] == "token_mean_all" else
                   "groups" if g.nodes[g.nodes[n]["args"][0]]["level"] == "group" else "responses"
                   for n in _subtree(g, em, terms, "loss") if g.nodes[n]["op"] in ("token_mean_all", "mean")})
    lines.append("    if totals is None:")
    lines.append(f"        totals = ops.local_totals(batch, GROUP, need={tuple(need)!r})")
    lines += _loads(g, em, all_nodes, "loss")
    lines += [_stmt(em, n) for n in nodes if g.nodes[n]["op"] not in ("input", "external")]
    tnames = []
    taken = set(em.var.values()) | {_pyname(p) for p in g.graph["params"]}
    for t in terms:
        a = g.nodes[t]
        tn = f"term_{_pyname(a['term'])}" if len(terms) > 1 else "total"
        while tn != "total" and tn in taken:  # a statement already has this name
            tn += "_"
        taken.add(tn)
        text, prec = em.ref(a["args"][0], t)
        if not a["grad"]:  # a constant term: each micro-batch adds its share, so the step's value is the term's
            text = f"{text if prec >= 100 else f'({text})'} * ops.batch_share(batch, totals, GROUP)"
        lines.append(f"    {tn} = {text}  # {em.where(t)}")
        tnames.append((a["term"], tn))
    if 1 < len(terms) <= 32:
        lines.append("    total = " + " + ".join(tn for _, tn in tnames))
    elif len(terms) > 32:  # a long `a + b + ...` nests too deep for Python's compiler
        lines.append("    total = sum((" + ", ".join(tn for _, tn in tnames) + "))")
    # metrics: every named value, every clip, every term
    mlines = []
    for n in nodes:
        a = g.nodes[n]
        if not a.get("name") or a["op"] in ("input",) or a.get("note"):
            continue
        v = em.var[n]
        if a["level"] == "action":
            mlines.append(f'"{a["name"]}/mean": ops.token_mean({v}, mask)')
        elif a["level"] in ("response", "group"):
            mlines.append(f'"{a["name"]}/mean": {v}.float().mean()')
        else:
            mlines.append(f'"{a["name"]}": {v}')
    for n in _subtree(g, em, terms, "loss"):
        a = g.nodes[n]
        if a["op"] == "clip" and em.stage(n) == "loss":
            x, lo, hi = (em.ref(y, n)[0] for y in a["args"])
            owner = _owner(g, n) or "clip"
            m = "mask" if a["level"] == "action" else "None"
            mlines.append(f'"{owner}/clip_fraction": ops.clip_fraction({x}, {lo}, {hi}, {m})')
    for name, tn in tnames:
        mlines.append(f'"loss/{name}": {tn}')
    lines.append("    metrics = {}")
    lines.append("    if with_metrics:")
    lines.append("        with torch.no_grad():")
    lines.append("            metrics = {" + ",\n                       ".join(mlines) + "}")
    lines.append("    return total, {" + ", ".join(f'"{name}": {tn}' for name, tn in tnames) + "}, metrics")
    return lines


def _owner(g, n):
    """The statement a node belongs to (for naming its metric)."""
    stack, seen = [n], set()
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        a = g.nodes[x]
        if a.get("name"):
            return a["name"]
        if a["op"] == "minimize":
            return a["term"]
        stack.extend(g.successors(x))
    return None
