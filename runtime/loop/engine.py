"""The one run loop, for every compiled spec and both policy families.

``Engine(algo, cfg).train()`` runs, per optimizer step, the stages

    rollout -> score, filter, select      loop/rollout_stage.py (samplers: rollout/)
    -> no-grad forwards (old, ref, value) the policy family's ``no_grad_forwards``
    -> advantage                          ``algo.advantage`` (compiled)
    -> updates                            loop/update.py (DDP or FSDP2: parallel/wrap.py)
    -> checkpoint and metrics             loop/base.py, io/

reading the compiled step functions (``algo.score`` / ``advantage`` / ``step_loss``) and the
run plan (``algo.plan``: sampler, data kind, filters and refill, epochs, minibatches,
iterations, reference policy, log-prob temperature), never the spec's syntax tree.

What the models are is the **policy family**'s, chosen by the plan's sampler:
``TokenPolicy`` (models/token_policy.py: causal LMs on ``accelerate``, with LoRA, a value
head, a reward-model head, self-play iterates, tree search) or ``FlowPolicyFamily``
(models/flow_policy.py: flow-matching policies sampled by ``flow_sde``). The family builds
the models, the data and the scorers (``setup``), turns rows into tensors, runs the
forwards, and says what a checkpoint and the final model hold.

A policy family provides: ``setup(run)``; rows -- ``next_prompts``, ``rows``, ``batch_of``,
``score_rows``, ``select_rows``, ``cat_rows``, ``take``, ``rollout_info``; forwards --
``no_grad_forwards``, ``forward`` (a micro-batch, with grad), ``padding_loss``, ``zero_loss``,
``grad_params``; the run -- ``rollout_metrics``, ``step_extra``, ``evaluate``, ``evaluates``,
``policy_state``, ``start_iteration``, ``run_line``, ``before_steps``; checkpoints --
``save_weights``, ``load_weights``, ``write_model``, ``checkpoint_state``,
``check_checkpoint``, ``process_state``, ``set_process_state``; and the class attributes
``bar_metrics``, ``curve_metrics``, ``cuda_rng``. A new sampler needs none of this: it is a
class registered in rollout/ (rollout/base.py).

Reproducibility: sampling uses a seed derived from (seed, step, process, round), minibatch
shuffles from (seed, step, epoch), so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import RunError
from ..parallel.ddp import batch_stats_context, gather_objects
from ..rollout.base import build_sampler
from .base import PHASES, TrainingLoop
from .rollout_stage import EXTERNALS, rollout
from .update import updates

__all__ = ["Engine", "EXTERNALS", "PHASES"]


def family_for(algo):
    """The policy family of ``algo``: flow-matching when it samples with ``flow_sde``."""
    if any(s.kind == "flow_sde" for s in algo.plan.sampler.walk()) or "flow" in algo.requires:
        from ..models.flow_policy import FlowPolicyFamily
        return FlowPolicyFamily()
    from ..models.token_policy import TokenPolicy
    return TokenPolicy()


class Engine(TrainingLoop):
    """A training run of one compiled algorithm (see the module docstring)."""

    def __init__(self, algo, cfg: RunConfig, resume: bool = False, console=None):
        from rich.console import Console
        self.algo, self.cfg, self.resume = algo, cfg, resume
        self.out = Path(cfg.out)
        self.console = console or Console(stderr=False, highlight=False)
        self._samplers = {}
        self.batch_rows = None
        # parallel, precision, checkpointing and LoRA settings, checked before anything loads
        from ..parallel.settings import resolve
        self.parallel_plan = resolve(cfg, algo)
        from ..rollout.vllm_settings import check as check_rollout_engine
        check_rollout_engine(cfg, algo)  # use_vllm and the vllm_* settings (rollout/vllm_settings.py)
        self.family = family_for(algo)
        self.family.setup(self)

    # -- what the family decides -----------------------------------------------------------
    @property
    def bar_metrics(self):
        return self.family.bar_metrics

    @property
    def curve_metrics(self):
        return self.family.curve_metrics

    @property
    def cuda_rng(self):
        return self.family.cuda_rng

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, prompts, seed: int):
        """The current plan's sampler (rollout/) on ``prompts``."""
        plan = self.current.plan.sampler
        if plan not in self._samplers:
            self._samplers[plan] = build_sampler(plan, self)
        return self._samplers[plan].sample(prompts, seed)

    def tok_prompt(self, prompt) -> list[int]:
        return self.family.tok_prompt(self, prompt)

    def tok_completion(self, text: str) -> list[int]:
        return self.family.tok_completion(self, text)

    # -- one optimizer step ----------------------------------------------------------------
    def _rollout(self, times: dict):
        return rollout(self, times)

    def _no_grad_forwards(self, batch: dict, times: dict) -> None:
        t0 = time.perf_counter()
        self.family.no_grad_forwards(self, batch)
        times["time/ref_old_forward"] += time.perf_counter() - t0

    def _train_step(self) -> dict:
        algo = self.current
        times = {k: 0.0 for k in PHASES}
        t_start, c_start = time.perf_counter(), time.process_time()
        batch, info = self._rollout(times)
        metrics: dict = {}
        if batch is None and self.world == 1:
            self.say(f"[yellow]step {self.step + 1}: no group survived the filters; step skipped[/yellow]")
            return {"loss": float("nan"), "skipped": 1, **times, "step_time": time.perf_counter() - t_start}
        stats = batch_stats_context(self, batch is not None, "advantage")
        if batch is not None:
            self._no_grad_forwards(batch, times)
            with torch.no_grad(), stats:
                adv = algo.advantage(batch)
            for k, v in adv.pop("metrics", {}).items():
                metrics[k] = float(v)
            batch.update(adv)
            metrics.update(self.family.rollout_metrics(self, batch))
        n_groups = 0 if batch is None else batch["mask"].shape[0] // algo.plan.group_size
        loss_sum, n_updates, metrics, grad_norms = updates(self, algo, batch, metrics, times)
        res = self._step_record(loss_sum / max(1, n_updates), metrics, grad_norms,
                                n_groups * self.world if self.world > 1 else n_groups, info, times, t_start,
                                extra=self.family.step_extra(self))
        res["step_cpu_time"] = time.process_time() - c_start  # all threads; less sensitive to other load
        return res

    # -- evaluation, iterations ----------------------------------------------------------------
    def evaluate(self) -> float | None:
        return self.family.evaluate(self)

    def _evaluates(self) -> bool:
        return self.family.evaluates(self)

    def _policy_state(self) -> dict:
        return self.family.policy_state(self)

    def _start_iteration(self, it: int, replace: bool = True) -> None:
        super()._start_iteration(it, replace)
        self.family.start_iteration(self, it, replace)

    # -- checkpoints and the final model (written by io/checkpoint.py) ---------------------------
    def _barrier(self) -> None:
        self.acc.wait_for_everyone()

    def _gather_objects(self, obj) -> list:
        return gather_objects(self, obj)

    def _save_weights(self, tmp: Path) -> None:
        self.family.save_weights(self, tmp)

    def _load_weights(self, ck: Path) -> None:
        self.family.load_weights(self, ck)

    def _write_model(self, tmp: Path) -> None:
        self.family.write_model(self, tmp)

    def _checkpoint_state(self) -> dict:
        return self.family.checkpoint_state(self)

    def _check_checkpoint(self, ck: Path, state: dict) -> None:
        self.family.check_checkpoint(self, ck, state)

    def _restore_position(self, state: dict) -> None:
        self.step = int(state["step"])
        self.cursor = int(state.get("cursor", 0))
        if hasattr(getattr(self, "records", None), "seek"):  # streamed data (data/stream.py)
            if "stream" not in state:
                raise RunError("the checkpoint was written without streaming; resume it with streaming: false")
            self.records.seek(state["stream"])

    def _process_state(self) -> dict:
        """Generators, and what the family adds (the tree-search sampler's pending pairs)."""
        return {**super()._process_state(), **self.family.process_state(self)}

    def _set_process_state(self, state: dict) -> None:
        super()._set_process_state(state)
        self.family.set_process_state(self, state)

    # -- the run's console line, before the steps ----------------------------------------------
    def _run_line(self) -> str:
        return self.family.run_line(self)

    def _before_steps(self) -> None:
        self.family.before_steps(self)
