"""The engine's log-prob forwards and its reference log-prob cache, with their switches.

``forward_logprobs(cfg, model, ...)`` is what the engine calls for every policy / reference /
old forward. By default it is :func:`logprobs.completion_logprobs` with ``share_prompt`` (one
body pass per distinct prompt) and chosen + rejected in one forward; the run configuration's
``logprobs_path = "full_logits"`` and ``pair_forwards = 2`` switch to the slow variants,
which exist so that ``bench/vs_trl.py`` can measure each win on its own.

:class:`ReferenceCache` keeps, for offline data (pairs, demonstrations) and a fixed reference,
the reference log-probs of each distinct (prompt ids, completion ids) row: computed the first
time a row is used (under ``no_grad``, in the step's batch), reused afterwards; with
``precompute_reference`` the whole data set is scored before step 1 (TRL's
``precompute_ref_log_probs``), so that the steps only train.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .logprobs import completion_logprobs, full_logits_logprobs


def forward_logprobs(cfg, model, ids, att, cm, *, entropy=False, value=False, pairs=False,
                     temperature=1.0) -> dict:
    """``completion_logprobs`` under the run configuration's performance switches."""
    if cfg.logprobs_path == "full_logits" and not value:
        return full_logits_logprobs(model, ids, att, cm, with_entropy=entropy, temperature=temperature)
    B = ids.shape[0]
    if pairs and cfg.pair_forwards == 2 and B > 1 and B % 2 == 0:  # chosen rows, then rejected rows
        halves = [forward_logprobs(cfg.model_copy(update={"pair_forwards": 1}), model, ids[k::2], att[k::2],
                                   cm[k::2], entropy=entropy, value=value, temperature=temperature)
                  for k in (0, 1)]
        return {k: torch.stack([halves[0][k], halves[1][k]], 1).reshape(B, *halves[0][k].shape[1:])
                for k in halves[0]}
    return completion_logprobs(model, ids, att, cm, chunk_size=cfg.chunk_size, with_entropy=entropy,
                               return_hidden=value, share_prompt=cfg.share_prompt, temperature=temperature)


def _offline(engine) -> bool:
    return engine.algo.plan.offline


class ReferenceCache:
    """Reference log-probs per distinct (prompt ids, completion ids), for offline data and a
    fixed reference (see the module docstring). ``enabled`` is False otherwise, and then
    :meth:`logprobs` just runs the forward."""

    def __init__(self, engine):
        cfg = engine.cfg
        self.enabled = bool(cfg.reference_cache and _offline(engine)
                            and engine.algo.plan.reference == "fixed")
        self.store: dict[tuple, torch.Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def _key(row) -> tuple:
        return tuple(row["p"]), tuple(row["c"])

    def logprobs(self, batch, rows, compute) -> torch.Tensor:
        """``[B, T]`` reference log-probs of ``batch``; ``rows`` are its rows (dicts with token
        lists ``p`` and ``c``, or None), ``compute(sub_batch) -> [b, T]`` runs the forward."""
        B, T = batch["mask"].shape
        if not self.enabled or rows is None or len(rows) != B:
            return compute(batch)
        keys = [self._key(r) for r in rows]
        miss = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += B - len(miss)
        self.misses += len(miss)
        if miss:
            idx = torch.tensor(miss, dtype=torch.long, device=batch["mask"].device)
            sub = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B}
            lp = compute(sub)
            for j, i in enumerate(miss):
                self.store[keys[i]] = lp[j, :len(rows[i]["c"])].clone()
        first = self.store[keys[0]]
        out = torch.zeros(B, T, dtype=first.dtype, device=first.device)
        for i, k in enumerate(keys):
            v = self.store[k]
            out[i, :v.shape[0]] = v
        return out

    def precompute(self, engine) -> None:
        """Score every data row with the reference before training (each process: all rows)."""
        if not self.enabled:
            return
        t0 = time.perf_counter()
        recs, B = engine.records, max(1, engine.local_batch)
        n = 0
        for s in range(0, len(recs), B):
            rows = engine.family.rows(engine.sample(recs[s:s + B], 0))
            todo = [r for r in rows if self._key(r) not in self.store]
            if not todo:
                continue
            batch = engine.family.batch_of(engine, todo)
            self.logprobs(batch, todo, lambda b: engine.family.reference_forward(engine, b))
            n += len(todo)
        self.hits = self.misses = 0
        engine.say(f"reference log-probs of {n} rows precomputed in {time.perf_counter() - t0:.1f}s")


def reference_model_ctx(engine):
    """(model, context) computing reference log-probs: the frozen copy, or with LoRA the policy
    with its adapters disabled."""
    if engine.reference is not None:
        return engine.reference, contextlib.nullcontext()
    return engine.policy, engine.policy.disable_adapter()


def adamw(params, **kw) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, fused (one kernel over all parameters: about 5x faster on CPU
    than the per-tensor loop) where this torch build supports it for these parameters."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, **kw)
