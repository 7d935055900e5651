"""The semantic difference of two specs, per section, in words (`alignspec diff A B`).

Both specs are loaded and checked first (so a broken spec is a SpecError), then each is
normalized and the two are compared section by section:

- The resolved specs are compared (extends and params merged, sections replaced by the child).
- Local names are not identity: every statement name (score, advantage, loss) is inlined into
  its uses, recursively, down to runtime quantities, params, numbers, external scorers and
  calls. Calls of library `def`s stay calls (compared by name and arguments) and param names
  stay names (they are the user-visible knobs). Renaming a local or reordering statements is
  no difference; a statement that nothing uses is no difference either.
- Canonical form: `+`/`-` chains become a signed multiset of terms (`-(a - b)` distributes,
  inlined sums are spliced in), `*` chains a multiset of factors (signs pulled out), `/` and
  `**` stay ordered, the arguments of `min`/`max`, `==`/`!=` and `and`/`or` are unordered,
  `a > b` is `b < a`, numbers compare by value (1e-4 == 0.0001), and `generate`'s omitted
  options take their documented defaults.
- What is compared: the sampler call, the filters, the selects (by role), the minimize terms
  (by name, else by position), the train settings, the data kind, the pipeline stages, the
  bodies of the defs both sides call, and the defaults of params that both sides use.
- Two expressions are compared top-down and reported at the deepest place that differs, in
  words that name its role: a term of a sum present on one side only ("term X added"), a
  change of the aggregation ("aggregation mean(mean_tokens(·)) → token_mean_all(·)", then the
  insides are compared), a call whose function changed ("X → Y"), a call argument
  ("clip upper bound 1 + eps → 1 + eps_high"). A change that only touches numbers, params
  and arithmetic is printed whole at the nearest named place (a call argument, a numerator or
  denominator, a term of a sum, a statement).
- Each report is prefixed with the section where the changed expression was written, found
  by carrying each inlined expression's origin: a change to the score `r` is reported under
  "score:" even when found while comparing the loss. Identical reports are kept once.
- A param that exists only in the second spec gets its value appended the first time a
  report mentions it: "loss: clip upper bound 1 + eps → 1 + eps_high (eps_high = 0.28)".

Never imports torch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, replace

from . import ast as A
from .builtins import FUNCTIONS
from .check import Spec, load
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


@dataclass(frozen=True)
class Change:
    section: str
    kind: str            # added | removed | changed
    message: str         # the full human line
    before: str | None = None
    after: str | None = None


def diff_specs(a_ref, b_ref) -> list[Change]:
    """The semantic changes from spec `a_ref` to spec `b_ref` (paths, built-in names or text)."""
    a, b = load(a_ref), load(b_ref)
    return _Differ(_Side(a), _Side(b)).run()


def format_text(changes: list[Change]) -> str:
    return "\n".join(c.message for c in changes) if changes else "no semantic difference"


def format_json(changes: list[Change]) -> str:
    return json.dumps([asdict(c) for c in changes], indent=2, ensure_ascii=False)


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


# --------------------------------------------------------------------------- comparing
@dataclass
class _Ctx:
    """The nearest named place: a change confined to arithmetic is printed as `prefix a → b`."""

    prefix: str
    a: _N
    b: _N


@dataclass
class _Rec:
    section: str
    kind: str
    message: str
    before: str | None
    after: str | None
    mentions: tuple[str, ...]  # params of the second spec named by `after`


def _match(xs, ys, key, compat, *, force=False):
    """Pair equal items away, then pair the rest greedily by similarity where `compat` allows.
    Returns (changed pairs, unpaired xs, unpaired ys)."""
    la, lb = list(xs), list(ys)
    for x in list(la):
        for y in lb:
            if key(x) == key(y):
                la.remove(x)
                lb.remove(y)
                break
    cands = []
    for i, x in enumerate(la):
        for j, y in enumerate(lb):
            if force or compat(x, y):
                cands.append((-_similarity(_node(x), _node(y)), i, j))
    cands.sort()
    used_a, used_b, pairs = set(), set(), []
    for _, i, j in cands:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, la[i], lb[j]))
    pairs.sort(key=lambda p: p[0])
    return ([(x, y) for _, x, y in pairs], [x for i, x in enumerate(la) if i not in used_a],
            [y for j, y in enumerate(lb) if j not in used_b])


def _node(x) -> _N:
    if isinstance(x, _Item):
        return x.node
    return x[1] if isinstance(x, tuple) else x


def _pairable(x: _N, y: _N) -> bool:
    if x.head == y.head and x.head not in ("sum", "prod", "div", "pow"):
        return True
    if x.kind == y.kind == "call" and x.func in AGGREGATIONS and y.func in AGGREGATIONS:
        return True
    return _similarity(x, y) >= _PAIR_SIMILARITY


def _items(n: _N, kind: str) -> tuple[_Item, ...]:
    return n.items if n.kind == kind else (_Item(1, n, n.src, n.origin),)


def _multiset_rest(a: _N, b: _N, kind: str):
    ca = Counter((i.sign, i.node.key) for i in _items(a, kind))
    cb = Counter((i.sign, i.node.key) for i in _items(b, kind))
    la = [i for i in _items(a, kind) if (ca - cb)[(i.sign, i.node.key)] > 0]
    lb = [i for i in _items(b, kind) if (cb - ca)[(i.sign, i.node.key)] > 0]
    return la, lb


def _where(a: _N, b: _N) -> str | None:
    """The section where the smallest differing part of a and b was written."""
    if a.key == b.key:
        return None
    for kind in ("sum", "prod"):
        if a.kind == kind or b.kind == kind:
            la, lb = _multiset_rest(a, b, kind)
            if len(la) == len(_items(a, kind)) and len(lb) == len(_items(b, kind)):
                return b.origin  # nothing in common: the whole expression was replaced
            if len(la) == 1 and len(lb) == 1:
                return _where(la[0].node, lb[0].node) or lb[0].node.origin
            return (lb or la)[0].node.origin
    ka, kb = a.children(), b.children()
    if a.head == b.head and len(ka) == len(kb) and [n for n, _ in a.kwargs] == [n for n, _ in b.kwargs]:
        for x, y in zip(ka, kb):
            w = _where(x, y)
            if w:
                return w
    return b.origin


def _chain(n: _N) -> tuple[list[str], _N]:
    fns = []
    while n.kind == "call" and n.func in AGGREGATIONS and len(n.kids) == 1:
        fns.append(n.func)
        n = n.kids[0]
    return fns, n


def _chain_text(fns: list[str]) -> str:
    return "".join(f"{f}(" for f in fns) + "·" + ")" * len(fns)


class _Differ:
    def __init__(self, a: _Side, b: _Side):
        self.a, self.b = a, b
        self.recs: list[_Rec] = []

    # ------------------------------------------------------------------ output
    def emit(self, section, kind, text, before=None, after=None, after_src=None, *, message=None):
        mentions: tuple[str, ...] = ()
        if after_src is not None:
            names = [n.id for n in A.walk(after_src) if isinstance(n, A.Name)]
            mentions = tuple(dict.fromkeys(n for n in names if n in self.b.params))
        self.recs.append(_Rec(section, kind, message or f"{section}: {text}", before, after, mentions))

    def texts(self, a: _N, b: _N) -> tuple[str, str, A.Expr]:
        """How a and b print, and the expression printed for b (for the params it names)."""
        sa, sb = a.show(), b.show()
        if sa == sb:  # the difference is inside a local name: print what the names stand for
            inlined = self.b.inline(b.src)
            return a.show_inlined(), unparse(inlined), inlined
        return sa, sb, b.src

    def run(self) -> list[Change]:
        if self.a.library or self.b.library:
            self.defs(all_defs=True)
        else:
            self.data()
            self.defs()
            self.sample()
            self.filters()
            self.selects()
            self.loss()
            self.rollout_sections()
            self.train()
            self.pipeline()
            self.params()
        seen, ordered = set(), []
        for r in sorted(self.recs, key=lambda r: SECTION_ORDER.index(r.section) if r.section in SECTION_ORDER
                        else len(SECTION_ORDER)):
            if r.message not in seen:
                seen.add(r.message)
                ordered.append(r)
        new = {p: v for p, v in self.b.params.items() if p not in self.a.params}
        told: set[str] = set()
        out = []
        for r in ordered:
            msg = r.message
            fresh = [p for p in r.mentions if p in new and p not in told]
            if fresh:
                told.update(fresh)
                msg += " (" + ", ".join(f"{p} = {_value_text(new[p].value)}" for p in fresh) + ")"
            out.append(Change(r.section, r.kind, msg, r.before, r.after))
        return out

    # ------------------------------------------------------------------ expressions
    def d(self, a: _N, b: _N, ctx: _Ctx):
        if a.key == b.key:
            return
        if a.stmt and b.stmt:
            ctx = _Ctx(f"{b.stmt} = ", a, b)
        if a.simple and b.simple:
            return self.bubble(a, b, ctx)
        if (a.kind == "div") != (b.kind == "div"):  # x / d against x: a division added or removed
            div, other = (a, b) if a.kind == "div" else (b, a)
            num, den = div.kids
            if num.key == other.key or _pairable(num, other):
                t = unparse(div.src.right) if isinstance(div.src, A.BinOp) and div.src.op == "/" else den.show()
                if div is a:
                    self.emit(den.origin, "removed", f"division by {t} removed", t, None)
                    return self.d(num, b, ctx)
                self.emit(den.origin, "added", f"division by {t} added", None, t, div.src.right)
                return self.d(a, num, ctx)
        if a.kind == "sum" or b.kind == "sum":
            return self.d_sum(a, b, ctx)
        if a.kind == "prod" or b.kind == "prod":
            return self.d_prod(a, b, ctx)
        if a.kind == b.kind == "call":
            return self.d_call(a, b, ctx)
        if a.kind == b.kind and a.kind in ("div", "pow"):
            labels = ("numerator ", "denominator ") if a.kind == "div" else ("base ", "exponent ")
            for x, y, label in zip(a.kids, b.kids, labels):
                self.d(x, y, _Ctx(label, x, y))
            return
        if a.kind == b.kind and a.head == b.head and a.kind in ("cmp", "not", "index"):
            for x, y in zip(a.kids, b.kids):
                self.d(x, y, ctx)
            return
        if a.kind == b.kind and a.head == b.head and a.kind in ("bool", "list") and len(a.kids) == len(b.kids):
            if a.kind == "bool":
                pairs, _, _ = _match(a.kids, b.kids, lambda n: n.key, _pairable, force=True)
            else:
                pairs = list(zip(a.kids, b.kids))
            for x, y in pairs:
                self.d(x, y, ctx)
            return
        self.replace(a, b, ctx)

    def bubble(self, a: _N, b: _N, ctx: _Ctx):
        sa, sb, shown = self.texts(ctx.a, ctx.b)
        self.emit(_where(a, b) or b.origin, "changed", f"{ctx.prefix}{sa} → {sb}", sa, sb, shown)

    def replace(self, a: _N, b: _N, ctx: _Ctx):
        sa, sb, shown = self.texts(a, b)
        prefix = ctx.prefix if (ctx.a is a and ctx.b is b) else ""
        self.emit(_where(a, b) or b.origin, "changed", f"{prefix}{sa} → {sb}", sa, sb, shown)

    def d_sum(self, a: _N, b: _N, ctx: _Ctx):
        ia, ib = _items(a, "sum"), _items(b, "sum")
        single = len(ia) == 1 and len(ib) == 1
        pairs, la, lb = _match(ia, ib, lambda i: (i.sign, i.node.key),
                               lambda x, y: x.sign == y.sign and (single or _pairable(x.node, y.node)))
        pairs += self._pair_statements(la, lb, sums=True)
        flips = {x.node.key for x in la} & {y.node.key for y in lb}
        if not pairs and not flips and len(la) == len(ia) and len(lb) == len(ib):
            return self.replace(a, b, ctx)  # nothing in common: the whole expression changed
        for x in list(la):  # the same term with the other sign
            y = next((y for y in lb if y.node.key == x.node.key), None)
            if y is not None:
                la.remove(x)
                lb.remove(y)
                t = y.show()
                self.emit(y.origin, "changed", f"term {t} changes sign ({'+' if x.sign > 0 else '-'} → "
                          f"{'+' if y.sign > 0 else '-'})", t, t)
        for x in la:
            t = x.show()
            self.emit(x.origin, "removed", f"term {t} removed", t, None)
        for y in lb:
            t = y.show()
            self.emit(y.origin, "added", f"term {t} added", None, t, y.src)
        for x, y in pairs:
            self.d(x.node, y.node, self._item_ctx(x, y, ctx, not single, "term "))

    def d_prod(self, a: _N, b: _N, ctx: _Ctx):
        ia, ib = _items(a, "prod"), _items(b, "prod")
        pairs, la, lb = _match(ia, ib, lambda i: i.node.key, lambda x, y: _pairable(x.node, y.node))
        pairs += self._pair_statements(la, lb, sums=False)
        if not pairs and len(la) == len(ia) and len(lb) == len(ib):
            return self.replace(a, b, ctx)
        if any(i.node.simple for i in la + lb):
            self.bubble(a, b, ctx)
        for x in la:
            if not x.node.simple:
                t = x.show()
                self.emit(x.origin, "removed", f"factor {t} removed", t, None)
        for y in lb:
            if not y.node.simple:
                t = y.show()
                self.emit(y.origin, "added", f"factor {t} added", None, t, y.src)
        for x, y in pairs:
            self.d(x.node, y.node, self._item_ctx(x, y, ctx, False, ""))

    @staticmethod
    def _pair_statements(la: list, lb: list, *, sums: bool) -> list:
        """One local on each side left over (`A` against `A`): the same statement, changed."""
        if len(la) == 1 and len(lb) == 1 and la[0].node.stmt and lb[0].node.stmt \
                and (not sums or la[0].sign == lb[0].sign):
            x, y = la.pop(), lb.pop()
            return [(x, y)]
        return []

    @staticmethod
    def _item_ctx(x: _Item, y: _Item, ctx: _Ctx, label: bool, prefix: str) -> _Ctx:
        if x.via is not None and y.via is not None:  # spliced in from an inlined statement
            return _Ctx(f"{y.via.stmt} = ", x.via, y.via)
        if label and not (x.node.simple and y.node.simple):
            return _Ctx(prefix, x.node, y.node)
        return ctx

    def d_call(self, a: _N, b: _N, ctx: _Ctx):
        if a.func in AGGREGATIONS and b.func in AGGREGATIONS:
            ca, inner_a = _chain(a)
            cb, inner_b = _chain(b)
            if ca != cb:
                ta, tb = _chain_text(ca), _chain_text(cb)
                self.emit(b.origin, "changed", f"aggregation {ta} → {tb}", ta, tb)
                names = FUNCTIONS[cb[-1]].args
                return self.d(inner_a, inner_b, _Ctx(f"{cb[-1]} {names[0]} ", inner_a, inner_b))
        if a.func != b.func:
            return self.replace(a, b, ctx)
        fn = b.func
        names = self.b.arg_names(fn)
        if fn in UNORDERED and len(a.kids) == len(b.kids):
            pairs, _, _ = _match(a.kids, b.kids, lambda n: n.key, _pairable, force=True)
            for x, y in pairs:
                self.d(x, y, _Ctx(f"{fn} argument ", x, y))
        else:
            for i in range(max(len(a.kids), len(b.kids))):
                label = names[i] if i < len(names) else f"argument {i + 1}"
                if i < len(a.kids) and i < len(b.kids):
                    x, y = a.kids[i], b.kids[i]
                    self.d(x, y, _Ctx(f"{fn} {label} ", x, y))
                elif i < len(a.kids):
                    t = a.kids[i].show()
                    self.emit(a.kids[i].origin, "removed", f"{fn} {label} {t} removed", t, None)
                else:
                    t = b.kids[i].show()
                    self.emit(b.kids[i].origin, "added", f"{fn} {label} {t} added", None, t, b.kids[i].src)
        ka, kb = dict(a.kwargs), dict(b.kwargs)
        for k in sorted(set(ka) | set(kb)):
            if k in ka and k in kb:
                self.d(ka[k], kb[k], _Ctx(f"{fn} {k} ", ka[k], kb[k]))
            elif k in ka:
                t = ka[k].show()
                self.emit(a.origin, "removed", f"{fn} {k} = {t} removed", t, None)
            else:
                t = kb[k].show()
                self.emit(b.origin, "added", f"{fn} {k} = {t} added", None, t, kb[k].src)

    # ------------------------------------------------------------------ sections
    def data(self):
        def kind(side: _Side):
            d = side.spec.data
            if d is None and side.sample is not None:
                return "prompts"
            return d
        da, db = kind(self.a), kind(self.b)
        if da != db:
            ta, tb = da or "none", db or "none"
            self.emit("data", "changed", f"{ta} → {tb}", ta, tb)

    def defs(self, all_defs=False):
        if all_defs:
            names = sorted(set(self.a.defs) | set(self.b.defs))
        else:
            names = sorted(self.a.used_defs & self.b.used_defs)
        for name in names:
            da, db = self.a.defs.get(name), self.b.defs.get(name)
            if da is None or db is None:
                d = da or db
                text = f"{d.name}({', '.join(d.params)}) = {unparse(d.body)}"
                self.emit("def", "removed" if db is None else "added",
                          f"{text} {'removed' if db is None else 'added'}",
                          text if db is None else None, text if da is None else None)
                continue
            if da.params != db.params or self.a.canon_def(da).key != self.b.canon_def(db).key:
                ta = f"{da.name}({', '.join(da.params)}) = {unparse(da.body)}"
                tb = f"{db.name}({', '.join(db.params)}) = {unparse(db.body)}"
                self.emit("def", "changed", f"{ta} → {tb}", ta, tb)

    def sample(self):
        sa, sb = self.a.sample, self.b.sample
        if sa and sb:
            self.d(sa[1], sb[1], _Ctx("", sa[1], sb[1]))
        elif sa or sb:
            st = (sa or sb)[0]
            t = unparse_stmt(st)
            if sb is None:
                self.emit("sample", "removed", "", t, None, message=f"sample removed: {t}")
            else:
                self.emit("sample", "added", "", None, t, st.value, message=f"sample added: {t}")

    def filters(self):
        pairs, la, lb = _match(self.a.filters, self.b.filters, lambda f: (f[0].scope, f[1].key),
                               lambda x, y: x[0].scope == y[0].scope and _pairable(x[1], y[1]))
        for st, _ in la:
            t = unparse_stmt(st)
            self.emit("filter", "removed", "", t, None, message=f"filter removed: {t}")
        for st, _ in lb:
            t = unparse_stmt(st)
            self.emit("filter", "added", "", None, t, st.cond, message=f"filter added: {t}")
        for (sa, na), (sb, nb) in pairs:
            self.d(na, nb, _Ctx(f"keep {sb.scope} where ", na, nb))

    def selects(self):
        ra, rb = self.a.selects, self.b.selects
        for role in ra:
            if role not in rb:
                t = unparse_stmt(ra[role][0])
                self.emit("select", "removed", "", t, None, message=f"select removed: {t}")
        for role in rb:
            if role not in ra:
                t = unparse_stmt(rb[role][0])
                self.emit("select", "added", "", None, t, rb[role][0].value, message=f"select added: {t}")
        for role in rb:
            if role in ra:
                na, nb = ra[role][1], rb[role][1]
                self.d(na, nb, _Ctx(f"{role} = ", na, nb))
        common_a = [r for r in ra if r in rb]
        common_b = [r for r in rb if r in ra]
        if common_a != common_b:
            ta, tb = ", ".join(common_a), ", ".join(common_b)
            self.emit("select", "changed", f"order {ta} → {tb}", ta, tb)

    def loss(self):
        ta, tb = list(self.a.terms), list(self.b.terms)
        pairs = []
        for t in list(ta):
            if t[0].name is not None:
                u = next((u for u in tb if u[0].name == t[0].name), None)
                if u is not None:
                    pairs.append((t, u))
                    ta.remove(t)
                    tb.remove(u)
        n = min(len(ta), len(tb))
        pairs += list(zip(ta[:n], tb[:n]))
        for (st, _), kind in [(t, "removed") for t in ta[n:]] + [(t, "added") for t in tb[n:]]:
            v = unparse(st.value)
            text = f"term {st.name} {kind}: {v}" if st.name else f"term {v} {kind}"
            self.emit("loss", kind, text, v if kind == "removed" else None, v if kind == "added" else None,
                      st.value if kind == "added" else None)
        for (sa, na), (sb, nb) in pairs:
            prefix = f"term {sb.name} " if sb.name else "minimize "
            self.d(na, nb, _Ctx(prefix, na, nb))

    def rollout_sections(self):
        """Every changed score and advantage section is reported, even when the loss changed
        too and the comparison above stopped before reaching it (ppo → grpo)."""
        for section in ("score", "advantage"):
            if any(r.section == section for r in self.recs):
                continue
            ra, rb = self.a.section_roots(section), self.b.section_roots(section)
            ka, kb = Counter(n.key for n in ra.values()), Counter(n.key for n in rb.values())
            if ka == kb:
                continue
            gone = [n for n, x in ra.items() if x.key in ka - kb]
            new = [n for n, x in rb.items() if x.key in kb - ka]
            ta, tb = self.a.statements(section, gone), self.b.statements(section, new)
            self.emit(section, "changed", f"{ta} → {tb}", ta, tb)

    def train(self):
        ta, tb = self.a.spec.train, self.b.spec.train
        for k in ta:
            if ta[k] != tb.get(k):
                va, vb = _value_text(ta[k]), _value_text(tb.get(k))
                self.emit("train", "changed", f"{k} {va} → {vb}", va, vb)
        sa, sb = self.a.spec.schedules, self.b.spec.schedules
        for k in sorted(set(sa) | set(sb)):
            if k in sa and k in sb:
                if sa[k] != sb[k]:
                    va, vb = _value_text(sa[k]), _value_text(sb[k])
                    self.emit("train", "changed", f"{k} schedule {va} → {vb}", va, vb)
            elif k in sa:
                v = _value_text(sa[k])
                self.emit("train", "removed", f"{k} schedule {v} removed", v, None)
            else:
                v = _value_text(sb[k])
                self.emit("train", "added", f"{k} schedule {v} added", None, v)

    def pipeline(self):
        def stages(side: _Side):
            out = []
            index = {s.name: i for i, s in enumerate(side.spec.stages)}
            sec = side.spec.resolved.sections.get("pipeline")
            stmts = {st.name: st for st in (sec.body if sec else ())}
            for s in side.spec.stages:
                links = tuple(sorted((k, index[v]) for k, v in s.links.items()))
                out.append(((s.spec, links), unparse(stmts[s.name].value)))
            return out
        pa, pb = stages(self.a), stages(self.b)
        for i in range(max(len(pa), len(pb))):
            if i < len(pa) and i < len(pb):
                if pa[i][0] != pb[i][0]:
                    self.emit("pipeline", "changed", f"stage {i + 1} {pa[i][1]} → {pb[i][1]}", pa[i][1], pb[i][1])
            elif i < len(pa):
                self.emit("pipeline", "removed", f"stage {i + 1} {pa[i][1]} removed", pa[i][1], None)
            else:
                self.emit("pipeline", "added", f"stage {i + 1} {pb[i][1]} added", None, pb[i][1])

    def params(self):
        for name, pa in self.a.params.items():
            pb = self.b.params.get(name)
            if pb is None or name not in self.a.used_params or name not in self.b.used_params:
                continue
            if pa.value != pb.value:
                va, vb = _value_text(pa.value), _value_text(pb.value)
                self.emit("params", "changed", f"{name} {va} → {vb}", va, vb)
