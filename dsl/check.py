"""The checker: names, arities, levels, phases and shapes; it builds the spec's graph.

`check(resolved, overrides)` turns a resolved spec into a `Spec` whose `.graph` is a networkx
DiGraph. Every expression occurrence is one node carrying `op`, `level`, `phase`, `grad` and
`span`; a statement's node also carries its `name` and `section`. Node attribute `args` keeps
the ordered argument ids (edges alone lose order and repeats). Every problem is a SpecError
pinned to the spec text.

The checker is in three parts: this module (the driver, params and statements), the
expressions (dsl/check_exprs.py) and the sections after the statements
(dsl/check_sections.py); the checked `Spec` and the typing of parameter values are in
dsl/spec.py.
"""

from __future__ import annotations

import itertools

import networkx as nx

from . import ast as A
from .builtins import GENERATED_NAMES, FUNCTIONS, PSEUDO, QUANTITIES, ROLES
from .errors import Span, SpecError
from .load import Resolved, did_you_mean, error, read_spec, resolve
from .check_exprs import MAX_DEF_DEPTH, _Exprs
from .check_sections import MAX_GROUP, _Sections
from .spec import PARAM_TYPES, Param, Spec, Stage, _literal, _type_of, coerce

__all__ = ["MAX_DEF_DEPTH", "MAX_GROUP", "PARAM_TYPES", "Param", "Spec", "Stage", "check", "check_collecting",
           "coerce", "load", "problems"]


def load(ref, **overrides) -> Spec:
    """Parse and check a spec given as a path, a built-in name or text."""
    return check(resolve(read_spec(ref)), overrides)


def check(res: Resolved, overrides: dict | None = None) -> Spec:
    return _Checker(res, overrides or {}).run()


def problems(ref, **overrides) -> list[SpecError]:
    """Every problem that checking a spec (a path, a built-in name or text) finds; [] when it is fine."""
    try:
        res = resolve(read_spec(ref))
    except SpecError as e:
        return [e]
    return check_collecting(res, overrides)[1]


def check_collecting(res: Resolved, overrides: dict | None = None) -> tuple[Spec | None, list[SpecError]]:
    """`check`, going on past a problem: (the Spec or None, the problems found).

    `check` stops at the first problem. This goes on past a problem in one statement of the
    score, advantage or loss sections, in the filter lines or in the loss terms, and reports the
    first problem of each of those that fails on its own (a statement that only reads a broken
    one repeats its problem, which is reported once). Problems in the file's structure (params,
    sections, data, sampling, train) still end the check. The first problem is always the one
    `check` raises, so `alignspec check` prints the same either way."""
    checker = _Checker(res, overrides or {}, collect=True)
    try:
        return checker.run(), []
    except SpecError as e:
        return None, checker.errors or [e]


# ---------------------------------------------------------------------------------------------


class _Checker(_Exprs, _Sections):
    def __init__(self, res: Resolved, overrides: dict, collect: bool = False):
        self.res = res
        self.overrides = overrides
        self.collect = collect               # go on past a failing statement (see `problems`)
        self.errors: list[SpecError] = []
        self.g = nx.DiGraph()
        self.ids = itertools.count()
        self.params: dict[str, Param] = {}
        self.stmts: dict[str, tuple[str, A.Stmt]] = {}   # name → (section, statement)
        self.built: dict[str, str] = {}                   # statement name → node id
        self.building: list[str] = []
        self.inlined: dict[tuple, str] = {}               # (def, argument structures) → inlined body node
        self.skeys: dict[str, tuple] = {}                 # node id → structural key (see _skey)
        self.param_nodes: dict[str, str] = {}
        self.input_nodes: dict[str, str] = {}
        self.group_size = 1
        self.roles: dict[str, tuple[int, int]] = {}
        self.section = ""

    # ------------------------------------------------------------------ driver
    def run(self) -> Spec:
        res = self.res
        f = res.file
        for d in res.defs.values():
            self._check_def(d)
        if f.kind == "library":
            for item in f.items:
                if isinstance(item, (A.Section, A.Data)):
                    raise error("a library holds only `def`s (and imports); sections belong to algorithms",
                                item.span, "section", "move this to an algorithm that imports the library")
            return Spec(f.name, f.path, res, {}, None, 1, {}, self.g)
        self._params()
        self._collect()
        data = self._data()
        self._shape(data)
        stages = self._pipeline()
        for name, (section, stmt) in self.stmts.items():
            if section in ("score", "advantage", "loss"):
                self._unit(self._stmt_node, name)
        self._unit(self._filters)
        self._unit(self._terms, stages)
        if self.errors:
            raise self.errors[0]
        train, schedules = self._train()
        self.g.graph.update(name=f.name, group_size=self.group_size, roles=dict(self.roles), data=data,
                            params={p.name: p.value for p in self.params.values()})
        return Spec(f.name, f.path, res, self.params, data, self.group_size, self.roles, self.g,
                    train, schedules, stages)

    def _unit(self, fn, *args):
        """Run one independent part of the check; when collecting, record its problem and go on."""
        if not self.collect:
            return fn(*args)
        try:
            return fn(*args)
        except SpecError as e:
            self.building.clear()
            self.section = ""
            key = (e.span.file, e.span.line, e.span.col, e.message)
            if all((x.span.file, x.span.line, x.span.col, x.message) != key for x in self.errors):
                self.errors.append(e)

    # ------------------------------------------------------------------ params
    def _params(self):
        for f in self.res.chain:
            seen: dict[str, Span] = {}
            for sec in f.sections("params"):
                for st in sec.body:
                    if st.name in seen:
                        raise error(f"parameter {st.name!r} is defined twice (first at line {seen[st.name].line})",
                                    st.span, "duplicate")
                    seen[st.name] = st.span
        for name, st in self.res.params.items():
            self._reserved(name, st.name_span)
            try:
                value = _literal(st.value)
            except ValueError:
                raise error(f"the default of parameter {name!r} must be a literal (a number, true/false, or a string)",
                            st.value.span, "param", "parameters are constants; compute derived values in a section") from None
            if st.type is not None and st.type not in PARAM_TYPES:
                raise error(f"unknown parameter type {st.type!r}", st.span, "type",
                            did_you_mean(st.type, PARAM_TYPES) or "types: int, float, bool, str")
            type_ = st.type or _type_of(value)
            if type_ == "list":
                raise error(f"parameter {name!r}: lists are not parameters", st.value.span, "type",
                            "per-iteration values go in the train section: `beta = [0.1, 5.0]`")
            value = coerce(name, type_, value, st.value.span, where="default")
            self.params[name] = Param(name, type_, value, value, st.doc, st.span)
        for key, value in self.overrides.items():
            if key not in self.params:
                valid = ", ".join(sorted(self.params)) or "(none)"
                hint = did_you_mean(key, self.params) or f"valid parameters: {valid}"
                raise SpecError(f"unknown parameter {key!r} for {self.res.name}; valid parameters: {valid}",
                                self.res.file.span, kind="unknown-param", hint=hint)
            p = self.params[key]
            p.value = coerce(key, p.type, value, p.span, where="override")

    def _reserved(self, name: str, span: Span):
        if name in QUANTITIES or name in PSEUDO:
            raise error(f"{name!r} is provided by the runtime and cannot be redefined", span, "reserved",
                        "choose another name")
        if name in FUNCTIONS:
            raise error(f"{name!r} is a built-in function and cannot be redefined", span, "reserved",
                        "choose another name")
        if name in ROLES:
            raise error(f"{name!r} names a role within a group and cannot be redefined", span, "reserved")
        if name in GENERATED_NAMES or name.startswith("_"):
            taken = ", ".join(sorted(GENERATED_NAMES))
            raise error(f"{name!r} is taken by the generated code", span, "reserved",
                        f"choose another name; taken: {taken}, and every name that starts with '_'")
        if name in self.res.defs:
            raise error(f"{name!r} is a function (def at {self.res.defs[name].span}) and cannot be redefined",
                        span, "reserved", "choose another name")

    # ------------------------------------------------------------------ statements
    def _collect(self):
        first: dict[str, Span] = {}
        for kind, sec in self.res.sections.items():
            if kind in ("train", "pipeline"):
                continue
            for st in sec.body:
                if isinstance(st, A.Assign):
                    if st.type is not None or st.doc is not None:
                        raise error("types and doc strings belong to params", st.span, "syntax",
                                    "move this line to the params section, or drop the type/doc")
                    if not (kind == "select" and st.name in ROLES):
                        self._reserved(st.name, st.name_span)
                    if st.name in self.params:
                        raise error(f"{st.name!r} is already a parameter (line {self.params[st.name].span.line})",
                                    st.name_span, "duplicate", "choose another name")
                    if st.name in first:
                        raise error(f"{st.name!r} is defined twice (first at line {first[st.name].line})",
                                    st.name_span, "duplicate", "give the second one another name")
                    first[st.name] = st.name_span
                    self.stmts[st.name] = (kind, st)
                elif isinstance(st, A.Keep):
                    if kind != "filter":
                        raise error("`keep ... where` belongs in the filter section", st.span, "section")
                elif isinstance(st, A.Minimize):
                    if kind != "loss":
                        raise error("`minimize` belongs in the loss section", st.span, "section")
            if kind == "filter":
                for st in sec.body:
                    if not isinstance(st, A.Keep):
                        raise error("the filter section holds `keep groups where ...` lines", st.span, "section")

    def _stmt_node(self, name: str) -> str:
        if name in self.built:
            return self.built[name]
        section, st = self.stmts[name]
        if name in self.building:
            cycle = self.building[self.building.index(name):] + [name]
            raise error(f"{name!r} depends on itself: {' → '.join(cycle)}", st.name_span, "cycle",
                        "definitions must not refer to each other in a loop")
        if section in ("sample", "select"):
            raise error(f"{name!r} is a {section} result, not a value", st.name_span, "section")
        self.building.append(name)
        saved = self.section
        self.section = section
        node = self._expr(st.value, {})
        self.section = saved
        self.building.pop()
        attrs = self.g.nodes[node]
        if attrs.get("name"):  # `a = b`: alias; give the alias its own identity node
            node = self._node("alias", [node], st.value.span, level=attrs["level"], phase=attrs["phase"],
                              grad=attrs["grad"])
        self.g.nodes[node].update(name=name, section=section, stmt_span=st.span)
        if section == "advantage" and self.g.nodes[node]["grad"]:
            raise error(f"{name!r} reads a gradient-carrying quantity, but the advantage section runs once per "
                        "rollout without gradients", st.span, "phase",
                        "move it to the loss section, or wrap what it reads in stopgrad(...)")
        if section == "score" and self.g.nodes[node]["phase"] not in ("const", "score"):
            raise error(f"{name!r} reads model outputs, but scores are computed before any model forward",
                        st.span, "phase", "move it to the advantage or loss section")
        self.built[name] = node
        return node
