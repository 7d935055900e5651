"""The last stage of a step: the updates, epochs x minibatches of the plan, over whole groups.

Per minibatch (a list of group indices, loop/base.py ``_minibatches``): its rows and
per-group values are gathered, split into micro-batches of ``micro_batch_size`` groups,
and for each micro-batch the policy family's training forward (``policy.forward``: logp,
and entropy / value / mu_sqdist_ref when read) feeds ``algo.step_loss(micro, totals)``, whose
loss is back-propagated; then gradient clipping, the optimizer and the LR schedule. The
normalizers ``totals`` (tokens, responses, groups) are those of the whole minibatch over
every process, so the micro-batch losses add up to the minibatch's loss; DDP's part
(gradient reduction at the last micro-batch, padding micro-batches, ``world * loss``) is
parallel/ddp.py's, the gradient clipping (over every shard under FSDP2) parallel/wrap.py's.
"""

from __future__ import annotations

import time

import torch

from ..parallel.ddp import (backward, global_totals, mean_over_processes, micro_slices, sum_over_processes,
                            sync_context)
from ..parallel.wrap import clip_grad_norm


def _per(v, rows: int, groups: int, G: int, ridx, gidx):
    """A value of the batch restricted to some rows: per row, per group (one value per group),
    or batch-wide (as is)."""
    if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows:
        return v[ridx]
    if G > 1 and torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == groups:
        return v[gidx]
    return v


def updates(run, algo, batch: dict | None, metrics: dict, times: dict) -> tuple[float, int, dict, list]:
    """Run the step's optimizer updates on ``batch`` (None: this process has no rows, it still
    joins every update of the others). ``metrics``: the step's rollout metrics so far. Returns
    (summed loss, updates, every metric of the step, grad norms)."""
    pol = run.family
    G = algo.plan.group_size
    rows = 0 if batch is None else batch["mask"].shape[0]
    n_groups = rows // G
    loss_sum, n_updates, stat_sums, stat_n, term_sums = 0.0, 0, {}, 0, {}
    grad_norms = []
    for chunk in run._minibatches(algo, n_groups):
        t0 = time.perf_counter()
        ridx = torch.tensor([g * G + j for g in chunk for j in range(G)], dtype=torch.long, device=run.device)
        gidx = torch.tensor(chunk, dtype=torch.long, device=run.device)
        mb = None if batch is None else {k: _per(v, rows, n_groups, G, ridx, gidx) for k, v in batch.items()}
        slices = micro_slices(run, len(ridx), G) if mb is not None else []
        totals, n_micro = global_totals(run, 0.0 if mb is None else float(mb["mask"].sum()), len(ridx),
                                        len(chunk), len(slices))
        if n_micro == 0:  # nothing to learn from on any process: no update
            continue
        mb_loss = torch.zeros((), dtype=torch.float64, device=run.device)
        bad = None
        for i in range(n_micro):
            if run.world == 1 and bad is not None:
                break
            with sync_context(run, i, n_micro):
                if i >= len(slices) or bad is not None:  # padding: this process has no more rows
                    backward(run, pol.zero_loss(run))
                    continue
                sl = slices[i]
                fw = pol.forward(run, mb, sl, ridx[sl])
                gsl = slice(sl.start // G, sl.stop // G)  # micro-batches are whole groups
                micro = {k: _per(v, len(ridx), len(chunk), G, sl, gsl) for k, v in mb.items()}
                micro.update(fw)
                out = algo.step_loss(micro, totals)
                bad = run._bad_term(out)
                if bad is not None:
                    if run.world > 1:
                        backward(run, pol.zero_loss(run, fw))  # keeps the processes in step; no update follows
                    continue
                backward(run, out.loss)
            mb_loss += out.loss.detach().double()
            run._add_metrics(out.metrics, term_sums, stat_sums)
            stat_n += 1
        flag = sum_over_processes(run, torch.tensor([0.0 if bad is None else 1.0], device=run.device))
        if flag.item() > 0:
            raise run._non_finite(f"term '{bad}'" if bad else "a term on another process")
        times["time/policy_fwd_bwd"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        mb_loss = sum_over_processes(run, mb_loss)
        if run.cfg.max_grad_norm:
            grad_norms.append(clip_grad_norm(run, run.grad_params, run.cfg.max_grad_norm))
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        loss_sum += float(mb_loss)
        n_updates += 1
        times["time/optimizer"] += time.perf_counter() - t0
    metrics = {**metrics, **{k: v / max(1, stat_n) for k, v in stat_sums.items()}}
    terms = {k: v / max(1, n_updates) for k, v in term_sums.items()}  # per update, like `loss`
    metrics, terms = mean_over_processes(run, metrics, terms)
    metrics.update(terms)
    return loss_sum, n_updates, metrics, grad_norms
