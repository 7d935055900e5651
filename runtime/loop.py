"""The run plumbing both training engines share: ``TrainingLoop``, a base class.

``Engine`` (runtime/engine.py: causal LMs on ``accelerate``) and ``FlowEngine``
(runtime/flow_engine.py: flow-matching policies) subclass it; what it holds does not depend
on the policy family:

- ``train()``, the run's skeleton: ``--resume`` from ``OUT/checkpoint``, ``metrics.jsonl``
  removed (fresh run) or cut back to the checkpoint's step (resumed run), trackers, the
  step-0 evaluation, the steps (iteration boundaries, ``eval_every``, ``save_every``, the
  progress bar), an optional CPU profile (``OUT/profile.txt``), the final evaluation,
  checkpoint and model, ``curves.png``, the summary line;
- the LR schedule (``_build_scheduler``): ``warmup_steps`` of linear warmup, then constant,
  linear or cosine decay over all optimizer updates of the run;
- the metrics writer (``_log``: one JSON line per record in ``OUT/metrics.jsonl``; its
  numbers also to the ``accelerate`` trackers named by ``log_with``) and the plot (``_plot``);
- atomic directories (``_save_dir``: written under ``OUT/.NAME.tmp<pid>``, renamed into
  place, the previous one kept as ``OUT/.NAME.old`` until then) for ``checkpoint/`` and
  ``model/``; the checkpoint files every engine writes (``optimizer.pt``: optimizer and
  scheduler state, loaded with ``weights_only=True``; ``process_<rank>.json``: each process's
  own state -- Python / NumPy / torch generator states, plus what ``_process_state`` adds --
  ``state.json``) and reads back;
- per-iteration algorithms (``algo_for``, ``_start_iteration``), each step's minibatches
  (``_minibatches``: seeded by (seed, step, epoch)), and the step record (``_step_record``).

A subclass sets, in its constructor, ``algo``, ``cfg`` (a ``RunConfig``), ``resume``,
``out``, ``console`` (a rich Console), ``steps``, ``eval_every``, ``reference`` (or None),
``optimizer`` -- then calls ``_build_scheduler()`` and ``_init_iterations()`` -- and ``acc``
(an ``accelerate.Accelerator``) whenever ``cfg.log_with`` names trackers; ``main``, ``rank``
and ``world`` default to one process. It provides the hooks

    _train_step() -> dict          one optimizer step: its metrics record, without "step"
    evaluate() -> float | None     the held-out score
    _evaluates() -> bool           whether the run evaluates at all (default: yes)
    _run_line() -> str             the "run: ..." console line
    _before_steps()                after the step-0 evaluation, before the clock (default: nothing)
    _save_weights(tmp)             the model files of a checkpoint, into directory ``tmp``
    _checkpoint_state() -> dict    the checkpoint's state.json
    _check_checkpoint(ck, state)   a RunError when ``ck`` is not a checkpoint of this run
    _load_weights(ck)              the model files of checkpoint ``ck``, back into the models
    _restore_position(state)       the run's position from state.json (default: ``step``)
    _write_model(tmp)              the final model, into directory ``tmp``
    _iteration_params(it) -> dict  the params an iteration's algorithm is compiled with
                                   (default: schedules, a param the run set holds throughout)
    _policy_state() -> dict        the weights a ``reference = "iterate"`` reference takes
    _barrier()                     wait for every process (default: nothing)

and may set ``bar_metrics`` / ``curve_metrics`` (what the progress bar and the plot show)
and ``cuda_rng`` (whether checkpoints hold the CUDA generators' states).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .errors import RunError, RunFailure, RunInterrupted

PHASES = ("time/generation", "time/scoring", "time/ref_old_forward", "time/policy_fwd_bwd", "time/optimizer")


def _mix(*xs) -> int:
    """A seed in [0, 2**31) from integers (FNV-style): per step / process / round generators."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h % (1 << 31)


def replace_dir(tmp: Path, dest: Path, old: Path) -> None:
    """Put the finished directory ``tmp`` in ``dest``'s place. An existing ``dest`` is first
    renamed to ``old`` and removed only after the rename of ``tmp``: an interrupted save
    leaves the previous directory whole (at ``dest`` or ``old``)."""
    if dest.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)


def _reason(e: BaseException) -> str:
    """The first line of an exception's message (its OS reason when it has one)."""
    text = getattr(e, "strerror", None) or str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# Settings that a resumed run must share with its checkpoint (the others -- steps, out, how
# often to save, evaluate or log, threads, performance switches -- may change on --resume).
RESUME_FIXED = ("model", "data", "fields", "seed", "batch_size", "max_new_tokens", "lr", "weight_decay",
                "warmup_steps", "lr_schedule", "max_grad_norm", "lora_r", "lora_alpha", "rewards", "reward_model",
                "preference_model", "embedding_model", "init_model", "reference_model", "chat_template", "dtype")


def load_tensors(path: Path):
    """``torch.load`` of a checkpoint file with ``weights_only=True`` (tensors and plain Python
    containers only; nothing that could run code). Anything else is refused with a RunError."""
    import pickle
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{path}: refused to load ({first})",
                       hint="a checkpoint holds only tensors and plain values; this file is damaged or was "
                            "not written by alignspec. Start afresh or restore the file") from None


class TrainingLoop:
    """What every training engine does around its own optimizer step (see the module docstring)."""

    main, rank, world = True, 0, 1   # one process, unless the subclass says otherwise
    bar_metrics: tuple = ()          # (key, label): step metrics the progress bar shows after the loss
    curve_metrics: tuple = ("eval_score",)  # panels of curves.png after the loss, when logged
    cuda_rng = True                  # checkpoints hold the CUDA generators' states (when CUDA is there)

    # -- console -----------------------------------------------------------------------
    def say(self, msg: str) -> None:
        """Print ``msg`` (rich markup) on the run's console, on the main process only."""
        if self.main:
            self.console.print(msg)

    # -- setup -------------------------------------------------------------------------
    def _set_threads(self, default: int) -> None:
        """torch's intra-op threads: the ``threads`` setting, else ``default`` (0: leave as is)."""
        threads = self.cfg.threads if self.cfg.threads is not None else default
        if threads > 0:
            torch.set_num_threads(threads)

    def _build_scheduler(self) -> None:
        """``self.scheduler``: ``warmup_steps`` updates of linear warmup, then ``lr_schedule``
        (constant, linear or cosine decay to 0) over the run's ``steps * updates_per_step``."""
        algo, cfg = self.algo, self.cfg
        self.updates_per_step = int(algo.train.get("epochs", 1)) * int(algo.train.get("minibatches", 1))
        total = self.steps * self.updates_per_step
        warm, kind = cfg.warmup_steps, cfg.lr_schedule

        def lr_lambda(i):
            if warm and i < warm:
                return (i + 1) / warm
            if kind == "constant":
                return 1.0
            frac = min(1.0, (i - warm) / max(1, total - warm))
            return 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    def _init_iterations(self) -> None:
        """Step 0, and the spec's ``train: iterations`` of ``ceil(steps / iterations)`` steps each."""
        self.step = 0
        self.iterations = max(1, int(self.algo.train.get("iterations", 1)))
        self.steps_per_iter = math.ceil(self.steps / self.iterations)
        self._algos = {}

    # -- per-iteration algorithm (param schedules) ---------------------------------------
    def algo_for(self, iteration: int):
        """The compiled algorithm of ``iteration``: ``self.algo`` unless the spec schedules
        params per iteration (then compiled once per iteration, with ``_iteration_params``)."""
        if not self.algo.schedules:
            return self.algo
        if iteration not in self._algos:
            import alignspec
            self._algos[iteration] = alignspec.compile(self.algo.spec, **self._iteration_params(iteration))
        return self._algos[iteration]

    def _iteration_params(self, iteration: int) -> dict:
        """Every param at ``iteration``: its schedule's entry, unless the run set that param
        (runtime/iterations.py)."""
        from .iterations import iteration_params
        return iteration_params(self.algo, iteration)

    def _start_iteration(self, it: int, replace: bool = True) -> None:
        """Enter iteration ``it``: its algorithm becomes ``self.current``; with ``replace`` at a
        boundary (it > 0), a ``reference = "iterate"`` reference takes the policy's weights."""
        self._iter = it
        self.current = self.algo_for(it)
        if replace and it > 0 and self.reference is not None and self.algo.train.get("reference") == "iterate":
            self.reference.load_state_dict(self._policy_state())
            self.say(f"iteration {it}: reference replaced by the current policy")

    # -- pieces of one optimizer step ------------------------------------------------------
    def _minibatches(self, algo, n_groups: int):
        """The step's minibatches (lists of group indices), epoch after epoch: with several
        epochs or minibatches the groups are shuffled per epoch, seeded by (seed, step, epoch)."""
        epochs = int(algo.train.get("epochs", 1))
        n_mb = int(algo.train.get("minibatches", 1))
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
        if info.get("refill_cap_hit"):
            res["refill/cap_hit"] = 1
        res.update(times)
        res["step_time"] = time.perf_counter() - t_start
        return res

    # -- checkpoints and the final model ----------------------------------------------------
    def _save_dir(self, name: str, fill) -> None:
        """Write ``OUT/name`` atomically: ``fill(tmp)`` writes into a fresh ``OUT/.name.tmp<pid>``,
        which then replaces ``OUT/name`` (see ``replace_dir``; the old one is ``OUT/.name.old``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{name}.tmp{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            fill(tmp)
            replace_dir(tmp, self.out / name, self.out / f".{name}.old")
        except Exception as e:  # a full disk, a quota, a vanished folder: the previous copy stays
            shutil.rmtree(tmp, ignore_errors=True)
            reason = _reason(e)
            kept = " (the previous one is kept)" if (self.out / name).exists() else ""
            raise RunFailure(f"step {self.step}: could not write {self.out / name}: {reason}{kept}") from None

    def _rng_state(self) -> dict:
        """The global generators' states (Python, NumPy, torch; CUDA with ``cuda_rng``) as plain
        JSON values (lists of ints), so that a checkpoint never needs unpickling."""
        version, mt, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        rng = {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
               "torch": torch.get_rng_state().tolist()}
        if self.cuda_rng and torch.cuda.is_available():
            rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        return rng

    @staticmethod
    def _set_rng_state(rng: dict) -> None:
        """Put back generator states saved by ``_rng_state`` (CUDA's when saved and available)."""
        version, mt, gauss = rng["python"]
        random.setstate((version, tuple(mt), gauss))
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])

    def save_checkpoint(self) -> None:
        """``OUT/checkpoint`` (atomic, written by the main process): the subclass's model files,
        ``optimizer.pt``, ``process_<rank>.json`` for every process and ``state.json``."""
        self._barrier()
        states = self._gather_objects(self._process_state())  # every process's, in rank order
        if self.main:
            self._save_dir("checkpoint", lambda tmp: self._write_checkpoint(tmp, states))
        self._barrier()

    def _write_checkpoint(self, tmp: Path, states: list[dict]) -> None:
        self._save_weights(tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   tmp / "optimizer.pt")
        for rank, st in enumerate(states):
            (tmp / f"process_{rank}.json").write_text(json.dumps(st))
        (tmp / "state.json").write_text(json.dumps({**self._checkpoint_state(), "settings": self._settings()}))

    def _settings(self) -> dict:
        """What a resumed run must share with its checkpoint: RESUME_FIXED and the spec's params."""
        dump = self.cfg.model_dump(mode="json")
        return {**{k: dump[k] for k in RESUME_FIXED if k in dump},
                "params": {k: v for k, v in self.algo.params.items() if isinstance(v, (int, float, str, bool))}}

    def _check_settings(self, ck: Path, saved: dict | None) -> None:
        """Refuse to resume with other settings than the checkpoint's, unless each change was
        asked for with ``--set`` (then each is printed)."""
        if not saved:
            return
        now = self._settings()
        changed = {k: (saved.get(k), now.get(k)) for k in now if k != "params" and saved.get(k) != now.get(k)}
        sp, np_ = saved.get("params", {}), now["params"]
        changed.update({k: (sp.get(k), np_.get(k)) for k in sorted(set(sp) | set(np_)) if sp.get(k) != np_.get(k)})
        asked = set(getattr(self.cfg, "_set_keys", ()))
        refused = {k: v for k, v in changed.items() if k not in asked}
        if refused:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise RunError(f"--resume: the settings differ from the checkpoint's in {ck} ({lines})",
                           hint="resume with the same settings, or change one on purpose with --set KEY=VALUE")
        for k, (a, b) in changed.items():
            self.say(f"[yellow]--resume with a changed setting (--set): {k} {a!r} -> {b!r}[/yellow]")

    def _process_state(self) -> dict:
        """What this process holds apart from the shared weights: its generators' states
        (a subclass may add to it)."""
        return {"rng": self._rng_state()}

    def _set_process_state(self, state: dict) -> None:
        self._set_rng_state(state["rng"])

    def _gather_objects(self, obj) -> list:
        """``obj`` of every process, in rank order (one process: ``[obj]``)."""
        return [obj]

    def load_checkpoint(self) -> bool:
        """Restore ``OUT/checkpoint`` (models, optimizer, scheduler, generators, position);
        False when there is none."""
        ck = self.out / "checkpoint"
        if not (ck / "state.json").is_file():
            return False
        try:
            state = json.loads((ck / "state.json").read_text())
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError("no step")
        except (OSError, ValueError) as e:
            raise RunError(f"{ck / 'state.json'} is damaged ({_reason(e)})",
                           hint="start afresh (without --resume) or use another --out") from None
        self._check_checkpoint(ck, state)
        self._check_settings(ck, state.get("settings"))
        try:
            self._load_weights(ck)
        except RunError:
            raise
        except Exception as e:  # a missing or truncated file, another architecture
            raise RunError(f"{ck}: cannot load the checkpoint's weights ({_reason(e)})",
                           hint="resume with the model and LoRA settings the run started with, or start "
                                "afresh") from None
        opt = load_tensors(ck / "optimizer.pt")
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        own = ck / f"process_{self.rank}.json"
        own = own if own.is_file() else ck / "process_0.json"
        if not own.is_file():
            raise RunError(f"{ck} has no {own.name} (a checkpoint of an older alignspec stored it pickled, "
                           "which is never loaded: unpickling a file from a run folder can run code)",
                           hint="start the run afresh (without --resume) or use another --out")
        self._set_process_state(json.loads(own.read_text()))
        self._restore_position(state)
        return True

    def _restore_position(self, state: dict) -> None:
        self.step = int(state["step"])

    def save_final(self) -> None:
        """The trained model in ``OUT/model`` (atomic, main process; ``_write_model``)."""
        if self.main:
            self._save_dir("model", self._write_model)

    def _barrier(self) -> None:
        """Wait for every process (one process: nothing to wait for)."""

    # -- hooks with defaults ------------------------------------------------------------------
    def _evaluates(self) -> bool:
        return True

    def _before_steps(self) -> None:
        pass

    # -- metrics, progress, plot, profile ------------------------------------------------------
    def _log(self, rec: dict) -> None:
        """One record: a line of ``OUT/metrics.jsonl`` (main process), its numbers to the trackers."""
        if self.main:
            mode = "w" if getattr(self, "_fresh_metrics", False) else "a"
            with open(self.out / "metrics.jsonl", mode, encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            self._fresh_metrics = False
        if self.cfg.log_with:
            self.acc.log({k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))},
                         step=rec["step"])

    def _reset_metrics(self, resumed: bool) -> None:
        """A fresh run starts a new ``metrics.jsonl`` with its first line (an earlier run's stays
        until then, so a run that fails before logging loses nothing); a resumed one keeps the
        lines up to its step."""
        mpath = self.out / "metrics.jsonl"
        self._fresh_metrics = not resumed
        if not self.main or not mpath.exists() or not resumed:
            return
        lines = [ln for ln in mpath.read_text().splitlines()
                 if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        mpath.write_text("".join(ln + "\n" for ln in lines))

    def _progress(self):
        """The rich progress bar of the steps (shown on the main process only)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                        console=self.console, disable=not self.main, transient=False)

    def _progress_info(self, res: dict, last_eval: float | None) -> str:
        """The text after the progress bar: the step's loss, ``bar_metrics``, the last eval."""
        info = f"loss {res['loss']:.4f}"
        for key, label in self.bar_metrics:
            if key in res:
                info += f"  {label} {res[key]:.3f}"
        if last_eval is not None:
            info += f"  eval {last_eval:.3f}"
        return info

    def _start_profile(self):
        """A running torch CPU profiler with the ``profile`` setting, else None."""
        if not self.cfg.profile:
            return None
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
        prof.__enter__()
        return prof

    def _stop_profile(self, prof) -> None:
        """Stop ``prof`` and write its table to ``OUT/profile.txt``."""
        if prof is None:
            return
        prof.__exit__(None, None, None)
        if self.main:
            (self.out / "profile.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                            row_limit=30))

    def _plot(self) -> None:
        """``OUT/curves.png``: the loss, then each of ``curve_metrics`` that was logged (needs matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        recs = [json.loads(ln) for ln in (self.out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        panels = [("loss", [(r["step"], r["loss"]) for r in recs if "loss" in r and r["loss"] == r["loss"]])]
        for name in self.curve_metrics:
            pts = [(r["step"], r[name]) for r in recs if name in r]
            if pts:
                panels.append((name, pts))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for ax, (name, pts) in zip(axes[0], panels):
            if pts:
                ax.plot(*zip(*pts), **({"marker": "o"} if name == "eval_score" else {}))
            ax.set_title(f"{self.algo.name}: {name}" if name == "loss" else name)
            ax.set_xlabel("step")
            if name == "eval_score":
                ax.set_ylim(-0.02, 1.02)
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=100)
        plt.close(fig)

    # -- the run -----------------------------------------------------------------------------
    def _eval_and_log(self) -> float | None:
        """Evaluate now and log ``{"step", "eval_score"}``; the score."""
        score = self.evaluate()
        self._log({"step": self.step, "eval_score": score})
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
            from .tracking import hparams  # values every tracker accepts (TensorBoard: no None)
            self.acc.init_trackers("alignspec", config=hparams(self))
        self.say(self._run_line())
        last_eval = None
        it0 = min(self.step // self.steps_per_iter, self.iterations - 1)
        self._start_iteration(it0, replace=self.step > 0 and self.step == it0 * self.steps_per_iter)
        if self._evaluates() and self.step == 0:
            last_eval = self._eval_and_log()
            self.say(f"step 0: eval_score {last_eval:.3f}")
        self._before_steps()
        t_run = time.perf_counter()
        prof = self._start_profile()
        with self._stop_on_signals():
            last, last_eval = self._run_steps(last_eval)
        self._stop_profile(prof)
        wall = time.perf_counter() - t_run
        if self._evaluates():
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
                self.step += 1
                rec = {"step": self.step, **res}
                self._log(rec)
                last = rec
                if self._evaluates() and self.eval_every and self.step % self.eval_every == 0 \
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
