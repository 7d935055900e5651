"""Self-play iterations: the iterate pi_t that samples, and what is replaced between iterations.

A spec with ``train: iterations = N > 1`` (SPIN, SPPO, RSPO) trains in N iterations of
``ceil(steps / N)`` optimizer steps. Iteration t has an **iterate** pi_t: the policy as it
was when the iteration began, frozen for the whole iteration. It is

- the model that samples: ``generate(prompt, ...)`` with ``model = policy`` (the default)
  draws from pi_t, as when an iteration's responses are all generated at its start (the
  official SPIN / SPPO / RSPO loops); ``model = reference`` draws from the reference;
- the model of ``logp_old`` ("the policy that sampled"): read once per rollout, under
  pi_t -- in RSPO the SPPO term's log(pi / pi_t);
- with ``reference = "iterate"``, also the reference (``logp_ref``): the reference is
  replaced by the policy's weights at each iteration boundary and *is* pi_t (one model);
  with ``reference = "fixed"`` the reference stays the initial model (RSPO's mu) and pi_t
  is a separate frozen copy, refreshed at each boundary.

Within an iteration every visit of a prompt draws fresh samples from pi_t (the official
code draws once per iteration and trains several epochs on the same samples; the
distribution is the same). Per-iteration parameter values (``beta = [0.1, 0.1, 5.0]``)
recompile the spec at each boundary (``Engine.algo_for``); a value the run sets for a
scheduled param (``--set beta=1.0``, a preset, ``compile(spec, beta=1.0)``) holds at every
iteration instead of the schedule. With ``iterations = 1`` there
is no iterate: the current policy samples and ``logp_old`` is the policy before the
rollout's updates (PPO, GRPO).

The iterate's weights are part of the checkpoint (``iterate.safetensors`` when it is a
separate model), so a run resumed inside an iteration continues against the same pi_t.
"""

from __future__ import annotations

import copy

from ..errors import RunError
from .loaders import unwrap_causal_lm


def wants_iterate(algo) -> bool:
    return algo.plan.iterations > 1


def build_iterate(engine):
    """The frozen pi_t model for ``engine`` (None without iterations)."""
    algo = engine.algo
    if not wants_iterate(algo) or "reward_head" in algo.requires:
        return None
    if engine.reference is not None and algo.plan.reference == "iterate":
        return engine.reference
    if engine.lora:
        raise RunError("LoRA with self-play iterations (`iterations > 1`) is not supported yet",
                       hint="set lora_r: 0 for this spec")
    it = copy.deepcopy(unwrap_causal_lm(engine.model))
    it.eval()
    it.requires_grad_(False)
    return it


def refresh_iterate(engine) -> None:
    """pi_t := the current policy (a no-op when the iterate is the replaced reference)."""
    it = getattr(engine, "iterate", None)
    if it is None or it is engine.reference:
        return
    it.load_state_dict(unwrap_causal_lm(engine.model).state_dict())


def separate_iterate(engine):
    """The iterate when it is a model of its own (to checkpoint), else None."""
    it = getattr(engine, "iterate", None)
    return None if it is None or it is engine.reference else it


def overridden_schedules(algo) -> set[str]:
    """Scheduled params the run set explicitly (their value differs from the declared default):
    such a value holds at every iteration, in place of the spec's schedule."""
    declared = dict(algo.plan.param_defaults)
    return {k for k, _ in algo.plan.schedules if k in declared and algo.params[k] != declared[k]}


def iteration_params(algo, iteration: int) -> dict:
    """Every param's value at ``iteration``: the schedule's entry (the last one past its end),
    unless the run overrode that param (see ``overridden_schedules``)."""
    fixed = overridden_schedules(algo)
    over = dict(algo.params)
    for k, vals in algo.plan.schedules:
        if k not in fixed:
            over[k] = vals[min(iteration, len(vals) - 1)]
    return over
