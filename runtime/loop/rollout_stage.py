"""Stage 1 of a step: rollout -> score, filter, select (with refill rounds).

Each round takes the next prompts (``policy.next_prompts``), samples them with the plan's
sampler (rollout/), scores the rows (``policy.score_rows``: reward functions, scorer
models, embeddings), and runs the compiled ``algo.score`` (filters and selection) on them.
While the kept groups fall short of the batch and the plan says refill (a filter, or a
sampler that can yield fewer groups than prompts), it samples again, up to
``max_refill_rounds``; on several processes the shortfall is summed over all of them, so
every process takes the same number of rounds.

``policy`` is the run's policy family (family/token_policy.py, family/flow_policy.py): it
knows what a row is (token lists, or flow trajectories) and how rows become tensors.
"""

from __future__ import annotations

import time

import torch

from ..parallel.ddp import batch_stats_context, sum_over_processes
from ..seeds import mix as _mix

EXTERNALS = ("reward", "reward_model", "preference", "env_reward")


def rollout(run, times: dict) -> tuple[dict | None, dict]:
    """The step's training batch (kept rows, scores and carried values) and ``info`` (refill
    rounds, dropped groups); (None, info) when no group survived."""
    algo, pol = run.current, run.family
    G = algo.plan.group_size
    kept, carried, carried_rows = [], [], []  # carried_rows: kept rows per round (tells per-group values apart)
    info = {"refill_rounds": 0, "dropped_groups": 0}
    have = rnd = 0
    target = run.local_batch
    while True:
        prompts = pol.next_prompts(run)
        t0 = time.perf_counter()
        rows = pol.rows(run.sample(prompts, _mix(run.cfg.seed, run.step, run.rank, rnd, 11)))
        times["time/generation"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = batch_stats_context(run, len(rows) > 0, "score")
        if len(rows):
            batch = pol.batch_of(run, rows)
            pol.score_rows(run, rows, batch)
            with torch.no_grad(), stats:
                s = algo.score(batch)
            sel = s.pop("rows")
            s.pop("keep")  # the row mask; `rows` already applies it
            idx = list(range(len(rows))) if sel is None else sel.tolist()
            info["dropped_groups"] += len(rows) // algo.plan.sample_group_size - len(idx) // G
            for k, v in list(batch.items()):
                if k in EXTERNALS:
                    s.setdefault(k, v if sel is None else v[sel])
            if idx:
                kept.append(pol.select_rows(rows, idx))
                carried.append(s)
                carried_rows.append(len(idx))
                have += len(idx) // G
        times["time/scoring"] += time.perf_counter() - t0
        if not algo.plan.refill:  # no filter, and a sampler that yields a group per prompt
            break
        short = torch.tensor([max(0, target - have)], device=run.device, dtype=torch.float32)
        if sum_over_processes(run, short).item() == 0:
            break
        if run._refill_capped(info, have, target, rnd):
            break
        rnd += 1
        info["refill_rounds"] = rnd
    if not kept:
        return None, info
    n_keep = min(have, target) * G
    rows = pol.select_rows(pol.cat_rows(kept), list(range(n_keep)))
    batch = pol.batch_of(run, rows)
    for k in carried[0]:
        vals = [c[k] for c in carried if k in c]
        if all(torch.is_tensor(v) and v.dim() > 0 for v in vals):
            per_group = G > 1 and all(v.shape[0] * G == n for v, n in zip(vals, carried_rows))
            batch[k] = torch.cat([v.to(run.device) for v in vals])[:n_keep // G if per_group else n_keep]
        else:
            batch[k] = vals[0]
    pol.rollout_info(run, rows, info)
    run.batch_rows = rows  # the forwards' inputs (flow trajectories) and the reference cache's keys
    return batch, info
