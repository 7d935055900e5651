"""The checker's expressions: names, calls, indexing and inlined defs become graph nodes with
a level, a phase and a gradient flag; level and arity errors are raised here.

`_Exprs` is a mixin of the checker (`dsl/check.py`'s `_Checker`), which holds the graph and the
statement tables it reads.
"""

from __future__ import annotations

from . import ast as A
from .builtins import EXTERNAL_REQUIRES, FUNCTIONS, PHASES, PSEUDO, QUANTITIES, RANK, ROLES, UNPAIRED_ONLY, Fn
from .errors import Span
from .load import did_you_mean, error
from .unparse import unparse

MAX_DEF_DEPTH = 64  # defs inlined inside defs


class _Exprs:
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
