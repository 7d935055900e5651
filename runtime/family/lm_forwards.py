"""The no-grad forwards of a causal-LM rollout, before its advantage stage: what the compiled
spec reads from models other than the one being trained (or from it, without gradients).

- ``logp_old`` / ``entropy_old`` under the policy that sampled (with self-play iterations
  the frozen iterate pi_t, models/iterations.py), ``value_old`` from the current critic --
  in micro-batches of whole groups;
- ``logp_mismatch`` / ``logp_ref_mismatch`` (data unpaired, KTO's reference point): each
  row's completion after the next row's prompt, summed log-probs under the policy and the
  reference;
- ``logp_ref`` through the reference cache (models/fastpath.py).
"""

from __future__ import annotations

import contextlib

import torch

from ..parallel.ddp import micro_slices


def no_grad_forwards(pol, run, batch: dict) -> None:
    algo, cfg = run.current, run.cfg
    rows = batch["mask"].shape[0]
    need_ent = "entropy_old" in algo.inputs
    need_logp = "logp_old" in algo.inputs or cfg.force_old_forward or need_ent
    need_value = "value_old" in algo.inputs
    it = getattr(run, "iterate", None)
    sampler = it if it is not None else run.model
    lo, vo, eo = [], [], []
    for sl in micro_slices(run, rows, algo.plan.group_size) if need_logp or need_value else []:
        if need_logp or sampler is run.model:
            o = pol.forward_rows(run, sampler, batch, sl, grad=False, value=need_value and sampler is run.model,
                                 entropy=need_ent)
            lo.append(o["logp"])
            if need_ent:
                eo.append(o["entropy"])
            if "value" in o:
                vo.append(o["value"])
        if need_value and sampler is not run.model:
            vo.append(pol.forward_rows(run, run.model, batch, sl, grad=False, value=True)["value"])
    if "logp_old" in algo.inputs:
        batch["logp_old"] = torch.cat(lo)
    if vo:
        batch["value_old"] = torch.cat(vo)
    if eo:
        batch["entropy_old"] = torch.cat(eo)
    if "logp_mismatch" in algo.inputs or "logp_ref_mismatch" in algo.inputs:
        mismatched_forwards(pol, run, batch, sampler)
    if pol.reference_needed(run):
        lr = run.ref_cache.logprobs(batch, run.batch_rows, lambda b: reference_forward(pol, run, b))
        if "logp_ref" in algo.inputs:
            batch["logp_ref"] = lr
    from ..parallel.wrap import pad_frozen_forwards
    pad_frozen_forwards(run)  # FSDP2: the sharded reference's forwards are collectives


def mismatched_forwards(pol, run, batch: dict, policy) -> None:
    """KTO's reference point: each row's completion after the next row's prompt (the
    completions rotated by one within this process's batch, as TRL's KTOTrainer does),
    summed log-probs under the policy (no grad) and the reference."""
    from ..models.fastpath import reference_model_ctx
    rows = run.batch_rows
    mism = pol.batch_of(run, [{"p": rows[(i + 1) % len(rows)]["p"], "c": r["c"], "rec": r["rec"]}
                              for i, r in enumerate(rows)])
    slices = micro_slices(run, len(rows), 1)
    for key, model in (("logp_mismatch", policy), ("logp_ref_mismatch", None)):
        if key not in run.current.inputs:
            continue
        if model is None:
            model, ctx = reference_model_ctx(run)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            lp = torch.cat([pol.forward_rows(run, model, mism, sl, grad=False)["logp"] for sl in slices])
        batch[key] = (lp * mism["mask"]).sum(1)


def reference_forward(pol, run, batch) -> torch.Tensor:
    """``[B, T]`` reference log-probs of ``batch`` (no grad, micro-batches of whole groups)."""
    from ..models.fastpath import reference_model_ctx
    ref, ctx = reference_model_ctx(run)
    with ctx:
        return torch.cat([pol.forward_rows(run, ref, batch, sl, grad=False)["logp"]
                          for sl in micro_slices(run, batch["mask"].shape[0], run.current.plan.group_size)])
