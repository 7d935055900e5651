"""The one place that chooses how the training forward is spread over processes: DDP or FSDP2.

The run's :class:`~.settings.ParallelPlan` (``run.parallel_plan``, resolved by loop/engine.py
before anything loads) decides; the policy family and the update stage call only these:

- :func:`prepare_training` (before the optimizer is built): the model's own activation
  checkpointing when on (activation_checkpointing.py), then, under ``parallel=fsdp2``,
  ``fully_shard`` of the training forward (fsdp2.py: the parameters become their shards);
- :func:`wrap_training` (after the optimizer): DDP through ``accelerator.prepare`` (ddp.py),
  or, already sharded, only the optimizer handed to ``accelerate``;
- :func:`clip_grad_norm`: the gradient norm over all processes (FSDP2: over every shard);
- :func:`gathered`: the policy's whole weights while it generates or is evaluated (FSDP2;
  nothing to do under DDP).
"""

from __future__ import annotations

import contextlib

from ..models.loaders import unwrap_causal_lm
from . import activation_checkpointing, fsdp2


def prepare_training(run, forward):
    """``forward`` (the training forward of ``run.model``) ready to be optimized: checkpointed
    layers when ``gradient_checkpointing``, sharded under FSDP2. Sets ``run.train_forward``."""
    plan = run.parallel_plan
    if plan.gradient_checkpointing:
        activation_checkpointing.apply(unwrap_causal_lm(run.model))
    forward.cfg = activation_checkpointing.training_config(run.cfg, plan)
    if plan.fsdp2:
        fsdp2.shard_forward(forward, unwrap_causal_lm(run.model), plan, run.device, run.tokenizer.pad_token_id)
    run.train_forward = forward
    return forward


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


def gathered(run):
    """A context in which the policy's weights are whole (FSDP2), for generation and evaluation."""
    plan = getattr(run, "parallel_plan", None)
    if plan is None or not plan.fsdp2:
        return contextlib.nullcontext()
    return fsdp2.gathered(run)
