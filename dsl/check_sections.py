"""The checker's sections after the statements: data, sample and select (the group's shape and
roles), filter, the loss terms (with their micro-batch linearity), train and pipeline.

`_Sections` is a mixin of the checker (`dsl/check.py`'s `_Checker`).
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from . import ast as A
from .builtins import DATA_KINDS, FUNCTIONS, REFERENCE_MODES, TRAIN_KEYS
from .load import did_you_mean, error, read_spec, resolve
from .unparse import unparse
from .spec import Stage, _literal, coerce

MAX_GROUP = 4096    # responses sampled per prompt


class _Sections:
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
            type(self)(resolve(sub), {}).run()  # a stage is checked as a spec, by this same checker
            links = {}
            for kw in e.kwargs:
                if not (isinstance(kw.value, A.Name) and kw.value.id in {s.name for s in stages}):
                    raise error(f"{kw.name} must name an earlier stage", kw.value.span, "unknown-name",
                                did_you_mean(getattr(kw.value, "id", ""), [s.name for s in stages]))
                links[kw.name] = kw.value.id
            stages.append(Stage(st.name, spec_name, links, st.span))
        return stages
