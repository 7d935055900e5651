"""The run around the steps: ``TrainingLoop``, the base of the one engine (loop/engine.py).

- ``train()``, the run's skeleton: ``--resume`` from ``OUT/checkpoint``, ``metrics.jsonl``
  removed (fresh run) or cut back to the checkpoint's step (resumed run), trackers, the
  step-0 evaluation, the steps (iteration boundaries, ``eval_every``, ``save_every``, the
  progress bar), an optional CPU profile (``OUT/profile.txt``), the final evaluation,
  checkpoint and model, ``curves.png``, the summary line;
- per-iteration algorithms (``algo_for``, ``_start_iteration``: the plan's iterations and
  param schedules), each step's minibatches (``_minibatches``: the plan's epochs x
  minibatches, seeded by (seed, step, epoch)), and the step record (``_step_record``);
- checkpoints and the final model (io/checkpoint.py), metrics, progress, plot and profile
  (io/metrics.py), as mixins.

The engine (loop/engine.py) holds the run state (``self.state``, family/state.py: ``algo``,
``cfg``, ``out``, ``steps``, ``eval_every``, ``optimizer``, ``scheduler``, ``reference``,
``acc``, ``main``, ``rank``, ``world``, ``step``, ...; read here as ``self.<field>``, changed
only as ``self.state.<field>``), its ``family``, calls ``_init_iterations()`` after setup, and
provides ``_train_step() -> dict`` (one optimizer step: its metrics record, without "step").
The family's hooks called here: ``evaluate``, ``before_steps`` (after the step-0 evaluation,
before the clock); io/checkpoint.py calls the checkpoint hooks.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time

import torch

from ..errors import RunFailure, RunInterrupted
from ..io.checkpoint import CheckpointMixin, replace_dir  # noqa: F401  (replace_dir: re-exported)
from ..io.metrics import MetricsMixin
from ..models.iterations import refresh_iterate
from ..models.loaders import unwrap_causal_lm
from ..seeds import mix as _mix

PHASES = ("time/generation", "time/scoring", "time/ref_old_forward", "time/policy_fwd_bwd", "time/optimizer")


class TrainingLoop(CheckpointMixin, MetricsMixin):
    """What every training engine does around its own optimizer step (see the module docstring)."""

    @property
    def _sharded_io(self):
        """How a sharded run (``parallel=fsdp2``) writes and reads its checkpoints and final model
        (parallel/sharded_checkpoint.py), for io/checkpoint.py, which sits below parallel/."""
        from ..parallel import sharded_checkpoint
        return sharded_checkpoint

    # -- console -----------------------------------------------------------------------
    def say(self, msg: str) -> None:
        """Print ``msg`` (rich markup) on the run's console, on the main process only."""
        self.state.say(msg)

    # -- setup -------------------------------------------------------------------------
    def _init_iterations(self) -> None:
        """The spec's ``train: iterations`` of ``ceil(steps / iterations)`` steps each."""
        self.iterations = max(1, self.algo.plan.iterations)
        self.steps_per_iter = math.ceil(self.steps / self.iterations)
        self._algos = {}
        self._iter, self.current = None, self.algo  # train() enters the run's first iteration

    # -- per-iteration algorithm (param schedules) ---------------------------------------
    def algo_for(self, iteration: int):
        """The compiled algorithm of ``iteration``: ``self.algo`` unless the spec schedules
        params per iteration (then compiled once per iteration, with ``_iteration_params``)."""
        if not self.algo.plan.schedules:
            return self.algo
        if iteration not in self._algos:
            self._algos[iteration] = self.algo.with_params(**self._iteration_params(iteration))
        return self._algos[iteration]

    def _iteration_params(self, iteration: int) -> dict:
        """Every param at ``iteration``: its schedule's entry, unless the run set that param
        (runtime/iterations.py)."""
        from ..models.iterations import iteration_params
        return iteration_params(self.algo, iteration)

    def _start_iteration(self, it: int, replace: bool = True) -> None:
        """Enter iteration ``it``: its algorithm becomes ``self.current``; with ``replace`` at a
        boundary (it > 0), a ``reference = "iterate"`` reference and a separate self-play iterate
        (models/iterations.py) take the policy's weights."""
        self._iter = it
        self.current = self.algo_for(it)
        if replace and it > 0 and self.reference is not None and self.algo.plan.reference == "iterate":
            self.reference.load_state_dict(unwrap_causal_lm(self.model).state_dict())
            self.say(f"iteration {it}: reference replaced by the current policy")
        if replace and it > 0:
            refresh_iterate(self)  # a self-play iterate pi_t := the policy (when it is not the reference)

    # -- pieces of one optimizer step ------------------------------------------------------
    def _minibatches(self, algo, n_groups: int):
        """The step's minibatches (lists of group indices), epoch after epoch: with several
        epochs or minibatches the groups are shuffled per epoch, seeded by (seed, step, epoch)."""
        epochs, n_mb = algo.plan.epochs, algo.plan.minibatches
        for epoch in range(epochs):
            order = list(range(n_groups))
            if epochs > 1 or n_mb > 1:
                random.Random(_mix(self.cfg.seed, self.step, epoch, 3)).shuffle(order)
            for i in range(n_mb):
                yield order[i * n_groups // n_mb:(i + 1) * n_groups // n_mb]

    def _refill_capped(self, info: dict, have: int, target: int, rnd: int) -> bool:
        """Whether a rollout that kept ``have`` of ``target`` groups after ``rnd`` refill rounds
        must stop at ``max_refill_rounds`` (then said in yellow and marked in ``info``)."""
        if rnd < self.cfg.max_refill_rounds:
            return False
        info["refill_cap_hit"] = 1
        self.say(f"[yellow]step {self.step + 1}: filters kept {have} of {target} groups after "
                 f"{rnd} refill round(s) (max_refill_rounds = {self.cfg.max_refill_rounds}); "
                 f"training on what was kept[/yellow]")
        return True

    @staticmethod
    def _bad_term(out) -> str | None:
        """None when a micro-batch's loss is finite, else the first non-finite term's name."""
        if torch.isfinite(torch.as_tensor(out.loss)).all():
            return None
        return next((k for k, t in out.terms.items() if not torch.isfinite(torch.as_tensor(t)).all()), "loss")

    @staticmethod
    def _add_metrics(metrics: dict, term_sums: dict, stat_sums: dict) -> None:
        """Add a micro-batch's ``step_loss`` metrics to the step's sums: ``loss/*`` terms (shares
        of the term: micro-batches add up to it) apart from the statistics (averaged later)."""
        for k, v in metrics.items():
            if k.startswith("loss/"):
                term_sums[k] = term_sums.get(k, 0.0) + v
            else:
                stat_sums[k] = stat_sums.get(k, 0.0) + v

    def _non_finite(self, where: str) -> RunFailure:
        """The error of a non-finite loss at this step (gradients dropped); ``where`` names the term."""
        self.optimizer.zero_grad(set_to_none=True)
        ck = self.out / "checkpoint"
        return RunFailure(
            f"non-finite loss at step {self.step + 1}: {where} is not finite",
            hint=(f"the last good checkpoint is kept at {ck}" if ck.exists() else
                  "no checkpoint was written yet") + "; lower lr or check the spec's loss")

    def _step_record(self, loss: float, metrics: dict, grad_norms: list, groups: int, info: dict,
                     times: dict, t_start: float, extra: dict | None = None) -> dict:
        """A step's metrics record: loss, the spec's metrics, grad_norm, lr, groups, ``extra``,
        refill / filter counts from the rollout's ``info``, the phase times and step_time."""
        res = {"loss": loss, **metrics}
        if grad_norms:
            res["grad_norm"] = sum(grad_norms) / len(grad_norms)
        res["lr"] = self.scheduler.get_last_lr()[0]
        res["groups"] = groups
        res.update(extra or {})
        if info.get("refill_rounds"):
            res["refill/rounds"] = info["refill_rounds"]
        if info.get("dropped_groups"):
            res["filter/dropped_groups"] = info["dropped_groups"]
        if info.get("truncated_prompts"):  # max_prompt_length: prompts cut so far (data/token_rows.py)
            res["data/truncated_prompts"] = info["truncated_prompts"]
        if info.get("refill_cap_hit"):
            res["refill/cap_hit"] = 1
        res.update(times)
        res["step_time"] = time.perf_counter() - t_start
        return res

    # -- the run -----------------------------------------------------------------------------
    def _eval_and_log(self) -> float | None:
        """Evaluate now and log ``{"step", "eval_score"}`` and the evaluation's other numbers
        (``eval/...``, left in ``eval_metrics``); the score."""
        score = self.family.evaluate(self)
        extra, self.eval_metrics = getattr(self, "eval_metrics", None) or {}, None
        self._log({"step": self.step, "eval_score": score, **extra})
        return score

    def train(self) -> dict:
        """Run the steps (see ``_train``); the hold on ``OUT`` (runtime/outdir.py) ends with it."""
        try:
            return self._train()
        finally:
            lock = getattr(self, "out_lock", None)
            if lock is not None:
                lock.release()

    def _train(self) -> dict:
        """Run (or resume) to ``steps`` optimizer steps; the summary: steps, wall_s, eval_score, loss."""
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = False
        if self.resume:
            resumed = self.load_checkpoint()
            self.say(f"resumed from {self.out / 'checkpoint'} at step {self.step}" if resumed
                     else f"[yellow]--resume: no checkpoint in {self.out}; starting fresh[/yellow]")
        self._reset_metrics(resumed)
        if self.cfg.log_with:
            from ..io.tracking import hparams  # values every tracker accepts (TensorBoard: no None)
            self.acc.init_trackers("alignspec", config=hparams(self))
        self.say(self.run_line)
        last_eval = None
        it0 = min(self.step // self.steps_per_iter, self.iterations - 1)
        self._start_iteration(it0, replace=self.step > 0 and self.step == it0 * self.steps_per_iter)
        if self.evaluates and self.step == 0:
            last_eval = self._eval_and_log()
            self.say(f"step 0: eval_score {last_eval:.3f}")
        self.family.before_steps(self)
        t_run = time.perf_counter()
        prof = self._start_profile()
        with self._stop_on_signals():
            last, last_eval = self._run_steps(last_eval)
        self._stop_profile(prof)
        wall = time.perf_counter() - t_run
        if self.evaluates:
            last_eval = self._eval_and_log()
        self.save_checkpoint()
        self.save_final()
        if self.main:
            self._plot()
        self._barrier()  # every process leaves together, after the main one has written the model
        if self.cfg.log_with:  # not acc.end_training(): it also ends the process group, which the
            for tracker in self.acc.trackers:  # next stage of a pipeline still needs
                tracker.finish()
        summary = {"steps": self.step, "wall_s": wall, "eval_score": last_eval, "loss": last.get("loss")}
        self.say(f"done: {self.step} steps in {wall:.1f}s" +
                 (f", eval_score {last_eval:.3f}" if last_eval is not None else "") +
                 f"; model saved to {self.out / 'model'}")
        return summary

    def _run_steps(self, last_eval: float | None) -> tuple[dict, float | None]:
        """The optimizer steps from ``self.step`` to ``steps``, under the progress bar: each
        logged, evaluated every ``eval_every`` and checkpointed every ``save_every`` steps
        (not at the last step, which ``train`` handles); the last record and eval score."""
        progress = self._progress()
        last = {}
        with progress:
            bar = progress.add_task(self.algo.name, total=self.steps, completed=self.step, info="")
            while self.step < self.steps:
                it = min(self.step // self.steps_per_iter, self.iterations - 1)
                if it != self._iter:
                    self._start_iteration(it)
                res = self._train_step()
                self.state.step += 1
                rec = {"step": self.step, **res}
                self._log(rec)
                last = rec
                if self.evaluates and self.eval_every and self.step % self.eval_every == 0 \
                        and self.step < self.steps:
                    last_eval = self._eval_and_log()
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.steps:
                    self.save_checkpoint()
                progress.update(bar, completed=self.step, info=self._progress_info(res, last_eval))
                if self._agree(self._signal is not None) and self.step < self.steps:
                    self.save_checkpoint()
                    name = signal.Signals(self._signal or signal.SIGTERM).name
                    raise RunInterrupted(f"{name}: stopped after step {self.step}; checkpoint saved in "
                                         f"{self.out / 'checkpoint'}", self._signal or signal.SIGTERM)
        return last, last_eval

    _signal: int | None = None

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While the steps run, SIGTERM (what schedulers send before SIGKILL) and SIGINT ask the
        run to stop after the current step with a checkpoint (``_run_steps``); a second one
        stops at once. Only the main thread can take signals; elsewhere nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask(signum, frame):
            if self._signal is not None:
                raise KeyboardInterrupt
            self._signal = signum
            self.say(f"[yellow]{signal.Signals(signum).name}: stopping after this step (again: at once)[/yellow]")

        previous = {s: signal.signal(s, ask) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _agree(self, flag: bool) -> bool:
        """``flag`` of any process (every process stops at the same step)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0], device=getattr(self, "device", "cpu"))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
