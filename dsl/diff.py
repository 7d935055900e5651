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

The differ is in three parts: this module (the entry points and the sections compared),
the canonical form of each side (dsl/diff_canon.py) and the top-down comparison of two
canonical expressions (dsl/diff_exprs.py).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass

from . import ast as A
from .check import load
from .unparse import unparse, unparse_stmt
from .diff_canon import SECTION_ORDER, _N, _Side, _value_text
from .diff_exprs import _Ctx, _ExprDiffer, _Rec, _match, _pairable


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


class _Differ(_ExprDiffer):
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
