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
"""

from __future__ import annotations

import builtins
import keyword
import math
from pathlib import Path

import networkx as nx

from ..plan import plan_source


_TORCH_FN = {"exp": "torch.exp", "log": "torch.log", "log1p": "torch.log1p", "expm1": "torch.expm1", "abs": "torch.abs", "sqrt": "torch.sqrt",
             "square": "torch.square", "sigmoid": "torch.sigmoid", "logsigmoid": "F.logsigmoid",
             "softplus": "F.softplus", "relu": "torch.relu", "tanh": "torch.tanh", "sign": "torch.sign"}
_MATH_FN = {"exp": "math.exp", "log": "math.log", "log1p": "math.log1p", "expm1": "math.expm1", "abs": "abs", "sqrt": "math.sqrt", "tanh": "math.tanh"}
_BIN_PREC = {"+": 60, "-": 60, "*": 70, "/": 70, "**": 90}
_CMP = {"<", "<=", ">", ">=", "==", "!="}
_CHEAP = {"+", "-", "*", "/", "**", "neg", "min", "max", "clip", "where", "stopgrad", "alias", "def", "not",
          "and", "or", *_TORCH_FN, *_CMP}
_PY_NAMES = set(dir(builtins)) | set(keyword.kwlist) | set(keyword.softkwlist)
_STAGE = {"const": None, "score": "score", "model": "advantage", "loss": "loss"}


def _pyname(name: str) -> str:
    """The Python name of a spec name: a Python keyword or built-in gets a trailing "_", and so
    does every name that already ends in "_", so two spec names never share a Python name.
    (The checker rejects the names the generated code itself uses: GENERATED_NAMES.) Only a
    checked identifier (the grammar's NAME) is emitted; anything else is refused."""
    if not (name.isidentifier() and name.isascii()):
        raise ValueError(f"not an identifier: {name!r}")
    if name in _PY_NAMES or name.endswith("_"):
        return name + "_"
    return name


def _text(s: str) -> str:
    """``s`` made safe to stand inside a generated comment or docstring: backslashes and double
    quotes are escaped and every non-printable character (newlines, ``\\r``, form feeds, U+2028,
    ...) is written as its escape, so that text from a spec or its path can neither end the
    comment or docstring nor start a line of code."""
    out = []
    for ch in s:
        if ch in '\\"':
            out.append("\\" + ch)
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _num(v) -> str:
    """A Python literal for a number (inf and nan have no literal: float('inf'))."""
    if isinstance(v, float) and not math.isfinite(v):
        return "float('nan')" if v != v else "float('inf')" if v > 0 else "-float('inf')"
    return repr(v)


class _Emitter:
    def __init__(self, g: nx.DiGraph):
        self.g = g
        self.var: dict[str, str] = {}
        self.uses: dict[str, int] = {n: 0 for n in g}
        for n, a in g.nodes(data=True):
            for x in a["args"]:
                self.uses[x] += 1
        self.tmp = 0
        self.moved: dict[str, str] = {}
        self.file = Path(g.graph.get("path") or "spec").name

    def stage(self, n):
        if n in self.moved:
            return self.moved[n]
        a = self.g.nodes[n]
        if a["op"] == "minimize":  # every term is a value of loss(), even one that reads no trained quantity
            return "loss"
        return _STAGE[a["phase"]]

    def move_cheap_nodes(self):
        """Unnamed elementwise nodes read only by a later stage are recomputed there.

        `-A` or `value_old - eps` cost less to recompute than to carry, and the code reads
        better when they stay inside the statement that uses them.
        """
        order = ["score", "advantage", "loss"]
        for n in reversed(list(nx.topological_sort(self.g))):
            a = self.g.nodes[n]
            st = self.stage(n)
            if a.get("name") or st not in ("score", "advantage") or a["op"] not in _CHEAP:
                continue
            users = {self.stage(u) for u in self.g.successors(n)}
            if users and all(u is not None and order.index(u) > order.index(st) for u in users) and len(users) == 1:
                self.moved[n] = users.pop()

    def where(self, n) -> str:
        a = self.g.nodes[n]
        span = a.get("stmt_span") or a["span"]
        return f"{_text(Path(span.file).name)}:{span.line}" if span.line else ""

    def gsize(self, n) -> str:
        return "SAMPLE_GROUP" if self.stage(n) == "score" else "GROUP"

    # -------------------------------------------------------------- expressions
    def ref(self, x, consumer) -> tuple[str, int]:
        """Text of argument x as seen by `consumer`, with any broadcast to the consumer's level."""
        text, prec = self.expr(x)
        a, c = self.g.nodes[x], self.g.nodes[consumer]
        if c["op"] in ("+", "-", "*", "/", "**", "neg", "min", "max", "clip", "where", "alias", "def") or c["op"] in _CMP \
                or c["op"] in ("and", "or", "not"):
            if a["level"] == "group" and c["level"] in ("response", "action"):
                return f"ops.broadcast_group({text}, {self.gsize(consumer)})", 100
            if a["level"] == "response" and c["level"] == "action":
                return (f"{text}[:, None]" if prec >= 100 else f"({text})[:, None]"), 100
        return text, prec

    def scalar(self, n) -> bool:
        return self.g.nodes[n]["phase"] == "const"

    def expr(self, n) -> tuple[str, int]:
        if n in self.var:
            return self.var[n], 100
        g, a = self.g, self.g.nodes[n]
        op, args = a["op"], a["args"]
        if op == "const":
            v = a["value"]
            return (_num(v), 100 if (not isinstance(v, (int, float)) or v >= 0) else 80)
        if op == "str":
            return repr(a["value"]), 100
        if op == "param":
            return _pyname(a["name_ref"]), 100
        if op in ("alias", "def"):
            return self.ref(args[0], n)
        if op in _BIN_PREC:
            p = _BIN_PREC[op]
            (lt, lp), (rt, rp) = self.ref(args[0], n), self.ref(args[1], n)
            if op == "**":
                lt = lt if lp > p else f"({lt})"
                rt = rt if rp >= 80 else f"({rt})"
            else:
                lt = lt if lp >= p else f"({lt})"
                rt = rt if rp > p else f"({rt})"
            return f"{lt} {op} {rt}", p
        if op == "neg":
            t, p = self.ref(args[0], n)
            return (f"-{t}" if p >= 80 else f"-({t})"), 80
        if op in _CMP:
            (lt, lp), (rt, rp) = self.ref(args[0], n), self.ref(args[1], n)
            return f"{lt if lp > 50 else f'({lt})'} {op} {rt if rp > 50 else f'({rt})'}", 50
        if op in ("and", "or"):
            sym = "&" if op == "and" else "|"
            parts = [self.ref(x, n) for x in args]
            return f" {sym} ".join(t if p >= 100 else f"({t})" for t, p in parts), 40
        if op == "not":
            t, p = self.ref(args[0], n)
            return (f"~{t}" if p >= 100 else f"~({t})"), 80
        texts = [self.ref(x, n)[0] for x in args]
        if op in _TORCH_FN:
            if self.scalar(n):
                if op in _MATH_FN:
                    return f"{_MATH_FN[op]}({texts[0]})", 100
                return f"{_TORCH_FN[op]}(torch.as_tensor({texts[0]}))", 100
            return f"{_TORCH_FN[op]}({texts[0]})", 100
        if op == "stopgrad":
            t, p = self.ref(args[0], n)
            return (f"{t}.detach()" if p >= 100 else f"({t}).detach()"), 100
        if op in ("min", "max"):
            s0, s1 = self.scalar(args[0]), self.scalar(args[1])
            if s0 and s1:
                return f"{op}({texts[0]}, {texts[1]})", 100
            if s0 or s1:
                t, s = (texts[1], texts[0]) if s0 else (texts[0], texts[1])
                return f"torch.clamp({t}, {'max' if op == 'min' else 'min'}={s})", 100
            return f"torch.{'minimum' if op == 'min' else 'maximum'}({texts[0]}, {texts[1]})", 100
        if op == "clip":
            s1, s2 = self.scalar(args[1]), self.scalar(args[2])
            if s1 == s2:
                return f"torch.clamp({texts[0]}, {texts[1]}, {texts[2]})", 100
            return f"torch.clamp(torch.clamp({texts[0]}, min={texts[1]}), max={texts[2]})", 100
        if op == "where":
            if self.scalar(args[0]):
                return f"({texts[1]} if {texts[0]} else {texts[2]})", 100
            if self.scalar(args[1]) and self.scalar(args[2]):
                # two numbers: torch would make a float32 tensor; use the batch's float type
                return f"torch.where({texts[0]}, torch.as_tensor({texts[1]}, dtype=dtype), {texts[2]})", 100
            return f"torch.where({texts[0]}, {texts[1]}, {texts[2]})", 100
        if op == "input":
            return f'batch["{a["quantity"]}"]', 100
        if op == "external":
            return f'batch["{a["fn"]}"]', 100
        lv = g.nodes[args[0]]["level"] if args else None
        in_loss = self.stage(n) == "loss"
        x = texts[0] if texts else ""
        G = self.gsize(n)
        if op in ("sum_tokens", "mean_tokens"):
            return f"ops.{op}({x}, mask)", 100
        if op == "token_sum_all":
            return f"ops.token_sum({x}, mask)", 100
        if op == "token_mean_all":
            return (f'ops.token_sum({x}, mask) / totals["tokens"]' if in_loss else f"ops.token_mean({x}, mask)"), 70
        if op == "mean":
            if in_loss:
                return f'{self._method(args[0], "sum")} / totals["{"groups" if lv == "group" else "responses"}"]', 70
            return f"ops.batch_mean({x})", 100  # over every process's rows (ops.batch_stats_reduce)
        if op == "sum":
            return (self._method(args[0], "sum") if in_loss else f"ops.batch_sum({x})"), 100
        if op == "batch_std":
            return f"ops.batch_std({x})", 100
        if op.startswith("group_") or op in ("loo_mean", "winrate"):
            return f"ops.{op}({x}, {G})", 100
        if op == "index":
            return f"ops.at_role({x}, {G}, {a['offset']})", 100
        if op == "whiten":
            return (f"ops.whiten({x}, mask)" if lv == "action" else f"ops.whiten({x})"), 100
        if op == "gae":
            return f"ops.gae({texts[0]}, {texts[1]}, mask, {texts[2]}, {texts[3]})", 100
        if op == "batch_quantile":
            m = ", mask" if lv == "action" else ""
            return f"ops.batch_quantile({texts[0]}, {texts[1]}{m})", 100
        if op in ("batch_rank", "batch_sorted"):
            return f"ops.{op}({', '.join(texts)})", 100
        if op in ("last_token", "suffix_sum"):
            return f"ops.{op}({x}, mask)", 100
        raise NotImplementedError(f"no lowering for op {op!r}")

    def _method(self, x, m):
        t, p = self.expr(x)
        return f"{t}.{m}()" if p >= 100 else f"({t}).{m}()"

    # -------------------------------------------------------------- statements
    def needs_var(self, n) -> bool:
        a = self.g.nodes[n]
        if a["op"] in ("const", "param", "str", "pseudo"):
            return False
        if a["op"] in ("input", "external"):
            return True
        return bool(a.get("name")) or self.uses[n] > 1

    def name_for(self, n) -> str:
        a = self.g.nodes[n]
        if a.get("name"):
            return _pyname(a["name"])
        if a["op"] == "input":
            return a["quantity"]
        if a["op"] == "external":
            return a["fn"]
        self.tmp += 1
        return f"_{a['op'] if a['op'].isidentifier() else 't'}{self.tmp}"


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
