"""Evaluation on the user's own held-out data: ``eval_data`` or ``eval_fraction``, with
``eval_every`` / ``eval_size`` / ``eval_temperature`` (the built-in task has its own).

``held_out(run, records, need)`` (called as the data loads, before any model) returns the
training rows and the held-out rows:

- ``eval_fraction: f`` holds out ``round(f * n)`` rows, drawn with a generator seeded by
  ``seed``, and removes them from training;
- ``eval_data``: a bare word that is not a path (``test``, ``validation``) names that split of
  the training data set (a hub data set with ``data_config``, a hub-style or ``save_to_disk``
  folder); anything else is a source read like ``data`` by data/records.py (a file, a glob, a
  folder, an ``owner/name`` hub data set), its ``train`` split.

:class:`UserEval` is the run's evaluation on those rows (``eval_score`` is the headline; the
other numbers go to ``metrics.jsonl`` as ``eval/...``):

- specs that sample (``data prompts``: a ``generate`` or ``rollout`` sampler): one completion
  per held-out prompt from the policy, greedy unless ``eval_temperature`` > 0, scored by the
  run's configured reward (``rewards``, else ``reward_model``, else ``preference``, else the
  environment's reward); ``eval_score`` = the mean reward; ``eval/reward/mean``, ``/std``,
  ``eval/length/mean`` and ``eval/rewards/<function>/mean`` per reward function;
- preference pairs (``data pairs``): ``eval_score`` = the implicit-reward accuracy, the fraction
  of pairs whose chosen completion has the higher implicit reward: ``sum(logp - logp_ref)``
  over the completion's tokens when the spec reads a reference (DPO, IPO, ...; times ``beta``
  in ``eval/rewards/*`` when the spec has a ``beta``), the mean token log-prob otherwise
  (SimPO, ORPO, CPO); ``eval/accuracy``, ``eval/loss`` (the spec's own loss over all held-out
  pairs), ``eval/rewards/chosen``, ``/rejected``, ``/margins``;
- demonstrations (and unpaired rows, and self-play on demonstrations): ``eval_score`` =
  ``eval/loss``, the spec's own loss over every held-out row (lower is better).

The loss runs the training step's stages without an update: the spec's sampler on the held-out
rows (seeded), the no-grad forwards (reference, old), the advantage, the policy's forward
without gradients and the compiled loss, with the normalizers (tokens, responses, groups) of the
whole held-out set, so it is the loss of one batch holding every held-out row. With several
processes every process evaluates every held-out row (the same numbers on each).
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import torch

from ..errors import RunError
from ..seeds import mix as _mix

_SPLIT = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_EVAL_SEED = 0xE7A1


def held_out(run, records: list[dict], need: list[str]) -> tuple[list[dict], list[dict] | None]:
    cfg = run.cfg
    if cfg.eval_data is None and cfg.eval_fraction is None:
        return records, None
    which = "eval_data" if cfg.eval_data is not None else "eval_fraction"
    if run.builtin:
        raise RunError(f"{which} evaluates on your data (--data); the built-in task has its own held-out "
                       "problems", hint=f"give --data, or drop {which}")
    if cfg.eval_fraction is not None:
        if records is None:
            raise RunError("eval_fraction holds rows out of a data set loaded whole, and streaming is on",
                           hint="with streaming: true give the held-out rows as eval_data (a split or a file)")
        n, f = len(records), cfg.eval_fraction
        k = int(round(f * n))
        if k < 1:
            raise RunError(f"eval_fraction {f} of the {n} rows of {cfg.data} holds out no row: the eval set is empty",
                           hint=f"use eval_fraction >= {1 / n:.3g}, or eval_data")
        if k >= n:
            raise RunError(f"eval_fraction {f} of the {n} rows of {cfg.data} leaves no row to train on")
        idx = list(range(n))
        random.Random(_mix(cfg.seed, _EVAL_SEED)).shuffle(idx)
        held = set(idx[:k])
        run.say(f"eval: {k} of {n} rows held out (eval_fraction {f}, seed {cfg.seed}); {n - k} for training")
        return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]
    rows = load_eval_records(cfg, need)
    if not rows:
        raise RunError(f"eval_data {cfg.eval_data}: the eval set is empty")
    run.say(f"eval: {len(rows)} rows from {cfg.eval_data}")
    return records, rows


def load_eval_records(cfg, need: list[str]) -> list[dict]:
    """The rows ``eval_data`` names (see the module docstring), checked as the training data's."""
    from ..data.records import load_records
    ev = cfg.eval_data
    if not Path(ev).expanduser().exists() and _SPLIT.match(ev):  # a split of the training data set
        return load_records(cfg.data, cfg.fields, need, config=getattr(cfg, "data_config", None), split=ev)
    return load_records(ev, cfg.fields, need)


class UserEval:
    """``__call__(run) -> eval_score``; the other numbers in ``run.eval_metrics``."""

    def __init__(self, run, records: list[dict]):
        algo, cfg = run.algo, run.cfg
        self.records = records
        self.mode = {"prompts": "reward", "pairs": "pairs"}.get(run.kind, "loss")
        self.sampler = None
        if self.mode == "reward":
            part = next((s for s in algo.plan.sampler.walk() if s.kind in ("generate", "rollout")), None)
            if part is None:
                kinds = ", ".join(s.kind for s in algo.plan.sampler.walk())
                raise RunError(f"{algo.name} samples with {kinds}; the evaluation on held-out prompts needs a "
                               "generate(...) or rollout(...) sampler", hint="drop eval_data / eval_fraction")
            opts = dict(part.options)
            opts.update(n=1, temperature=float(cfg.eval_temperature))
            if "model" in opts:
                opts["model"] = "policy"  # the policy being trained is what is evaluated
            self.plan = dataclasses.replace(part, options=tuple(opts.items()), rows=1)
            self.score_name = next((n for n in ("reward", "reward_model", "preference") if n in run.scorers), None)
            if self.score_name is None and part.kind != "rollout":
                raise RunError(f"{algo.name} reads no reward, reward_model or preference: the evaluation on "
                               "held-out prompts (the mean reward) has nothing to score with",
                               hint="set rewards: [module:function], or drop eval_data / eval_fraction")
            self.score_name = self.score_name or "env_reward"
            run.say(f"eval: mean {self.score_name} of one completion per held-out prompt "
                    f"({'greedy' if cfg.eval_temperature == 0 else f'temperature {cfg.eval_temperature}'})")
        else:
            if algo.plan.filters or algo.plan.selects:
                raise RunError(f"{algo.name} filters or selects rows: the held-out loss of such a spec is not "
                               "supported yet", hint="drop eval_data / eval_fraction")
            self.ref = "logp_ref" in algo.inputs
            what = "the loss" if self.mode == "loss" else (
                "implicit-reward accuracy (" + ("sum of logp - logp_ref" if self.ref else "mean token logp")
                + " of chosen > rejected) and the loss")
            run.say(f"eval: {what} on {len(records)} held-out rows")

    def __call__(self, run) -> float:
        size = run.cfg.eval_size
        recs = self.records[:size] if size else self.records
        model = run.model
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                score, metrics = self._rewards(run, recs) if self.mode == "reward" else self._losses(run, recs)
        finally:
            model.train(was)
        run.eval_metrics = metrics
        return score

    def _chunk(self, run) -> int:
        return max(8, run.local_batch)

    # -- specs that sample: the mean reward --------------------------------------------------------
    def _rewards(self, run, recs) -> tuple[float, dict]:
        from ..data import token_rows
        from ..rollout.base import build_sampler
        if self.sampler is None:
            self.sampler = build_sampler(self.plan, run)
        saved = getattr(run, "iterate", None)
        run.state.iterate = None  # sample from the policy, not a self-play iterate
        vals, lens, per_fn = [], [], {}
        try:
            step = self._chunk(run)
            for s in range(0, len(recs), step):
                part = recs[s:s + step]
                rows = run.family.rows(self.sampler.sample(part, _mix(run.cfg.seed, _EVAL_SEED, s)))
                lens += [float(sum(r["m"]) if "m" in r else len(r["c"])) for r in rows]
                if self.score_name == "env_reward":
                    vals.append(torch.tensor([float(r.get("env_reward", 0.0)) for r in rows]))
                    continue
                scorer = run.scorers[self.score_name]
                scorer.step = run.step
                if hasattr(scorer, "state"):
                    scorer.state.global_step, scorer.state.max_steps = run.step, run.steps
                prompts = [token_rows.scorer_prompt(run.tokenizer, r) for r in rows]
                r = scorer(prompts, [r["text"] for r in rows], [r["rec"] for r in rows],
                           completion_ids=[r["c"] for r in rows])
                vals.append(r.detach().float().cpu())
                for k, v in (scorer.pop_metrics() if hasattr(scorer, "pop_metrics") else {}).items():
                    if k.endswith("/mean"):
                        per_fn.setdefault(k, []).append((float(v), len(rows)))
        finally:
            run.state.iterate = saved
        r = torch.cat(vals)
        out = {f"eval/{self.score_name}/mean": float(r.mean()),
               f"eval/{self.score_name}/std": float(r.std()) if r.numel() > 1 else 0.0,
               "eval/length/mean": sum(lens) / max(1, len(lens))}
        for k, parts in per_fn.items():
            out[f"eval/{k}"] = sum(v * n for v, n in parts) / max(1, sum(n for _, n in parts))
        return float(r.mean()), out

    # -- offline data: the spec's loss (and the pairs' accuracy) ---------------------------------
    def _losses(self, run, recs) -> tuple[float, dict]:
        from ..parallel.ddp import micro_slices
        from ..rollout.base import build_sampler
        algo, pol = run.current, run.family
        G = algo.plan.group_size
        if self.sampler is None or self.sampler.plan is not algo.plan.sampler:
            self.sampler = build_sampler(algo.plan.sampler, run)
        chunks, step = [], self._chunk(run)
        for s in range(0, len(recs), step):
            rows = pol.rows(self.sampler.sample(recs[s:s + step], _mix(run.cfg.seed, _EVAL_SEED, s)))
            chunks.append((rows, pol.batch_of(run, rows)))
        n_rows = sum(len(r) for r, _ in chunks)
        dev = run.device
        tokens = sum(float(b["mask"].sum()) for _, b in chunks)
        totals = {"tokens": torch.tensor(max(1.0, tokens), device=dev),
                  "responses": torch.tensor(float(max(1, n_rows)), device=dev),
                  "groups": torch.tensor(float(max(1, n_rows // G)), device=dev)}
        saved = run.batch_rows
        loss, h = 0.0, []
        try:
            for rows, batch in chunks:
                run.batch_rows = rows  # the reference cache's keys, KTO's mismatched pairs
                if run.scorers:
                    pol.score_rows(run, rows, batch)
                    for sc in run.scorers.values():  # not the training step's metrics
                        if hasattr(sc, "pop_metrics"):
                            sc.pop_metrics()
                s = algo.score(batch)
                for k in ("rows", "keep", "metrics"):
                    s.pop(k, None)
                batch.update(s)
                pol.no_grad_forwards(run, batch)
                adv = algo.advantage(batch)
                adv.pop("metrics", None)
                batch.update(adv)
                parts = [pol.forward_rows(run, run.model, batch, sl, grad=False, entropy="entropy" in algo.inputs,
                                          value="value" in algo.inputs)
                         for sl in micro_slices(run, len(rows), G)]
                fw = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                loss += float(algo.step_loss({**batch, **fw}, totals).loss)
                if self.mode == "pairs":
                    h.append(self._implicit(batch, fw["logp"]))
        finally:
            run.batch_rows = saved
        out = {"eval/loss": loss}
        if self.mode != "pairs":
            return loss, out
        h = torch.cat(h)
        chosen, rejected = h[0::2], h[1::2]
        acc = float((chosen > rejected).float().mean())
        beta = float(algo.params.get("beta", 1.0)) if self.ref else 1.0
        out.update({"eval/accuracy": acc, "eval/rewards/chosen": beta * float(chosen.mean()),
                    "eval/rewards/rejected": beta * float(rejected.mean()),
                    "eval/rewards/margins": beta * float((chosen - rejected).mean())})
        return acc, out

    def _implicit(self, batch: dict, logp: torch.Tensor) -> torch.Tensor:
        """Per row: sum of logp - logp_ref (a reference), else the mean token logp."""
        m = batch["mask"].to(torch.float32)
        if self.ref:
            return ((logp.float() - batch["logp_ref"].float()) * m).sum(1).cpu()
        return ((logp.float() * m).sum(1) / m.sum(1).clamp(min=1)).cpu()
