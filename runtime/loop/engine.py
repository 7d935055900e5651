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
``TokenPolicy`` (family/token_policy.py: causal LMs on ``accelerate``, with LoRA, a value
head, a reward-model head, self-play iterates, tree search) or ``FlowPolicyFamily``
(family/flow_policy.py: flow-matching policies sampled by ``flow_sde``).

What the run is made of is the **run state** (family/state.py): ``state = family.setup(algo,
cfg, ...)`` builds the models, the data, the scorers, the optimizer and the schedule and
returns them in one dataclass (``RunState``: ``TokenState`` or ``FlowState``), which the Engine
keeps as ``self.state``; its docstring says who sets and who changes each field (after setup,
only ``step`` and ``cursor`` change). The Engine shows the state's fields read-only
(``engine.device`` reads ``engine.state.device``; assigning it is an error), so the stages and
the samplers, which get the Engine, read them as before. The Engine's own attributes are the
loop's: ``family``, ``current`` (this iteration's algorithm), ``iterations``,
``steps_per_iter``, ``batch_rows`` (the rollout's rows), ``eval_metrics``, ``resume``.

The family protocol (family/base.py, ``PolicyFamily``), each hook with the one stage that
calls it (``run`` is the Engine):

    setup(algo, cfg, out=, console=, parallel_plan=) -> RunState     Engine.__init__
    rows (loop/rollout_stage.py): next_prompts, rows, batch_of, score_rows, select_rows,
        cat_rows, rollout_info; tok_prompt, tok_completion (the samplers, through
        ``Engine.tok_prompt`` / ``tok_completion``)
    forwards: no_grad_forwards (this file); forward, zero_loss(run, fw=None) (a dropped
        micro-batch's, or without ``fw`` a padding micro-batch's) (loop/update.py)
    the run: rollout_metrics, step_extra (this file); evaluate, before_steps (loop/base.py)
    checkpoints (io/checkpoint.py, parallel/sharded_checkpoint.py): save_weights(run, dir,
        final=False) (a checkpoint's model files, or with ``final`` the final model),
        load_weights, checkpoint_state (state.json; its ``spec`` and ``family`` are checked on
        --resume here), process_state(run, restore=None) (a process's own state; with
        ``restore``, put back)

and ``name`` ("token" | "flow"). What is fixed after setup is a state field, not a hook: the
"run: ..." line (``run_line``), whether the run evaluates (``evaluates``), the parameters
clipped by norm (``grad_params``), the progress bar's and the plot's metrics and whether
checkpoints hold CUDA generators (``bar_metrics``, ``curve_metrics``, ``cuda_rng``). At an
iteration boundary the loop itself gives a ``reference = "iterate"`` reference and a self-play
iterate the policy's weights (loop/base.py). A new sampler needs none of this: it is a class
registered in rollout/ (rollout/base.py).

Reproducibility: sampling uses a seed derived from (seed, step, process, round), minibatch
shuffles from (seed, step, epoch), so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
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
        from ..family.flow_policy import FlowPolicyFamily
        return FlowPolicyFamily()
    from ..family.token_policy import TokenPolicy
    return TokenPolicy()


class Engine(TrainingLoop):
    """A training run of one compiled algorithm (see the module docstring)."""

    def __init__(self, algo, cfg: RunConfig, resume: bool = False, console=None):
        from rich.console import Console
        self.resume = resume
        self._samplers = {}
        self.batch_rows = None
        # parallel, precision, checkpointing and LoRA settings, checked before anything loads
        from ..parallel.settings import resolve
        plan = resolve(cfg, algo)
        from ..rollout.vllm_settings import check as check_rollout_engine
        check_rollout_engine(cfg, algo)  # use_vllm and the vllm_* settings (rollout/vllm_settings.py)
        self.family = family_for(algo)
        self.state = self.family.setup(algo, cfg, out=Path(cfg.out), parallel_plan=plan,
                                       console=console or Console(stderr=False, highlight=False))
        self._init_iterations()

    # -- the run state, read-only ------------------------------------------------------------
    def __getattr__(self, name):
        """A field of the run state (``self.state``), when the Engine has no attribute ``name``."""
        state = self.__dict__.get("state")
        if state is not None and name in _state_fields(type(state)):
            return getattr(state, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        state = self.__dict__.get("state")
        if state is not None and name in _state_fields(type(state)):
            raise AttributeError(f"{name} is a field of the run state: set engine.state.{name} "
                                 f"(family/state.py says who may)")
        object.__setattr__(self, name, value)

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

    # -- checkpoints (written by io/checkpoint.py) -----------------------------------------------
    def _barrier(self) -> None:
        self.acc.wait_for_everyone()

    def _gather_objects(self, obj) -> list:
        return gather_objects(self, obj)

    def _check_checkpoint(self, ck: Path, state: dict) -> None:
        """A checkpoint of this spec and policy family (a token run's state.json names no family)."""
        family = state.get("family", "token")
        if state.get("spec") != self.algo.name or family != self.family.name:
            raise RunError(f"{ck} is a checkpoint of {state.get('spec')!r}"
                           f"{'' if family == self.family.name else f' (not a {self.family.name} policy)'}, "
                           f"not of {self.algo.name!r}", hint="use another --out, or run the same spec")

    def _restore_position(self, state: dict) -> None:
        self.state.step = int(state["step"])
        self.state.cursor = int(state.get("cursor", 0))
        if hasattr(self.records, "seek"):  # streamed data (data/stream.py)
            if "stream" not in state:
                raise RunError("the checkpoint was written without streaming; resume it with streaming: false")
            self.records.seek(state["stream"])

    def _process_state(self) -> dict:
        """Generators, and what the family adds (the tree-search sampler's pending pairs)."""
        return {**super()._process_state(), **self.family.process_state(self)}

    def _set_process_state(self, state: dict) -> None:
        super()._set_process_state(state)
        self.family.process_state(self, restore=state)


@functools.cache
def _state_fields(cls) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(cls))
