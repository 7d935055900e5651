"""The canonical form of a checked spec for `alignspec diff`: every local name inlined, sums and
products as signed multisets (`_N` trees of `_Item`s), defaults written out (`_Side`).

See dsl/diff.py's docstring for the rules; nothing here compares two specs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from . import ast as A
from .builtins import FUNCTIONS
from .spec import Spec
from .unparse import unparse, unparse_stmt



SECTION_ORDER = ("params", "data", "def", "sample", "score", "filter", "select", "advantage", "loss",
                 "train", "pipeline")
AGGREGATIONS = {"mean", "sum", "mean_tokens", "sum_tokens", "token_mean_all", "token_sum_all"}
UNORDERED = {"min", "max"}
# Documented defaults of sampler options, so that writing a default out is no difference.
SAMPLER_DEFAULTS = {
    "generate": {"n": A.Number(1, "1"), "temperature": A.Number(1.0, "1.0"), "top_p": A.Number(1.0, "1.0"),
                 "top_k": A.Number(0, "0"), "min_p": A.Number(0.0, "0.0"),
                 "repetition_penalty": A.Number(1.0, "1.0"), "model": A.Name("policy")},
    "rollout": {"env": A.Name("env"), "n": A.Number(1, "1"), "max_turns": A.Number(4, "4"),
                "temperature": A.Number(1.0, "1.0"), "top_p": A.Number(1.0, "1.0"), "model": A.Name("policy")},
}
_PAIR_SIMILARITY = 0.3  # two terms of a sum that share this much of their subtrees are one term changed


def _value_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_value_text(x) for x in v) + "]"
    return repr(v)


# --------------------------------------------------------------------------- canonical trees
@dataclass(frozen=True)
class _Item:
    """One term of a sum (sign ±1) or one factor of a product (sign 1)."""

    sign: int
    node: "_N"
    src: A.Expr             # as written where it is used (a local name stays a name)
    origin: str             # the section where it is used
    via: "_N | None" = None  # the inlined statement root this item was spliced in from

    def show(self) -> str:
        return unparse(_strip_sign(self.src))


class _N:
    """A node of the canonical tree. `key` is equal for equal meanings; `src` is the expression
    as written (with local names, for printing) and `origin` the section it was written in."""

    __slots__ = ("side", "kind", "src", "origin", "op", "value", "func", "role", "kids", "kwargs", "items",
                 "stmt", "key", "_simple", "_sub")

    def __init__(self, side, kind, src, origin, *, op=None, value=None, func=None, role=None, kids=(),
                 kwargs=(), items=()):
        self.side, self.kind, self.src, self.origin = side, kind, src, origin
        self.op, self.value, self.func, self.role = op, value, func, role
        self.kids, self.kwargs, self.items = tuple(kids), tuple(kwargs), tuple(items)
        self.stmt: str | None = None  # set on the root of an inlined statement
        self._simple = None
        self._sub = None
        self.key = self._key()

    def _key(self) -> str:
        k = self.kind
        if k == "leaf":
            return f"{self.op}:{self.value!r}"
        if k == "sum":
            return "S(" + ",".join(sorted(("+" if i.sign > 0 else "-") + i.node.key for i in self.items)) + ")"
        if k == "prod":
            return "P(" + ",".join(sorted(i.node.key for i in self.items)) + ")"
        kids = ",".join(c.key for c in self.kids)
        if k == "call":
            kw = ",".join(f"{n}={v.key}" for n, v in self.kwargs)
            return f"C:{self.func}({kids};{kw})"
        if k == "index":
            return f"I({kids})[{self.role}]"
        return f"{k}{self.op or ''}({kids})"

    def children(self) -> list["_N"]:
        if self.kind in ("sum", "prod"):
            return [i.node for i in self.items]
        return list(self.kids) + [v for _, v in self.kwargs]

    @property
    def head(self) -> str:
        if self.kind == "call":
            return f"call:{self.func}"
        if self.kind == "index":
            return f"index:{self.role}"
        if self.kind == "leaf":
            return "leaf"
        return self.kind + (self.op or "")

    @property
    def simple(self) -> bool:
        """Only numbers, names and arithmetic: a change inside is printed whole, at the nearest named place."""
        if self._simple is None:
            if self.kind == "leaf":
                self._simple = True
            elif self.kind in ("call", "index"):
                self._simple = False
            else:
                self._simple = all(c.simple for c in self.children())
        return self._simple

    @property
    def sub(self) -> Counter:
        """The multiset of the keys of every subtree (for pairing similar terms)."""
        if self._sub is None:
            c = Counter([self.key])
            for ch in self.children():
                c.update(ch.sub)
            self._sub = c
        return self._sub

    def show(self) -> str:
        return unparse(self.src)

    def show_inlined(self) -> str:
        return unparse(self.side.inline(self.src))


def _similarity(x: _N, y: _N) -> float:
    a, b = x.sub, y.sub
    union = sum((a | b).values())
    return sum((a & b).values()) / union if union else 0.0


def _strip_sign(e: A.Expr) -> A.Expr:
    """`e` without its leading minus (a term is printed without its sign)."""
    if isinstance(e, A.Neg):
        return _strip_sign(e.operand)
    if isinstance(e, A.BinOp) and e.op in ("*", "/"):
        return replace(e, left=_strip_sign(e.left))
    return e


def _mul_factors(e: A.Expr) -> list[A.Expr]:
    if isinstance(e, A.BinOp) and e.op == "*":
        return _mul_factors(e.left) + _mul_factors(e.right)
    return [e]


class _Side:
    """One checked spec with its outputs in canonical form."""

    def __init__(self, spec: Spec):
        self.spec = spec
        res = spec.resolved
        self.library = res.file.kind == "library"
        self.params = spec.params
        self.defs = res.defs
        self.stmts: dict[str, tuple[str, A.Assign]] = {}
        for kind in ("score", "advantage", "loss"):
            sec = res.sections.get(kind)
            for st in (sec.body if sec else ()):
                if isinstance(st, A.Assign):
                    self.stmts[st.name] = (kind, st)
        self._memo: dict[str, _N] = {}
        self._locals = True
        self._only: str | None = None  # section_roots: inline only this section's statements
        self.used_params: set[str] = set()
        self.used_defs: set[str] = set()
        if self.library:
            self.sample, self.filters, self.selects, self.terms = None, [], {}, []
            return
        sec = res.sections.get("sample")
        self.sample = None
        if sec is not None and sec.body:
            st = sec.body[0]
            self.sample = (st, self.canon(st.value, "sample"))
        sec = res.sections.get("filter")
        self.filters = [(st, self.canon(st.cond, "filter")) for st in (sec.body if sec else ())]
        sec = res.sections.get("select")
        self.selects = {st.name: (st, self.canon(st.value, "select")) for st in (sec.body if sec else ())}
        sec = res.sections.get("loss")
        self.terms = [(st, self.canon(st.value, "loss")) for st in (sec.body if sec else ())
                      if isinstance(st, A.Minimize)]
        self.used_params |= set(spec.schedules)

    # ------------------------------------------------------------------ building
    def _mk(self, kind, src, origin, **kw) -> _N:
        return _N(self, kind, src, origin, **kw)

    def local(self, name: str) -> _N:
        if name not in self._memo:
            section, st = self.stmts[name]
            node = self.canon(st.value, section)
            if node.stmt is None:
                node.stmt = name
            self._memo[name] = node
        return self._memo[name]

    def section_roots(self, section: str) -> dict[str, _N]:
        """The used statements of `section` that something outside it reads, each in canonical
        form with the statements of its own section inlined and other sections' values as
        placeholders: what the section contributes, whatever the rest of the spec does."""
        used = [n for n in self._memo if self.stmts[n][0] == section]
        inside = set()
        for n in used:
            inside |= {x.id for x in A.walk(self.stmts[n][1].value) if isinstance(x, A.Name) and x.id != n}
        roots = [n for n in used if n not in inside]
        saved, self._memo, self._only = self._memo, {}, section
        try:
            return {n: self.local(n) for n in roots}
        finally:
            self._memo, self._only = saved, None

    def statements(self, section: str, roots: list[str]) -> str:
        """The statements `roots` and the ones of the same section they read, in file order."""
        seen, stack = set(), list(roots)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack += [x.id for x in A.walk(self.stmts[n][1].value) if isinstance(x, A.Name)
                      and x.id in self.stmts and self.stmts[x.id][0] == section]
        sts = sorted((self.stmts[n][1] for n in seen), key=lambda st: (st.span.line, st.span.col))
        return "; ".join(unparse_stmt(st) for st in sts) or "(nothing)"

    def canon_def(self, d: A.Def) -> _N:
        saved, self._locals = self._locals, False
        try:
            return self.canon(d.body, "def")
        finally:
            self._locals = saved

    def canon(self, e: A.Expr, origin: str) -> _N:
        if isinstance(e, A.Number):
            return self._mk("leaf", e, origin, op="num", value=float(e.value))
        if isinstance(e, A.Str):
            return self._mk("leaf", e, origin, op="str", value=e.value)
        if isinstance(e, A.Bool):
            return self._mk("leaf", e, origin, op="bool", value=bool(e.value))
        if isinstance(e, A.Name):
            if self._locals and e.id in self.stmts:
                if self._only and self.stmts[e.id][0] != self._only:  # another section's value
                    return self._mk("leaf", e, origin, op="local", value=self.stmts[e.id][0])
                return self.local(e.id)
            if self._locals and e.id in self.params:
                self.used_params.add(e.id)
            return self._mk("leaf", e, origin, op="name", value=e.id)
        if isinstance(e, A.Neg) or (isinstance(e, A.BinOp) and e.op in "+-"):
            items: list[_Item] = []
            self._flatten(e, 1, origin, items)
            if len(items) == 1 and items[0].sign == 1:
                return items[0].node
            return self._mk("sum", e, origin, items=items)
        if isinstance(e, A.BinOp) and e.op in ("*", "/"):
            sign, node = self._signed(e, origin)
            return node if sign == 1 else self._mk("sum", e, origin, items=[_Item(-1, node, e, origin)])
        if isinstance(e, A.BinOp):  # **
            return self._mk("pow", e, origin, op="**", kids=[self.canon(e.left, origin), self.canon(e.right, origin)])
        if isinstance(e, A.Compare):
            left, right, op = self.canon(e.left, origin), self.canon(e.right, origin), e.op
            if op in (">", ">="):
                left, right, op = right, left, {">": "<", ">=": "<="}[op]
            elif op in ("==", "!=") and right.key < left.key:
                left, right = right, left
            return self._mk("cmp", e, origin, op=op, kids=[left, right])
        if isinstance(e, A.BoolOp):
            parts = []
            stack = [e]
            while stack:
                x = stack.pop()
                if isinstance(x, A.BoolOp) and x.op == e.op:
                    stack += [x.right, x.left]
                else:
                    parts.append(self.canon(x, origin))
            return self._mk("bool", e, origin, op=e.op, kids=sorted(parts, key=lambda n: n.key))
        if isinstance(e, A.Not):
            return self._mk("not", e, origin, kids=[self.canon(e.operand, origin)])
        if isinstance(e, A.Index):
            return self._mk("index", e, origin, role=e.role, kids=[self.canon(e.value, origin)])
        if isinstance(e, A.ListExpr):
            return self._mk("list", e, origin, kids=[self.canon(i, origin) for i in e.items])
        if isinstance(e, A.Call):
            if e.func in self.defs and e.func not in FUNCTIONS:
                self.used_defs.add(e.func)
            args = [self.canon(a, origin) for a in e.args]
            if e.func in UNORDERED:
                args.sort(key=lambda n: n.key)
            kw = {k.name: k.value for k in e.kwargs}
            for name, default in SAMPLER_DEFAULTS.get(e.func, {}).items():
                kw.setdefault(name, default)
            kwargs = [(name, self.canon(v, origin)) for name, v in sorted(kw.items())]
            return self._mk("call", e, origin, func=e.func, kids=args, kwargs=kwargs)
        raise TypeError(f"not an expression: {e!r}")  # pragma: no cover

    def _flatten(self, e: A.Expr, sign: int, origin: str, out: list[_Item]):
        if isinstance(e, A.BinOp) and e.op in "+-":
            self._flatten(e.left, sign, origin, out)
            self._flatten(e.right, sign if e.op == "+" else -sign, origin, out)
            return
        if isinstance(e, A.Neg):
            self._flatten(e.operand, -sign, origin, out)
            return
        s, node = self._signed(e, origin)
        if node.kind == "sum":  # an inlined statement that is itself a sum: splice its terms in
            for it in node.items:
                out.append(replace(it, sign=sign * s * it.sign, via=it.via or (node if node.stmt else None)))
        else:
            out.append(_Item(sign * s, node, e, origin))

    def _signed(self, e: A.Expr, origin: str) -> tuple[int, _N]:
        """(sign, node without a leading minus) for a product-level expression."""
        if isinstance(e, A.Neg):
            s, node = self._signed(e.operand, origin)
            return -s, node
        if isinstance(e, A.BinOp) and e.op == "*":
            sign, items = 1, []
            for f in _mul_factors(e):
                s, node = self._signed(f, origin)
                sign *= s
                if node.kind == "prod":
                    items += [replace(it, via=it.via or (node if node.stmt else None)) for it in node.items]
                else:
                    items.append(_Item(1, node, f, origin))
            if len(items) == 1:
                return sign, items[0].node
            return sign, self._mk("prod", e, origin, items=items)
        if isinstance(e, A.BinOp) and e.op == "/":
            s1, num = self._signed(e.left, origin)
            s2, den = self._signed(e.right, origin)
            return s1 * s2, self._mk("div", e, origin, op="/", kids=[num, den])
        node = self.canon(e, origin)
        if node.kind == "sum" and len(node.items) == 1:
            return node.items[0].sign, node.items[0].node
        return 1, node

    # ------------------------------------------------------------------ printing
    def inline(self, e: A.Expr) -> A.Expr:
        """`e` with every local name replaced by what it stands for (for printing)."""
        if isinstance(e, A.Name) and e.id in self.stmts:
            return self.inline(self.stmts[e.id][1].value)
        if isinstance(e, A.Call):
            return replace(e, args=tuple(self.inline(a) for a in e.args),
                           kwargs=tuple(replace(k, value=self.inline(k.value)) for k in e.kwargs))
        if isinstance(e, (A.BinOp, A.Compare, A.BoolOp)):
            return replace(e, left=self.inline(e.left), right=self.inline(e.right))
        if isinstance(e, (A.Neg, A.Not)):
            return replace(e, operand=self.inline(e.operand))
        if isinstance(e, A.Index):
            return replace(e, value=self.inline(e.value))
        if isinstance(e, A.ListExpr):
            return replace(e, items=tuple(self.inline(i) for i in e.items))
        return e

    def arg_names(self, func: str) -> tuple[str, ...]:
        if func in FUNCTIONS:
            return FUNCTIONS[func].args
        if func in self.defs:
            return self.defs[func].params
        return ()
