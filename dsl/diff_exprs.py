"""The top-down comparison of two canonical expressions for `alignspec diff`: matching terms
and factors, and the report at the deepest place that differs, in words that name its role.

`_ExprDiffer` is a mixin of dsl/diff.py's `_Differ` (which holds the two sides and the reports).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from . import ast as A
from .builtins import FUNCTIONS
from .unparse import unparse
from .diff_canon import AGGREGATIONS, UNORDERED, _Item, _N, _PAIR_SIMILARITY, _similarity


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


class _ExprDiffer:
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
