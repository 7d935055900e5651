"""Checkpoints of sharded (FSDP2) runs, and their final model as a Hugging Face directory.

``save(engine)``: every process writes its shards of the trained model and of the optimizer
state with ``torch.distributed.checkpoint`` (``dcp.save``; no process ever holds the whole
state) into ``OUT/.checkpoint.tmp-sharded``; the main process adds the scheduler state
(``scheduler.pt``), each process's generator states (``process_<rank>.pt``) and
``state.json``, then renames the directory into ``OUT/checkpoint`` exactly as unsharded
checkpoints are (runtime/loop.py ``replace_dir``): a run killed while saving keeps the
previous checkpoint whole. The directory must be one that every process sees (one machine,
or a file system the nodes share).

``load(engine)``: ``dcp.load`` into the engine's sharded model and optimizer (their state
dicts from ``torch.distributed.checkpoint.state_dict``, so the optimizer state is keyed by
parameter names), then the scheduler, the generators and the run's position: ``--resume``
continues exactly where the checkpoint was written.

``save_final(engine)``: the trained LM gathered (each shard once, to the main process's CPU)
and written with ``save_pretrained``: ``OUT/model`` loads with
``AutoModelForCausalLM.from_pretrained`` like the model of an unsharded run.

Nothing here unpickles: generator states are stored as tensors and plain numbers, and every
``torch.load`` is ``weights_only=True``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import RunError
from ..loop import replace_dir
from ..models import PolicyWithValueHead, unwrap_causal_lm
from .fsdp2 import full_state_dict


def _plain(state):
    """``state`` with NumPy arrays as lists (``torch.load(weights_only=True)`` reads it back)."""
    if isinstance(state, np.ndarray):
        return {"__ndarray__": state.tolist(), "dtype": str(state.dtype)}
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_plain(v) for v in state)
    return state


def _unplain(state):
    if isinstance(state, dict):
        if "__ndarray__" in state:
            return np.asarray(state["__ndarray__"], dtype=state["dtype"])
        return {k: _unplain(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_unplain(v) for v in state)
    return state


def _state_dicts(engine):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(engine.wrapped, engine.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(engine) -> None:
    """``OUT/checkpoint`` of a sharded run (see the module docstring); every process calls it."""
    import torch.distributed.checkpoint as dcp
    engine._barrier()
    states = engine._gather_objects(_plain(engine._process_state()))
    out = engine.out
    tmp = out / ".checkpoint.tmp-sharded"  # one name on every process
    if engine.main:
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    engine._barrier()
    dcp.save(_state_dicts(engine), checkpoint_id=str(tmp / "sharded"))
    if engine.main:
        torch.save({"scheduler": engine.scheduler.state_dict()}, tmp / "scheduler.pt")
        for rank, st in enumerate(states):
            torch.save(st, tmp / f"process_{rank}.pt")
        (tmp / "state.json").write_text(json.dumps({**engine._checkpoint_state(), "sharded": True}))
    engine._barrier()
    if engine.main:
        replace_dir(tmp, out / "checkpoint", out / ".checkpoint.old")
    engine._barrier()


def load(engine) -> bool:
    """Restore ``OUT/checkpoint`` into a sharded run; False when there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    ck = engine.out / "checkpoint"
    if not (ck / "state.json").is_file():
        return False
    state = json.loads((ck / "state.json").read_text())
    engine._check_checkpoint(ck, state)
    if not state.get("sharded"):
        raise RunError(f"{ck} was written by an unsharded run; this run is parallel=fsdp2",
                       hint="resume with the parallel setting the run was started with")
    sd = _state_dicts(engine)
    dcp.load(sd, checkpoint_id=str(ck / "sharded"))
    set_state_dict(engine.wrapped, engine.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    engine.scheduler.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True)["scheduler"])
    own = ck / f"process_{engine.rank}.pt"
    engine._set_process_state(_unplain(torch.load(own if own.is_file() else ck / "process_0.pt",
                                                  weights_only=True)))
    engine._restore_position(state)
    return True


def save_final(engine) -> None:
    """``OUT/model``: the LM gathered from its shards, as a Hugging Face directory (+ tokenizer,
    and ``value_head.safetensors`` for a critic); every process calls it, the main one writes."""
    lm = unwrap_causal_lm(engine.model)
    lm_sd = full_state_dict(lm)
    head_sd = full_state_dict(engine.model.value_head) if isinstance(engine.model, PolicyWithValueHead) else None
    if not engine.main:
        return

    def write(tmp: Path) -> None:
        lm.save_pretrained(tmp, state_dict=lm_sd, safe_serialization=True)
        engine.tokenizer.save_pretrained(tmp)
        if head_sd is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in head_sd.items()}, str(tmp / "value_head.safetensors"))
    engine._save_dir("model", write)
