"""The one place that chooses how the training forward is spread over processes: DDP or FSDP2.

The run's :class:`~.settings.ParallelPlan` (``run.parallel_plan``, resolved by loop/engine.py
before anything loads) decides; the policy family and the update stage call only these:

- :func:`prepare_training` (before the optimizer is built): the model's own activation
  checkpointing when on (activation_checkpointing.py), then, under ``parallel=fsdp2``,
  ``fully_shard`` of the training forward (fsdp2.py: the parameters become their shards);
- :func:`wrap_training` (after the optimizer): DDP through ``accelerator.prepare`` (ddp.py),
  or, already sharded, only the optimizer handed to ``accelerate``;
- :func:`clip_grad_norm`: the gradient norm over all processes (FSDP2: over every shard);
- :func:`gathered`: the policy's (or the reference's) whole weights while it generates or is
  evaluated (FSDP2; nothing to do under DDP);
- :func:`frozen_forward` / :func:`pad_frozen_forwards`: the reference's sharded no-grad
  forward under FSDP2, and the one-token forwards that keep the processes' counts of them equal.
"""

from __future__ import annotations

import contextlib

from ..models.loaders import unwrap_causal_lm
from . import activation_checkpointing, fsdp2


def prepare_training(run, forward, forwarder=None):
    """``forward`` (the training forward of ``run.model``) ready to be optimized: checkpointed
    layers when ``gradient_checkpointing``, sharded under FSDP2. Sets ``run.train_forward``.
    Under FSDP2 the frozen reference (``run.reference``) is sharded too, through
    ``forwarder(model)`` (its no-grad forward module); see :func:`frozen_forward`."""
    plan = run.parallel_plan
    if plan.gradient_checkpointing:
        activation_checkpointing.apply(unwrap_causal_lm(run.model))
    forward.cfg = activation_checkpointing.training_config(run.cfg, plan)
    run.frozen_forwards = {}
    if plan.fsdp2:
        fsdp2.shard_forward(forward, unwrap_causal_lm(run.model), plan, run.device, run.tokenizer.pad_token_id)
        ref = getattr(run, "reference", None)
        if ref is not None and forwarder is not None:
            run.frozen_forwards[id(ref)] = fsdp2.shard_frozen(forwarder(ref), unwrap_causal_lm(ref), plan,
                                                              run.device, run.tokenizer.pad_token_id)
    run.train_forward = forward
    return forward


def frozen_forward(run, model):
    """The sharded no-grad forward of frozen ``model`` (FSDP2's reference), or None."""
    return getattr(run, "frozen_forwards", {}).get(id(model))


def pad_frozen_forwards(run) -> None:
    """Under FSDP2, one-token forwards of each sharded frozen model until every process has run
    as many forwards of it as the others (collectives); call at the same point on every process."""
    for fwd in getattr(run, "frozen_forwards", {}).values():
        fsdp2.pad_frozen_forwards(fwd, run.tokenizer.pad_token_id, run.device)


def wrap_training(run, optimizer):
    """``(wrapped training forward, optimizer)``: DDP-wrapped by ``accelerate``, or the sharded
    forward itself under FSDP2 (``fully_shard`` already reduces the gradients)."""
    if run.parallel_plan.fsdp2:
        return run.train_forward, run.acc.prepare(optimizer)
    return run.acc.prepare(run.train_forward, optimizer)


def clip_grad_norm(run, parameters, max_norm: float) -> float:
    """Clip the gradients to ``max_norm``; their norm before clipping."""
    if run.parallel_plan.fsdp2:
        return fsdp2.clip_grad_norm_(parameters, max_norm)
    return float(run.acc.clip_grad_norm_(parameters, max_norm))


def gathered(run, model=None):
    """A context in which the weights of ``model`` (default: the policy) are whole (FSDP2), for
    generation and evaluation."""
    plan = getattr(run, "parallel_plan", None)
    if plan is None or not plan.fsdp2:
        return contextlib.nullcontext()
    frozen = None if model is None else frozen_forward(run, model)
    return fsdp2.gathered(run, frozen)
