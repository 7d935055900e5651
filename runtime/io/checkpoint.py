"""Checkpoints and the final model: atomic directories, the files every run writes and reads back.

A checkpoint (``OUT/checkpoint``) holds the policy family's model files (``family.save_weights``:
models/lm_policy_io.py, models/flow_policy.py), ``optimizer.pt`` (optimizer and scheduler
state, loaded with ``weights_only=True``), ``process_<rank>.json`` (each process's own state:
Python / NumPy / torch generator states as plain values, plus what ``_process_state`` adds)
and ``state.json`` (step, data cursor, spec, the settings a resumed run must share).
Directories are written atomically (``_save_dir``: under ``OUT/.NAME.tmp<pid>``, renamed into
place, the previous one kept as ``OUT/.NAME.old`` until then), so a killed run leaves the
last good checkpoint whole and ``--resume`` continues from it exactly. ``OUT/checkpoint`` is
always the latest; with ``save_total_limit`` K > 1 the one it replaces moves to
``OUT/checkpoint-<step>`` and the newest K - 1 of those are kept.

Sharded runs (``parallel=fsdp2``) write and read their model and optimizer shards with
``torch.distributed.checkpoint`` instead, and gather their final model
(parallel/sharded_checkpoint.py); ``state.json`` and ``process_<rank>.json`` are the same.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import RunError, RunFailure
from .outdir import MAX_STEP, own_checkpoint_step, valid_step


def replace_dir(tmp: Path, dest: Path, old: Path, keep: Path | None = None) -> None:
    """Put the finished directory ``tmp`` in ``dest``'s place. An existing ``dest`` is first
    renamed to ``old`` and removed (or, with ``keep``, renamed to ``keep``) only after the rename
    of ``tmp``: an interrupted save leaves the previous directory whole (at ``dest`` or ``old``)."""
    if dest.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        if keep is not None:
            if keep.exists():
                shutil.rmtree(keep)
            os.replace(old, keep)
        else:
            shutil.rmtree(old)


def _reason(e: BaseException) -> str:
    """The first line of an exception's message (its OS reason when it has one)."""
    text = getattr(e, "strerror", None) or str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# Settings that a resumed run must share with its checkpoint (the others -- steps, out, how
# often to save, evaluate or log, threads, performance switches such as gradient_checkpointing
# and reshard_after_forward, which change memory and time but not the result -- may change on
# --resume). `parallel` decides the checkpoint's format (sharded or not), `mixed_precision` the
# numbers, the LoRA settings which parameters exist, eval_fraction which rows are trained on.
RESUME_FIXED = ("model", "data", "fields", "seed", "batch_size", "max_new_tokens", "lr", "weight_decay",
                "warmup_steps", "warmup_ratio", "lr_schedule", "min_lr_rate", "lr_scheduler_kwargs", "max_grad_norm",
                "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_adapter", "qlora",
                "rewards", "reward_weights", "reward_model", "preference_model", "embedding_model", "init_model",
                "reference_model", "chat_template", "chat_template_kwargs", "dtype", "parallel", "mixed_precision",
                "env", "eval_fraction")  # not tools: [] by default, which a checkpoint written before it lacks


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


def _damaged(path: Path, e) -> RunError:
    """The error for a checkpoint file that cannot be what alignspec wrote."""
    return RunError(f"{path} is damaged ({e if isinstance(e, str) else _reason(e)})",
                    hint="start afresh (without --resume) or use another --out")


def _read_state(path: Path) -> dict:
    """A checkpoint's ``state.json``, its types checked: an object whose step (and cursor) are
    whole numbers from 0 to MAX_STEP, whose settings and their params are objects."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise _damaged(path, e) from None
    if not isinstance(state, dict):
        raise _damaged(path, f"a JSON {type(state).__name__}, not an object")
    for key in ("step", "cursor"):
        if (key == "step" or key in state) and not valid_step(state.get(key)):
            raise _damaged(path, f"{key} {state.get(key)!r} is not a whole number from 0 to {MAX_STEP:,}")
    settings = state.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise _damaged(path, f"settings is a {type(settings).__name__}, not an object")
    if isinstance(settings, dict) and not isinstance(settings.get("params", {}), dict):
        raise _damaged(path, f"settings.params is a {type(settings['params']).__name__}, not an object")
    return state


class CheckpointMixin:
    """Saving and restoring ``OUT/checkpoint`` and writing ``OUT/model`` (see the module docstring)."""

    def _save_dir(self, name: str, fill, keep: Path | None = None) -> None:
        """Write ``OUT/name`` atomically: ``fill(tmp)`` writes into a fresh ``OUT/.name.tmp<pid>``,
        which then replaces ``OUT/name`` (see ``replace_dir``; the old one is ``OUT/.name.old``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{name}.tmp{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            fill(tmp)
            replace_dir(tmp, self.out / name, self.out / f".{name}.old", keep)
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

    @property
    def _sharded(self) -> bool:
        """Whether the model and optimizer are sharded over processes (``parallel=fsdp2``)."""
        plan = getattr(self, "parallel_plan", None)
        return plan is not None and plan.fsdp2

    def save_checkpoint(self) -> None:
        """``OUT/checkpoint`` (atomic, written by the main process): the subclass's model files,
        ``optimizer.pt``, ``process_<rank>.json`` for every process and ``state.json``; a sharded
        run's (every process writes its shards) is parallel/sharded_checkpoint.py's."""
        if self._sharded:
            return self._sharded_io.save(self)
        self._barrier()
        states = self._gather_objects(self._process_state())  # every process's, in rank order
        if self.main:
            keep = self._kept_name()
            self._save_dir("checkpoint", lambda tmp: self._write_checkpoint(tmp, states), keep)
            self._prune_checkpoints()
        self._barrier()

    def _kept_name(self) -> Path | None:
        """Where the checkpoint being replaced goes when ``save_total_limit`` keeps more than one:
        ``OUT/checkpoint-<its step>`` (None: it is deleted -- one kept, the same step, or a
        checkpoint of an earlier run in this folder, which a fresh run does not keep)."""
        limit = self.cfg.save_total_limit
        ours = getattr(self, "_checkpoint_ours", False) or self.resume
        self._checkpoint_ours = True
        if not ours:  # a fresh run in an earlier run's folder: that run's kept checkpoints go
            for p in self.out.glob("checkpoint-*"):  # (alignspec's only: never a user's checkpoint-best/)
                if own_checkpoint_step(p) is not None:
                    shutil.rmtree(p, ignore_errors=True)
        if limit == 1 or not ours:
            return None
        try:
            step = json.loads((self.out / "checkpoint" / "state.json").read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return self.out / f"checkpoint-{step}" if isinstance(step, int) and step != self.step else None

    def _prune_checkpoints(self) -> None:
        """Keep the newest ``save_total_limit - 1`` ``OUT/checkpoint-<step>`` folders (all with None)."""
        limit = self.cfg.save_total_limit
        kept = sorted((p for p in self.out.glob("checkpoint-*") if own_checkpoint_step(p) is not None),
                      key=own_checkpoint_step)
        if limit is not None:
            for p in kept[:max(0, len(kept) - (limit - 1))]:
                shutil.rmtree(p, ignore_errors=True)

    def _write_checkpoint(self, tmp: Path, states: list[dict]) -> None:
        self.family.save_weights(self, tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   tmp / "optimizer.pt")
        for rank, st in enumerate(states):
            (tmp / f"process_{rank}.json").write_text(json.dumps(st))
        (tmp / "state.json").write_text(json.dumps({**self.family.checkpoint_state(self), "settings": self._settings()}))

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
        changed = {k: (saved.get(k), now.get(k)) for k in now  # (a setting newer than the checkpoint: not compared)
                   if k != "params" and k in saved and saved.get(k) != now.get(k)}
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
        state = _read_state(ck / "state.json")
        self._check_checkpoint(ck, state)
        self._check_settings(ck, state.get("settings"))
        if bool(state.get("sharded")) != self._sharded:
            raise RunError(f"{ck} was written by a{' sharded' if state.get('sharded') else 'n unsharded'} run; "
                           f"this run is parallel={'fsdp2' if self._sharded else 'ddp'}",
                           hint="resume with the parallel setting the run was started with")
        if self._sharded:
            self._sharded_io.load(self, ck)
        else:
            self._load_unsharded(ck)
        own = ck / f"process_{self.rank}.json"
        own = own if own.is_file() else ck / "process_0.json"
        if not own.is_file():
            raise RunError(f"{ck} has no {own.name} (a checkpoint of an older alignspec stored it pickled, "
                           "which is never loaded: unpickling a file from a run folder can run code)",
                           hint="start the run afresh (without --resume) or use another --out")
        try:
            process = json.loads(own.read_text())
            if not isinstance(process, dict) or not isinstance(process.get("rng"), dict):
                raise ValueError("no generator states")
            self._set_process_state(process)
        except RunError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError,
                OverflowError, RecursionError) as e:  # wrong types, a wrong-size generator state
            raise _damaged(own, e) from None
        self._restore_position(state)
        return True

    def _load_unsharded(self, ck: Path) -> None:
        """The model files (``family.load_weights``), optimizer and scheduler of an unsharded checkpoint."""
        try:
            self.family.load_weights(self, ck)
        except RunError:
            raise
        except Exception as e:  # a missing or truncated file, another architecture
            raise RunError(f"{ck}: cannot load the checkpoint's weights ({_reason(e)})",
                           hint="resume with the model and LoRA settings the run started with, or start "
                                "afresh") from None
        opt = load_tensors(ck / "optimizer.pt")
        try:
            if not isinstance(opt, dict) or not isinstance(opt.get("optimizer"), dict) \
                    or not isinstance(opt.get("scheduler"), dict):
                raise ValueError("no optimizer and scheduler states")
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            raise _damaged(ck / "optimizer.pt", e) from None  # e.g. other parameter groups

    def _restore_position(self, state: dict) -> None:
        self.step = int(state["step"])

    def save_final(self) -> None:
        """The trained model in ``OUT/model`` (atomic, main process; ``family.save_weights(final=True)``) with its
        card (io/model_card.py); a sharded run's is gathered from every process first
        (parallel/sharded_checkpoint.py)."""
        if self._sharded:
            return self._sharded_io.save_final(self)
        if self.main:
            from .model_card import write_model_card

            def fill(tmp):
                self.family.save_weights(self, tmp, final=True)
                write_model_card(self, tmp)  # README.md: spec, base model, data, settings, last metrics
            self._save_dir("model", fill)

    def _barrier(self) -> None:
        """Wait for every process (one process: nothing to wait for)."""
