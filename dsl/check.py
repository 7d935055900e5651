"""The checker: names, arities, levels, phases and shapes; it builds the spec's graph.

`check(resolved, overrides)` turns a resolved spec into a `Spec` whose `.graph` is a networkx
DiGraph. Every expression occurrence is one node carrying `op`, `level`, `phase`, `grad` and
`span`; a statement's node also carries its `name` and `section`. Node attribute `args` keeps
the ordered argument ids (edges alone lose order and repeats). Every problem is a SpecError
pinned to the spec text.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from . import ast as A
from .builtins import (DATA_KINDS, EXTERNAL_REQUIRES, GENERATED_NAMES, MAX_INT, FUNCTIONS, PHASES, PSEUDO, QUANTITIES,
                       RANK, REFERENCE_MODES, ROLES, TRAIN_KEYS, UNPAIRED_ONLY, Fn)
from .errors import Span, SpecError
from .load import Resolved, did_you_mean, error, read_spec, resolve
from .unparse import unparse

PARAM_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


@dataclass
class Param:
    name: str
    type: str
    default: object
    value: object
    doc: str | None
    span: Span


@dataclass
class Stage:
    name: str
    spec: str
    links: dict[str, str]
    span: Span


@dataclass
class Spec:
    """A checked algorithm: its parameters, shape, graph and the text it came from."""

    name: str
    path: str
    resolved: Resolved
    params: dict[str, Param]
    data: str | None
    group_size: int
    roles: dict[str, tuple[int, int]]        # role → (first row within the group, rows)
    graph: nx.DiGraph
    train: dict[str, object] = field(default_factory=dict)
    schedules: dict[str, list] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)

    @property
    def is_pipeline(self) -> bool:
        return bool(self.stages)

    @property
    def source(self) -> str:
        return self.resolved.file.source

    def param_values(self) -> dict[str, object]:
        return {p.name: p.value for p in self.params.values()}

    def __repr__(self) -> str:
        return f"Spec({self.name!r}, {self.graph.number_of_nodes()} nodes)"


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
def _literal(expr: A.Expr):
    """The Python value of a literal expression, or raise ValueError."""
    if isinstance(expr, A.Number):
        return expr.value
    if isinstance(expr, A.Neg) and isinstance(expr.operand, A.Number):
        return -expr.operand.value
    if isinstance(expr, (A.Str, A.Bool)):
        return expr.value
    if isinstance(expr, A.ListExpr):
        return [_literal(i) for i in expr.items]
    raise ValueError


def _type_of(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "list"


def coerce(name: str, type_: str, value, span: Span, *, where: str):
    """Convert an override or default to the parameter's type, or raise a SpecError."""
    if isinstance(value, str) and type_ != "str":
        try:
            value = {"true": True, "false": False}[value.lower()] if type_ == "bool" else float(value)
        except (KeyError, ValueError):
            raise error(f"{where}: parameter {name!r} is a {type_}, got the string {value!r}", span, "type",
                        f"give a {type_}, e.g. {name}=0.1" if type_ != "bool" else "give true or false") from None
    if type_ == "bool":
        if not isinstance(value, bool):
            raise error(f"{where}: parameter {name!r} is a bool, got {value!r}", span, "type")
        return value
    if type_ in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: parameter {name!r} is a number ({type_}), got {value!r}", span, "type")
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{where}: parameter {name!r} is not a finite number (got {value!r})", span, "type",
                        "give a finite number")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise error(f"{where}: parameter {name!r} is too large ({len(str(abs(value)))} digits; "
                        f"the largest is {MAX_INT})", span, "type", "write large numbers with an exponent, e.g. 1e30")
        if type_ == "int":
            if float(value) != int(value):
                raise error(f"{where}: parameter {name!r} is an int, got {value!r}", span, "type")
            if abs(value) > MAX_INT:
                raise error(f"{where}: parameter {name!r} is too large for an int (the largest is {MAX_INT})",
                            span, "type")
            return int(value)
        return float(value)
    if type_ == "str" and not isinstance(value, str):
        raise error(f"{where}: parameter {name!r} is a string, got {value!r}", span, "type")
    return value


MAX_DEF_DEPTH = 64  # defs inlined inside defs
MAX_GROUP = 4096    # responses sampled per prompt


class _Checker:
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

    # ------------------------------------------------------------------ expressions
    def _node(self, op, args, span, **attrs) -> str:
        nid = f"n{next(self.ids)}"
        self.g.add_node(nid, op=op, args=tuple(args), span=span, **attrs)
        for a in args:
            self.g.add_edge(a, nid)
        for a in attrs.get("kwargs", {}).values():
            self.g.add_edge(a, nid)
        return nid

    def _lvl(self, nid):
        return self.g.nodes[nid]["level"]

    def _combine(self, args: list[str], exprs: list[A.Expr], span: Span) -> str:
        """The level of an elementwise combination, or a level-mismatch error."""
        for a, ex in zip(args, exprs):
            if self.g.nodes[a]["op"] == "str":
                raise error(f"the string {unparse(ex)} cannot be used in arithmetic", ex.span, "type",
                            "strings are only option values (e.g. of a sampler) and parameter values")
        levels = [self._lvl(a) for a in args]
        if None in levels:
            bad = exprs[levels.index(None)]
            raise error(f"`{unparse(bad)}` can only be an argument of a sampler or scorer", bad.span, "level")
        present = {l for l in levels if l != "batch"}
        if "group" in present and "action" in present:
            ia, ig = levels.index("action"), levels.index("group")
            raise error(f"level mismatch: `{unparse(exprs[ia])}` is per token (action-level) but "
                        f"`{unparse(exprs[ig])}` is per group; they cannot be combined directly", span, "level",
                        "reduce the token-level value first (sum_tokens, mean_tokens), or combine the group "
                        "value with a response-level one (e.g. r - group_mean(r))")
        return max(levels, key=RANK.__getitem__) if levels else "batch"

    def _info(self, args):
        nodes = [self.g.nodes[a] for a in args]
        phase = max((n["phase"] for n in nodes), key=PHASES.index, default="const")
        grad = any(n["grad"] for n in nodes)
        return phase, grad

    def _expr(self, e: A.Expr, env: dict[str, str]) -> str:
        if isinstance(e, A.Number):
            return self._node("const", [], e.span, value=e.value, level="batch", phase="const", grad=False)
        if isinstance(e, A.Bool):
            return self._node("const", [], e.span, value=e.value, level="batch", phase="const", grad=False)
        if isinstance(e, A.Str):
            return self._node("str", [], e.span, value=e.value, level="batch", phase="const", grad=False)
        if isinstance(e, A.Name):
            return self._name(e, env)
        if isinstance(e, (A.BinOp, A.Compare, A.BoolOp)):
            args = [self._expr(e.left, env), self._expr(e.right, env)]
            level = self._combine(args, [e.left, e.right], e.span)
            phase, grad = self._info(args)
            op = e.op
            if isinstance(e, A.Compare) or isinstance(e, A.BoolOp):
                grad = False
            return self._node(op, args, e.span, level=level, phase=phase, grad=grad)
        if isinstance(e, (A.Neg, A.Not)):
            a = self._expr(e.operand, env)
            level = self._combine([a], [e.operand], e.span)
            phase, grad = self._info([a])
            return self._node("neg" if isinstance(e, A.Neg) else "not", [a], e.span, level=level, phase=phase,
                              grad=grad and isinstance(e, A.Neg))
        if isinstance(e, A.Index):
            return self._index(e, env)
        if isinstance(e, A.ListExpr):
            raise error("a list is only allowed as a per-iteration schedule in the train section", e.span, "syntax")
        if isinstance(e, A.Call):
            return self._call(e, env)
        raise error("unsupported expression", e.span, "syntax")  # pragma: no cover

    def _name(self, e: A.Name, env) -> str:
        n = e.id
        if n in env:
            return env[n]
        if n in self.params:
            if n not in self.param_nodes:
                p = self.params[n]
                self.param_nodes[n] = self._node("param", [], p.span, value=p.value, name_ref=n, level="batch",
                                                 phase="const", grad=False)
            return self.param_nodes[n]
        if n in QUANTITIES:
            q = QUANTITIES[n]
            if n in UNPAIRED_ONLY and (self.res.data is None or self.res.data.kind != "unpaired"):
                raise error(f"{n!r} exists only for unpaired labelled data (`data unpaired`)", e.span, "unknown-name")
            if n == "logp_sampler" and not self._generates():
                raise error("'logp_sampler' is recorded by generate(...) and rollout(...); this spec samples "
                            "with neither", e.span,
                            "unknown-name", "use logp_old, or add: sample\n  responses = generate(prompt, n = ...)")
            if n not in self.input_nodes:
                self.input_nodes[n] = self._node("input", [], e.span, quantity=n, level=q.level, phase=q.phase,
                                                 grad=q.grad, requires=q.requires)
            return self.input_nodes[n]
        if n in PSEUDO:
            return self._node("pseudo", [], e.span, value=n, level=None, phase="score", grad=False)
        if n in self.stmts:
            sec, st = self.stmts[n]
            if sec in ("sample", "select"):
                raise error(f"{n!r} is the {sec} result; use the scores and quantities of its responses instead",
                            e.span, "section")
            return self._stmt_node(n)
        if n in ROLES:
            raise error(f"{n!r} is a role: use it as an index, like h[{n}]", e.span, "unknown-name")
        if n in FUNCTIONS or n in self.res.defs:
            raise error(f"{n!r} is a function; call it with arguments", e.span, "unknown-name")
        visible = set(self.params) | set(self.stmts) | set(QUANTITIES) | set(env)
        raise error(f"unknown name {n!r}", e.span, "unknown-name",
                    did_you_mean(n, visible) or "define it in a section, or add it to params")

    def _index(self, e: A.Index, env) -> str:
        a = self._expr(e.value, env)
        lvl = self._lvl(a)
        if lvl != "response":
            raise error(f"`{unparse(e.value)}` is {lvl}-level; [{e.role}] picks one response of each group, so it "
                        "needs a response-level value", e.span, "level",
                        "apply [role] to a per-response value, e.g. sum_tokens(...) first")
        if e.role not in self.roles:
            if e.role in ROLES:
                raise error(f"`{unparse(e)}` needs pair-shaped groups (chosen, rejected), but this spec's groups "
                            f"are {self.group_size} sampled response(s) with no roles", e.span, "level",
                            "declare `data pairs`, build pairs with concat(...), or name roles in a select section")
            raise error(f"unknown role {e.role!r}", e.span, "unknown-name",
                        did_you_mean(e.role, self.roles) or f"roles here: {', '.join(self.roles) or 'none'}")
        first, rows = self.roles[e.role]
        if rows != 1:
            raise error(f"role {e.role!r} holds {rows} rows per group; [{e.role}] needs exactly one", e.span, "level",
                        "use group reductions (group_logsumexp, group_mean) over the whole group instead")
        phase, grad = self._info([a])
        return self._node("index", [a], e.span, role=e.role, offset=first, level="group", phase=phase, grad=grad)

    def _call(self, e: A.Call, env) -> str:
        name = e.func
        if name in self.res.defs and name not in FUNCTIONS:
            return self._inline(e, env)
        fn = FUNCTIONS.get(name)
        if fn is None:
            hint = did_you_mean(name, set(FUNCTIONS) | set(self.res.defs))
            if not hint and self.res.file.imports == [] and name in ("k1", "k2", "k3", "overlong_penalty"):
                hint = "add `import common` to use the functions of the common library"
            raise error(f"unknown function {name!r}", e.span, "unknown-function", hint)
        if fn.kind in ("sampler", "selector", "stage"):
            home = {"sampler": "sample", "selector": "select", "stage": "pipeline"}[fn.kind]
            raise error(f"{name} is a {fn.kind}; it belongs in the {home} section", e.span, "section")
        self._arity(fn, e)
        if fn.kind == "external":
            arg = e.args[0]
            if not (isinstance(arg, A.Name) and arg.id == "response"):
                raise error(f"{name}(...) scores each response: write {name}(response)", arg.span, "arity")
            if name == "env_reward" and not self._samples_episodes():
                raise error("env_reward(response) is the environment's reward of an episode: it needs "
                            "rollout(prompt, env = env, ...) in the sample section", e.span, "unknown-name",
                            "add: sample\n  responses = rollout(prompt, env = env, n = n)")
            if name == "embedding":
                raise error("embedding(response) is a vector: it can only be an argument of coreset/opt_select",
                            e.span, "level")
            return self._node("external", [], e.span, fn=name, level="response", phase="score", grad=False,
                              requires=(EXTERNAL_REQUIRES[name],))
        args = [self._expr(a, env) for a in e.args]
        phase, grad = self._info(args)
        if fn.kind == "elementwise":
            level = self._combine(args, list(e.args), e.span)
            if name == "stopgrad":
                grad = False
            if name == "where":
                if self.g.nodes[args[0]]["grad"]:
                    raise error("the condition of where(...) cannot carry gradients", e.args[0].span, "phase")
            return self._node(name, args, e.span, level=level, phase=phase, grad=grad)
        first = self._lvl(args[0])
        if first not in fn.takes:
            takes = " or ".join(fn.takes)
            hint = {"action": "it is per token: reduce it with sum_tokens or mean_tokens first",
                    "batch": "it is already a single number",
                    "group": "it is per group"}.get(first)
            raise error(f"{name} takes a {takes}-level value, but `{unparse(e.args[0])}` is {first}-level", e.args[0].span,
                        "level", hint)
        if fn.kind == "group":
            if self.group_size < max(2, fn.min_group):
                raise error(f"{name} reduces over the responses of a group, but this spec's groups hold "
                            f"{self.group_size} response", e.span, "level",
                            "sample several responses per prompt (generate(prompt, n = ...)) or drop the group statistic")
        if fn.rollout_only and grad:
            raise error(f"{name}(...) of a gradient-carrying value is not supported: it is a rollout-time statistic",
                        e.span, "phase", "compute it in the advantage section from no-grad quantities")
        for extra, ex in zip(args[1:], e.args[1:]):
            lvl = self._lvl(extra)
            if name == "gae" and ex is e.args[1] and lvl != "action":
                raise error("gae(rewards, values, ...) needs per-token values", ex.span, "level")
            if name == "gae" and ex not in e.args[:2] and lvl != "batch":
                raise error(f"the {fn.args[e.args.index(ex)]} of gae must be a number or parameter", ex.span, "level")
        level = fn.gives or first
        if fn.kind == "order":
            level = self._order_level(name, args, e, phase, level)
        return self._node(name, args, e.span, level=level, phase=phase, grad=grad, linear=fn.linear)

    def _order_level(self, name, args, e: A.Call, phase, level) -> str:
        """batch_rank / batch_sorted / batch_quantile: once per rollout, over the whole batch."""
        if phase == "loss":
            raise error(f"{name}(...) is computed once per rollout over the whole batch, but this reads a "
                        "per-update quantity", e.span, "phase",
                        "read the rollout's values instead: logp_old, entropy_old, value_old, scores")
        if name == "batch_sorted":
            rl = self._lvl(args[1])
            if rl not in ("response", "group"):
                raise error(f"the rank of batch_sorted is one per response or per group, but `{unparse(e.args[1])}` "
                            f"is {rl}-level", e.args[1].span, "level", "e.g. batch_sorted(x, batch_rank(y))")
            return rl
        if name == "batch_quantile":
            q = self.g.nodes[args[1]]
            if q["phase"] != "const" or (q["op"] in ("const", "param") and not 0 <= q.get("value", 0) <= 1):
                raise error("the q of batch_quantile is a number between 0 and 1 (or a parameter)", e.args[1].span,
                            "level")
        return level

    def _arity(self, fn: Fn, e: A.Call):
        n = len(e.args)
        lo, hi = len(fn.args) - fn.optional, len(fn.args)
        if not lo <= n <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            sig = f"{fn.name}({', '.join(fn.args[:lo])}{', ...' if hi > lo else ''})"
            raise error(f"{fn.name} takes {want} argument{'s' if hi != 1 else ''}, got {n}", e.span, "arity",
                        f"usage: {sig}")
        for kw in e.kwargs:
            if kw.name not in fn.kwargs:
                allowed = ", ".join(fn.kwargs) or "none"
                raise error(f"{fn.name} has no option {kw.name!r} (options: {allowed})", kw.span, "arity",
                            did_you_mean(kw.name, fn.kwargs))

    def _inline(self, e: A.Call, env) -> str:
        d = self.res.defs[e.func]
        if e.kwargs:
            raise error(f"{d.name} is a def; pass its arguments by position", e.kwargs[0].span, "arity")
        if len(e.args) != len(d.params):
            raise error(f"{d.name} takes {len(d.params)} argument(s) ({', '.join(d.params)}), got {len(e.args)}",
                        e.span, "arity", f"defined at {d.span}")
        if f"def:{e.func}" in self.building:
            via = [b[4:] for b in self.building if b.startswith("def:")]
            path = " → ".join(via[via.index(e.func):] + [e.func])
            raise error(f"def {d.name} calls itself ({path})", e.span, "cycle",
                        "defs are inlined at each use, so they cannot recurse")
        local = {p: self._expr(a, env) for p, a in zip(d.params, e.args)}
        depth = sum(b.startswith("def:") for b in self.building)
        if depth >= MAX_DEF_DEPTH:
            raise error(f"defs call each other more than {MAX_DEF_DEPTH} deep (this call of {d.name} would be "
                        f"level {depth + 1})", e.span,
                        "too-deep", "defs are inlined at each use; write the chain with fewer, larger defs")
        # A def's body reads only its arguments, so calls with structurally equal arguments share
        # one inlined body: defs that call the previous one twice stay linear, not exponential.
        key = (d.name, tuple(self._skey(local[p]) for p in d.params))
        node = self.inlined.get(key)
        if node is None:
            self.building.append(f"def:{e.func}")
            try:
                node = self._expr(d.body, local)
            finally:
                self.building.pop()
            self.inlined[key] = node
        # The call keeps its own identity (for graphs and diffs) as an alias of the inlined body.
        a = self.g.nodes[node]
        return self._node("def", [node], e.span, fn=d.name, call_args=tuple(local[p] for p in d.params),
                          level=a["level"], phase=a["phase"], grad=a["grad"])

    def _skey(self, nid: str) -> tuple:
        """A node's structure: its op, its attributes (positions left out) and its arguments'
        structures. Equal keys mean equal values; attributes that name other nodes (kwargs) keep
        their ids, so the key errs only towards 'different'."""
        key = self.skeys.get(nid)
        if key is None:
            a = self.g.nodes[nid]
            attrs = tuple(sorted((k, repr(v)) for k, v in a.items() if k not in ("span", "stmt_span", "args")))
            key = (a["op"], attrs, tuple(self._skey(x) for x in a["args"]))
            self.skeys[nid] = key
        return key

    def _check_def(self, d: A.Def):
        if d.name in FUNCTIONS:
            raise error(f"{d.name!r} is a built-in function and cannot be redefined", d.span, "reserved",
                        "give the def another name")
        for node in A.walk(d.body):
            if isinstance(node, A.Name) and node.id not in d.params:
                raise error(f"def {d.name} uses {node.id!r}, which is not one of its arguments", node.span,
                            "unknown-name", "a def may use only its own arguments, numbers and functions")
            if isinstance(node, A.Call) and node.func not in FUNCTIONS and node.func not in self.res.defs:
                raise error(f"unknown function {node.func!r}", node.span, "unknown-function",
                            did_you_mean(node.func, set(FUNCTIONS) | set(self.res.defs)))
        if len(set(d.params)) != len(d.params):
            raise error(f"def {d.name} repeats an argument name", d.span, "duplicate")

    # ------------------------------------------------------------------ data, sample, select
    def _data(self) -> str | None:
        d = self.res.data
        if d is None:
            return None
        if d.kind not in DATA_KINDS:
            raise error(f"unknown data kind {d.kind!r}", d.span, "unknown-name",
                        did_you_mean(d.kind, DATA_KINDS) or f"kinds: {', '.join(DATA_KINDS)}")
        return d.kind

    def _int_arg(self, e: A.Expr, what: str) -> int:
        if isinstance(e, A.Number) and isinstance(e.value, int):
            return e.value
        if isinstance(e, A.Name) and e.id in self.params:
            v = self.params[e.id].value
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            raise error(f"{what} must be a whole number; parameter {e.id!r} is {v!r}", e.span, "type")
        raise error(f"{what} must be a whole number or an int parameter", e.span, "type")

    def _sampler(self, e: A.Expr, data: str | None) -> tuple[int, bool]:
        """(rows per group, whether the group is pair-shaped with a designated first row)."""
        if not isinstance(e, A.Call) or FUNCTIONS.get(e.func, None) is None or FUNCTIONS[e.func].kind != "sampler":
            raise error("the sample section takes one sampler: generate, demonstration, concat, tree_search, "
                        "flow_sde or rollout", e.span, "section")
        fn = FUNCTIONS[e.func]
        self._arity(fn, e)
        kw = {k.name: k.value for k in e.kwargs}
        for k, v in kw.items():
            if k == "model":
                if not (isinstance(v, A.Name) and v.id in ("policy", "reference")):
                    raise error("model must be policy or reference", v.span, "unknown-name")
            elif k == "env":
                if not (isinstance(v, A.Name) and v.id == "env"):
                    raise error("env names the run configuration's environment: write env = env", v.span,
                                "unknown-name", "set env: module:Class or tools: [module:function] in the run "
                                "configuration; a spec holds no Python")
            elif isinstance(v, A.Name):
                if v.id not in self.params:
                    raise error(f"unknown name {v.id!r}", v.span, "unknown-name", did_you_mean(v.id, self.params))
            else:
                try:
                    val = _literal(v)
                except ValueError:
                    raise error(f"{k} must be a number or a parameter", v.span, "type") from None
                if isinstance(val, str):
                    raise error(f"{k} must be a number, got the string {val!r}", v.span, "type")
        if e.func in ("generate", "demonstration", "tree_search", "flow_sde", "rollout"):
            arg = e.args[0]
            if not (isinstance(arg, A.Name) and arg.id == "prompt"):
                raise error(f"{e.func} samples for each prompt: write {e.func}(prompt, ...)", arg.span, "arity")
        if e.func == "demonstration":
            if data not in (None, "demonstrations"):
                raise error("demonstration(prompt) needs `data demonstrations`", e.span, "level")
            return 1, False
        if e.func == "rollout":
            for k in ("max_turns", "max_tokens"):
                if k in kw and self._int_arg(kw[k], k) < 1:
                    raise error(f"{k} must be at least 1", kw[k].span, "type")
        if e.func in ("generate", "flow_sde", "rollout"):
            n = self._int_arg(kw["n"], "n") if "n" in kw else 1
            if n < 1:
                raise error("n must be at least 1", kw["n"].span, "type")
            if n > MAX_GROUP:
                raise error(f"n must be at most {MAX_GROUP:,} (got {n:,})", kw["n"].span, "type",
                            "n is the number of responses sampled for each prompt")
            return n, False
        if e.func == "tree_search":
            return 2, True
        parts = [self._sampler(a, data)[0] for a in e.args]  # concat
        return sum(parts), True

    def _shape(self, data: str | None):
        sample = self.res.sections.get("sample")
        if sample is not None:
            if len(sample.body) != 1 or not isinstance(sample.body[0], A.Assign):
                raise error("the sample section holds exactly one line: `responses = sampler(...)`", sample.span,
                            "section")
            self.group_size, pair = self._sampler(sample.body[0].value, data)
            self.g.graph["sample_requires"] = self._sample_requires(sample.body[0].value)
            if pair and self.group_size == 2:
                self.roles = {"chosen": (0, 1), "rejected": (1, 1)}
            elif pair:
                self.roles = {"chosen": (0, 1)}
            self.g.graph["sample"] = sample.body[0].value
        elif data == "pairs":
            self.group_size, self.roles = 2, {"chosen": (0, 1), "rejected": (1, 1)}
        elif data in ("demonstrations", "unpaired"):
            self.group_size = 1
        elif data == "prompts":
            raise error("`data prompts` needs a sample section that says how responses are generated",
                        self.res.data.span, "section", "add: sample\n  responses = generate(prompt, n = 8)")
        self.g.graph["sample_group_size"] = self.group_size
        select = self.res.sections.get("select")
        if select is not None:
            self._select(select)

    def _samples_episodes(self) -> bool:
        sample = self.res.sections.get("sample")
        return sample is not None and any(isinstance(c, A.Call) and c.func == "rollout" for st in sample.body
                                          if isinstance(st, A.Assign) for c in A.walk(st.value))

    def _generates(self) -> bool:
        sample = self.res.sections.get("sample")
        return sample is not None and len(sample.body) == 1 and isinstance(sample.body[0], A.Assign) \
            and isinstance(sample.body[0].value, A.Call) and sample.body[0].value.func in ("generate", "rollout")

    def _sample_requires(self, e: A.Call) -> set[str]:
        req = set()
        for node in A.walk(e):
            if isinstance(node, A.Call):
                req |= {"generate": {"generation"}, "tree_search": {"generation", "tree_search"},
                        "flow_sde": {"flow"}, "rollout": {"generation", "env"}, "demonstration": set(),
                        "concat": set()}.get(node.func, set())
                for kw in node.kwargs:
                    if kw.name == "model" and isinstance(kw.value, A.Name) and kw.value.id == "reference":
                        req.add("reference")
        return req

    def _select(self, sec: A.Section):
        offset, roles, picks = 0, {}, []
        saved, self.section = self.section, "select"
        for st in sec.body:
            if not isinstance(st, A.Assign):
                raise error("the select section holds `role = selector(...)` lines", st.span, "section")
            e = st.value
            fn = FUNCTIONS.get(e.func) if isinstance(e, A.Call) else None
            if fn is None or fn.kind != "selector":
                raise error("select takes a selector: argmax, argmin, top_k, bottom_k, coreset or opt_select",
                            e.span, "section", did_you_mean(e.func, [f for f, v in FUNCTIONS.items()
                                                                     if v.kind == "selector"]) if isinstance(e, A.Call) else None)
            self._arity(fn, e)
            x = self._expr(e.args[0], {})
            if self._lvl(x) != "response" or self.g.nodes[x]["phase"] not in ("const", "score"):
                raise error(f"{e.func} ranks the responses of a group by a score: `{unparse(e.args[0])}` must be a "
                            "response-level value computed from scores", e.args[0].span, "level")
            rows = 1
            extra = {}
            if e.func in ("top_k", "bottom_k"):
                rows = self._int_arg(e.args[1], "k")
            if e.func in ("coreset", "opt_select"):
                emb = e.args[1]
                if not (isinstance(emb, A.Call) and emb.func == "embedding"):
                    raise error(f"{e.func} clusters embeddings: pass embedding(response)", emb.span, "arity")
                rows = self._int_arg(e.args[2], "k")
                extra["requires"] = ("embedding",)
            if rows < 1:
                raise error("k must be at least 1", e.span, "type")
            picks.append(self._node("select", [x], e.span, fn=e.func, role=st.name, rows=rows, offset=offset,
                                    level="group", phase="score", grad=False, **extra))
            roles[st.name] = (offset, rows)
            offset += rows
        self.section = saved
        if offset > self.group_size:
            raise error(f"select keeps {offset} responses per group, but groups hold only {self.group_size}",
                        sec.span, "level", "sample more responses per prompt or select fewer")
        self.g.graph["selects"] = picks
        self.roles = roles
        self.group_size = offset

    # ------------------------------------------------------------------ filter, loss, train, pipeline
    def _filters(self):
        keeps = []
        sec = self.res.sections.get("filter")
        for st in (sec.body if sec else ()):
            if st.scope != "groups":
                raise error("only `keep groups where ...` is supported: dropping single responses would leave "
                            "groups of different sizes", st.span, "section",
                            "filter whole groups, e.g. keep groups where group_std(r) > 0")
            self.section = "filter"
            c = self._expr(st.cond, {})
            a = self.g.nodes[c]
            if a["level"] not in ("group", "batch"):
                raise error(f"`keep groups where` needs a per-group condition; `{unparse(st.cond)}` is "
                            f"{a['level']}-level", st.cond.span, "level",
                            "reduce it over the group, e.g. group_std(r) > 0")
            if a["phase"] not in ("const", "score"):
                raise error("filters run right after scoring, before any model forward; this condition reads "
                            "model outputs", st.cond.span, "phase")
            keeps.append(self._node("keep", [c], st.span, scope=st.scope, level="group", phase="score", grad=False))
        self.g.graph["keeps"] = keeps

    def _terms(self, stages):
        terms = []
        sec = self.res.sections.get("loss")
        names = set()
        for st in (sec.body if sec else ()):
            if not isinstance(st, A.Minimize):
                continue
            self.section = "loss"
            node = self._expr(st.value, {})
            a = self.g.nodes[node]
            if a["level"] != "batch":
                raise error(f"minimize needs one number for the whole batch, but this is {a['level']}-level",
                            st.value.span, "level",
                            "aggregate it: token_mean_all(x), mean(mean_tokens(x)) or mean(...) over responses/groups")
            name = st.name or ("loss" if "loss" not in names else f"loss_{len(terms) + 1}")
            if name in names or (st.name and (st.name in self.stmts or st.name in self.params)):
                raise error(f"term {name!r} is defined twice", st.span, "duplicate")
            names.add(name)
            self._check_linear(node, st)
            terms.append(self._node("minimize", [node], st.span, term=name, level="batch", phase=a["phase"],
                                    grad=a["grad"]))
        if not terms and not stages:
            where = sec.span if sec else self.res.file.span
            raise error(f"{self.res.name} has nothing to minimize", where, "missing-minimize",
                        "add to the loss section a line such as `minimize -mean(mean_tokens(logp))`")
        if terms and stages:
            raise error("a pipeline spec composes other specs; it cannot have its own loss", sec.span, "section")
        if terms and not any(self.g.nodes[t]["grad"] for t in terms):
            raise error("no loss term reads a trained quantity (logp, value, entropy, rm_score), so nothing would "
                        "learn", sec.span, "phase")
        self.g.graph["terms"] = terms

    def _check_linear(self, root: str, st: A.Minimize):
        """Batch-wide reductions of grad values may only be added or scaled (micro-batch exactness)."""
        ok, stack = set(), [root]
        while stack:
            nid = stack.pop()
            a = self.g.nodes[nid]
            ok.add(nid)
            args = list(a["args"])
            if a["op"] in ("+", "-", "neg", "alias", "def"):
                stack.extend(x for x in args if self.g.nodes[x]["level"] == "batch")
            elif a["op"] in ("*", "/"):
                gr = [x for x in args if self.g.nodes[x]["grad"]]
                if len(gr) == 1 and (a["op"] == "*" or gr[0] == args[0]):
                    stack.append(gr[0])
        def where(n):
            sp = self.g.nodes[n]["span"]
            return (sp.line, sp.col, n)
        for nid in sorted(nx.ancestors(self.g, root) | {root}, key=where):
            a = self.g.nodes[nid]
            if a.get("linear") and a["grad"] and nid not in ok:
                raise error("a batch-wide reduction of a gradient-carrying value may only be added to the loss or "
                            "scaled by a constant; used like this, micro-batches would not add up to the "
                            "full-batch loss", a["span"], "linearity",
                            "apply the nonlinearity per response or per group, inside the mean")

    def _train(self):
        train = {"epochs": 1, "minibatches": 1, "iterations": 1, "reference": "fixed", "logprob_temperature": 1}
        schedules: dict[str, list] = {}
        sec = self.res.sections.get("train")
        for st in (sec.body if sec else ()):
            if not isinstance(st, A.Assign):
                raise error("the train section holds `key = value` lines", st.span, "section")
            try:
                value = _literal(st.value)
            except ValueError:
                raise error(f"train: {st.name} must be a literal value", st.value.span, "type") from None
            if st.name in TRAIN_KEYS:
                want = TRAIN_KEYS[st.name]
                if want is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise error(f"train: {st.name} must be a whole number ≥ 1, got {value!r}", st.value.span, "type")
                if st.name == "reference" and value not in REFERENCE_MODES:
                    raise error(f"train: reference must be one of {', '.join(map(repr, REFERENCE_MODES))}",
                                st.value.span, "type")
                if st.name == "logprob_temperature" and not (
                        value == "sampling" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                and value > 0)):
                    raise error(f"train: logprob_temperature must be \"sampling\" or a number > 0, got {value!r}",
                                st.value.span, "type",
                                "\"sampling\" divides the logits by the sampler's temperature (as TRL and verl do)")
                train[st.name] = value
            elif st.name in self.params:
                if not isinstance(value, list):
                    raise error(f"train: a parameter here is a per-iteration schedule (a list), got {value!r}",
                                st.value.span, "type", f"write {st.name} = [v1, v2, ...], one value per iteration")
                p = self.params[st.name]
                schedules[st.name] = [coerce(st.name, p.type, v, st.value.span, where="schedule") for v in value]
            else:
                raise error(f"train: unknown setting {st.name!r}", st.name_span, "unknown-name",
                            did_you_mean(st.name, list(TRAIN_KEYS) + list(self.params))
                            or f"settings: {', '.join(TRAIN_KEYS)}, or a parameter schedule")
        for name, values in schedules.items():
            if len(values) != train["iterations"]:
                span = next(s.value.span for s in sec.body if s.name == name)
                raise error(f"train: {name} has {len(values)} values but iterations = {train['iterations']}", span,
                            "type", "give one value per self-play iteration")
        return train, schedules

    def _pipeline(self) -> list[Stage]:
        sec = self.res.sections.get("pipeline")
        if sec is None:
            return []
        stages: list[Stage] = []
        for st in sec.body:
            e = st.value if isinstance(st, A.Assign) else None
            if not (isinstance(e, A.Call) and e.func == "run" and e.args and isinstance(e.args[0], A.Name)):
                raise error("a pipeline stage reads `name = run(SPEC, init = stage, ...)`", st.span, "section")
            self._arity(FUNCTIONS["run"], e)
            spec_name = e.args[0].id
            if spec_name == self.res.name:
                raise error("a pipeline cannot run itself", e.args[0].span, "cycle")
            base_dir = Path(self.res.file.path).parent if self.res.file.path != "<string>" else None
            sub = read_spec(spec_name, relative_to=base_dir, at=e.args[0].span)
            check(resolve(sub))
            links = {}
            for kw in e.kwargs:
                if not (isinstance(kw.value, A.Name) and kw.value.id in {s.name for s in stages}):
                    raise error(f"{kw.name} must name an earlier stage", kw.value.span, "unknown-name",
                                did_you_mean(getattr(kw.value, "id", ""), [s.name for s in stages]))
                links[kw.name] = kw.value.id
            stages.append(Stage(st.name, spec_name, links, st.span))
        return stages
