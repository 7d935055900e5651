"""The run plan: what the runtime needs from a spec besides its step functions.

The compiler pass ``passes/plan.py`` lowers the spec's ``data``, ``sample``, ``filter``,
``select`` and ``train`` sections into these frozen dataclasses (``CompiledAlgorithm.plan``).
The runtime reads them, never the syntax tree. Every value here is a number, a string, a
bool, None or a tuple of those: the plan is printed into the generated module as a
``PLAN = {...}`` literal built from their reprs (``as_literal`` / ``plan_source``).
"""

from __future__ import annotations

import pprint
from dataclasses import dataclass

# Each sampler's options and their defaults (None: the run decides, e.g. max_tokens from
# the run's max_new_tokens). A spec's keyword arguments override them.
SAMPLER_OPTIONS: dict[str, dict[str, object]] = {
    "generate": {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                 "model": "policy", "max_tokens": None},
    "tree_search": {"simulations": 16, "branching": 3, "depth": 4, "c_puct": 1.5, "temperature": 1.0},
    "flow_sde": {"n": 1, "steps": 10, "noise": 0.7},
    # env = env: the run configuration's environment (env: module:Class, or tools: [...]); max_tokens per turn
    "rollout": {"env": "env", "n": 1, "max_turns": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": None,
                "model": "policy"},
    "demonstration": {},
    "pairs": {},
    "unpaired": {},
    "concat": {},
}


@dataclass(frozen=True)
class SamplerPlan:
    """One sampler of the ``sample`` section (or of the data, when the spec has none).

    kind: generate | demonstration | pairs | unpaired | concat | tree_search | flow_sde | rollout;
    options: (name, value) with params resolved to their values and defaults filled in;
    parts: the samplers a ``concat`` joins, in order; rows: responses per group it yields;
    line: the spec line it comes from (0 when it comes from ``data``).
    """

    kind: str
    rows: int
    options: tuple[tuple[str, object], ...] = ()
    parts: tuple["SamplerPlan", ...] = ()
    line: int = 0

    def option(self, name: str, default=None):
        for k, v in self.options:
            if k == name:
                return default if v is None else v
        return default

    def walk(self):
        """This sampler and every part, depth first."""
        yield self
        for p in self.parts:
            yield from p.walk()

    def as_literal(self) -> dict:
        lit = {"kind": self.kind, "rows": self.rows, "options": dict(self.options)}
        if self.parts:
            lit["parts"] = [p.as_literal() for p in self.parts]
        if self.line:
            lit["line"] = self.line
        return lit


@dataclass(frozen=True)
class RolePlan:
    """A named row of each training group: rows ``first .. first + rows - 1``."""

    name: str
    first: int
    rows: int


@dataclass(frozen=True)
class FilterPlan:
    """A ``keep groups where ...`` line: the score stage drops the groups it rejects."""

    level: str
    line: int


@dataclass(frozen=True)
class SelectPlan:
    """A ``role = selector(...)`` line of the ``select`` section."""

    role: str
    selector: str
    rows: int
    line: int


@dataclass(frozen=True)
class RunPlan:
    """Everything about a spec's run that is not a step function (see the module docstring)."""

    name: str
    data: str                      # prompts | demonstrations | pairs | unpaired: what a data row holds
    sampler: SamplerPlan
    sample_group_size: int         # rows per group as sampled
    group_size: int                # rows per group in the training batch (after select)
    roles: tuple[RolePlan, ...] = ()
    filters: tuple[FilterPlan, ...] = ()
    selects: tuple[SelectPlan, ...] = ()
    refill: bool = False           # sample again while filters / the sampler leave the batch short
    epochs: int = 1                # passes over each rollout
    minibatches: int = 1           # optimizer updates per pass
    iterations: int = 1            # self-play iterations of the run
    reference: str = "fixed"       # fixed | iterate: the reference takes the policy's weights per iteration
    logprob_temperature: float = 1.0
    schedules: tuple[tuple[str, tuple], ...] = ()       # param -> value per iteration
    param_defaults: tuple[tuple[str, object], ...] = ()  # param -> declared default

    # -- derived -------------------------------------------------------------------------
    @property
    def updates_per_rollout(self) -> int:
        return self.epochs * self.minibatches

    @property
    def offline(self) -> bool:
        """Whether every row comes from the data (no sampling by a model)."""
        return self.sampler.kind in ("demonstration", "pairs", "unpaired")

    @property
    def generates(self) -> bool:
        """Whether some sampler draws responses from a model."""
        return any(s.kind in ("generate", "tree_search", "flow_sde", "rollout") for s in self.sampler.walk())

    def samplers(self, kind: str) -> list[SamplerPlan]:
        return [s for s in self.sampler.walk() if s.kind == kind]

    def default(self, param: str):
        return dict(self.param_defaults).get(param)

    def as_literal(self) -> dict:
        """The plan as plain values (what ``PLAN`` in the generated module holds)."""
        return {
            "data": self.data,
            "sampler": self.sampler.as_literal(),
            "sample_group_size": self.sample_group_size,
            "group_size": self.group_size,
            "roles": {r.name: [r.first, r.rows] for r in self.roles},
            "filters": [{"level": f.level, "line": f.line} for f in self.filters],
            "selects": [{"role": s.role, "selector": s.selector, "rows": s.rows, "line": s.line}
                        for s in self.selects],
            "refill": self.refill,
            "epochs": self.epochs,
            "minibatches": self.minibatches,
            "iterations": self.iterations,
            "reference": self.reference,
            "logprob_temperature": self.logprob_temperature,
            "schedules": {k: list(v) for k, v in self.schedules},
        }


def plan_source(plan: RunPlan) -> list[str]:
    """Lines of the generated module that show the plan (``PLAN = {...}``)."""
    body = pprint.pformat(plan.as_literal(), width=100, sort_dicts=False)
    return ["# the run plan (compiler/passes/plan.py): what the runtime samples, filters and",
            "# how it updates; the runtime reads CompiledAlgorithm.plan, of which this is a copy",
            f"PLAN = {body}"]
