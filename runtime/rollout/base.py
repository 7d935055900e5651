"""The sampler interface and its registry: how a group of responses is produced for each prompt.

The run plan names the sampler (``algo.plan.sampler``: a ``SamplerPlan`` with its kind and
resolved options, compiler/plan.py). ``build_sampler(plan, run)`` looks its kind up in
``SAMPLERS`` and builds it; the loop (loop/rollout_stage.py) calls ``sample(prompts, seed)``
and never looks at the kind. A new sampler is a class registered here::

    @register("my_sampler")
    class MySampler(Sampler):
        def sample(self, prompts, seed):
            ...

What ``prompts`` and the result are belongs to the policy family: for a causal LM, a list of
data records in and one group (a list of row dicts ``{"p": prompt ids, "c": completion ids,
"text", "rec"}``) per record out; for a flow policy, a number of class prompts in and a
``FlowRollout`` out. ``seed`` is the round's seed, derived from (seed, step, process, round).
"""

from __future__ import annotations

import contextlib

from ..errors import RunError

SAMPLERS: dict[str, type] = {}


ENGINE_SAMPLERS: dict[str, type] = {}  # kind -> the sampler of that kind drawn by vLLM (use_vllm)


def register(kind: str, engine: str | None = None):
    """Class decorator: the sampler of ``kind`` (a SamplerPlan kind); with ``engine="vllm"``,
    the one that ``use_vllm`` runs take instead (rollout/vllm_samplers.py)."""
    def deco(cls):
        cls.kind = kind
        (ENGINE_SAMPLERS if engine == "vllm" else SAMPLERS)[kind] = cls
        return cls
    return deco


class Sampler:
    """A sampler of the plan, bound to the run that owns the models it samples with."""

    kind = ""

    def __init__(self, plan, run):
        self.plan = plan   # SamplerPlan: kind, options (params resolved), parts, rows
        self.run = run

    def option(self, name: str, default=None):
        return self.plan.option(name, default)

    def sample(self, prompts, seed: int):
        raise NotImplementedError

    def sampling_model(self, model):
        """``(model, context)`` to sample in: ``model``, or with the option ``model = reference``
        the reference (with LoRA and no separate reference: ``model`` with the policy's adapters
        disabled for the context's duration), as ``generate`` and ``rollout`` offer it."""
        run = self.run
        if self.option("model") == "reference":
            if run.reference is not None:
                return run.reference, contextlib.nullcontext()
            if getattr(run, "lora", False):
                return model, run.policy.disable_adapter()
        return model, contextlib.nullcontext()


def build_sampler(plan, run) -> Sampler:
    """The registered sampler for ``plan.kind`` (the modules of rollout/ register themselves when
    the package is imported: rollout/__init__.py)."""
    cls = SAMPLERS.get(plan.kind)
    if getattr(getattr(run, "cfg", None), "use_vllm", False):  # the vLLM engine draws the tokens
        cls = ENGINE_SAMPLERS.get(plan.kind, cls)
    if cls is None:
        raise RunError(f"sampler {plan.kind}(...) is not supported by this runtime yet",
                       hint=f"samplers: {', '.join(sorted(SAMPLERS))}")
    return cls(plan, run)
