"""Lowering's expressions: `_Emitter` gives one graph node's Python text (with broadcasts to
its consumer's level and the precedence to parenthesize it), the stage that computes it and
the spec-derived Python name of a statement; `_pyname`, `_text` and `_num` render names,
strings and numbers. Used by the lower pass (lower.py); it emits nothing by itself."""

from __future__ import annotations

import builtins
import keyword
import math
from pathlib import Path

import networkx as nx




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
