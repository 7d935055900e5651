"""The files of a causal-LM run's checkpoint and final model (the rest of a checkpoint --
optimizer, generators, state.json, atomic directories -- is io/checkpoint.py's).

checkpoint/: ``model/`` (the LM, or its LoRA adapters, + tokenizer), ``trainable.safetensors``
(the trainable parameters that ``model/`` does not hold as they are: a value head, LoRA
adapters, any the model's ``save_pretrained`` renames or reshapes -- so full fine-tuning stores
the weights once), ``reference.safetensors`` / ``iterate.safetensors`` when self-play iterations
change them. ``--resume`` loads every trainable parameter back exactly, from one or the other.
model/: the LM (LoRA merged into it) + tokenizer, and ``value_head.safetensors`` for a critic.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import RunError
from ..models.iterations import separate_iterate
from ..models.loaders import PolicyWithValueHead, unwrap_causal_lm


def _trainable_state(run) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in run.model.named_parameters() if v.requires_grad}


def _lm_keys(run) -> dict:
    """``{run.model parameter name: key in model/}`` for the trainable parameters that a full
    fine-tuning's ``model/`` holds (none with LoRA: model/ holds the adapters under PEFT's names)."""
    if run.lora:
        return {}
    by_id = {id(p): k for k, p in unwrap_causal_lm(run.model).named_parameters()}
    return {k: by_id[id(p)] for k, p in run.model.named_parameters() if p.requires_grad and id(p) in by_id}


_DTYPES = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "F16": torch.float16}


class _Saved:
    """The tensors of a ``save_pretrained`` folder (one safetensors file or shards), read lazily."""

    def __init__(self, folder: Path):
        import json
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                self.where = {k: folder / "model.safetensors" for k in f.keys()}
        else:
            self.where = {}

    def holds(self, key, v: torch.Tensor) -> bool:
        """Whether ``key`` is stored with ``v``'s shape and dtype (read from the header only)."""
        from safetensors import safe_open
        if key not in self.where:
            return False
        with safe_open(str(self.where[key]), "pt") as f:
            sl = f.get_slice(key)
            return tuple(sl.get_shape()) == tuple(v.shape) and _DTYPES.get(sl.get_dtype()) == v.dtype

    def get(self, key) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(str(self.where[key]), "pt") as f:
            return f.get_tensor(key)


def save_weights(run, tmp: Path, final: bool = False) -> None:
    """A checkpoint's model files in ``tmp`` (see the module docstring); with ``final``, the final
    model instead (``_write_model``)."""
    if final:
        return _write_model(run, tmp)
    from safetensors.torch import save_file
    lm = unwrap_causal_lm(run.model) if not run.lora else run.policy
    lm.save_pretrained(tmp / "model", safe_serialization=True)
    run.tokenizer.save_pretrained(tmp / "model")
    saved, keys = _Saved(tmp / "model"), _lm_keys(run)
    state = _trainable_state(run)
    rest = {k: v for k, v in state.items()  # what model/ does not hold as it is
            if not (k in keys and saved.holds(keys[k], v))}
    if rest:
        save_file(rest, str(tmp / "trainable.safetensors"))
    if run.reference is not None and run.current.plan.reference == "iterate":
        save_file({k: v.contiguous() for k, v in run.reference.state_dict().items()},
                  str(tmp / "reference.safetensors"))
    if separate_iterate(run) is not None:
        save_file({k: v.contiguous() for k, v in separate_iterate(run).state_dict().items()},
                  str(tmp / "iterate.safetensors"))


def load_weights(run, ck: Path) -> None:
    from safetensors.torch import load_file
    rest = load_file(str(ck / "trainable.safetensors")) if (ck / "trainable.safetensors").is_file() else {}
    saved, keys = _Saved(ck / "model"), _lm_keys(run)
    named = dict(run.model.named_parameters())
    for k in rest:
        if k not in named:
            raise RunError(f"{ck}: parameter {k} does not belong to this model (different model or LoRA settings?)")
    with torch.no_grad():
        for k, p in named.items():
            if not p.requires_grad:
                continue
            if k in rest:
                v = rest[k]
            elif k in keys and keys[k] in saved.where:
                v = saved.get(keys[k])
            else:
                raise RunError(f"{ck}: the checkpoint has no weights for parameter {k} (different model or LoRA "
                               f"settings?)")
            p.copy_(v.to(p.device, p.dtype))
    if run.reference is not None and (ck / "reference.safetensors").is_file():
        run.reference.load_state_dict(load_file(str(ck / "reference.safetensors")))
    if separate_iterate(run) is not None and (ck / "iterate.safetensors").is_file():
        separate_iterate(run).load_state_dict(load_file(str(ck / "iterate.safetensors")))


def _write_model(run, tmp: Path) -> None:
    """The final model: the LM (LoRA merged into it) + tokenizer, and a critic's value head."""
    lm = unwrap_causal_lm(run.model)
    if run.lora:
        lm = copy.deepcopy(run.policy).merge_and_unload()
    lm.save_pretrained(tmp, safe_serialization=True)
    run.tokenizer.save_pretrained(tmp)
    if isinstance(run.model, PolicyWithValueHead):
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in run.model.value_head.state_dict().items()},
                  str(tmp / "value_head.safetensors"))
