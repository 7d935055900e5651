"""Checkpoints and the final model: atomic directories, the files every run writes and reads back.

A checkpoint (``OUT/checkpoint``) holds the policy family's model files (``_save_weights``:
models/token_policy.py, models/flow_policy.py), ``optimizer.pt`` (optimizer and scheduler
state), ``process_<rank>.pt`` (each process's own state: Python / NumPy / torch generator
states, plus what ``_process_state`` adds) and ``state.json`` (step, data cursor, spec).
Directories are written atomically (``_save_dir``: under ``OUT/.NAME.tmp<pid>``, renamed into
place, the previous one kept as ``OUT/.NAME.old`` until then), so a killed run leaves the
last good checkpoint whole and ``--resume`` continues from it exactly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


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



class CheckpointMixin:
    """Saving and restoring ``OUT/checkpoint`` and writing ``OUT/model`` (see the module docstring)."""

    def _save_dir(self, name: str, fill) -> None:
        """Write ``OUT/name`` atomically: ``fill(tmp)`` writes into a fresh ``OUT/.name.tmp<pid>``,
        which then replaces ``OUT/name`` (see ``replace_dir``; the old one is ``OUT/.name.old``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{name}.tmp{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        fill(tmp)
        replace_dir(tmp, self.out / name, self.out / f".{name}.old")

    def _rng_state(self) -> dict:
        """The global generators' states (Python, NumPy, torch; CUDA with ``cuda_rng``)."""
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.cuda_rng and torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return rng

    @staticmethod
    def _set_rng_state(rng: dict) -> None:
        """Put back generator states saved by ``_rng_state`` (CUDA's when saved and available)."""
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save_checkpoint(self) -> None:
        """``OUT/checkpoint`` (atomic, written by the main process): the subclass's model files,
        ``optimizer.pt``, ``process_<rank>.pt`` for every process and ``state.json``."""
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
            torch.save(st, tmp / f"process_{rank}.pt")
        (tmp / "state.json").write_text(json.dumps(self._checkpoint_state()))

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
        state = json.loads((ck / "state.json").read_text())
        self._check_checkpoint(ck, state)
        self._load_weights(ck)
        opt = torch.load(ck / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        own = ck / f"process_{self.rank}.pt"
        self._set_process_state(torch.load(own if own.is_file() else ck / "process_0.pt", weights_only=False))
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
