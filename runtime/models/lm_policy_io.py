"""The files of a causal-LM run's checkpoint and final model (the rest of a checkpoint --
optimizer, generators, state.json, atomic directories -- is io/checkpoint.py's).

checkpoint/: ``model/`` (the LM, or its LoRA adapters, + tokenizer), ``trainable.safetensors``
(every trainable parameter: what ``--resume`` loads back), ``reference.safetensors`` /
``iterate.safetensors`` when self-play iterations change them.
model/: the LM (LoRA merged into it) + tokenizer, and ``value_head.safetensors`` for a critic.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import RunError
from ..loop.iterations import separate_iterate
from .loaders import PolicyWithValueHead, unwrap_causal_lm


def _trainable_state(run) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in run.model.named_parameters() if v.requires_grad}


def save_weights(run, tmp: Path) -> None:
    from safetensors.torch import save_file
    lm = unwrap_causal_lm(run.model) if not run.lora else run.policy
    lm.save_pretrained(tmp / "model", safe_serialization=True)
    run.tokenizer.save_pretrained(tmp / "model")
    save_file(_trainable_state(run), str(tmp / "trainable.safetensors"))
    if run.reference is not None and run.current.plan.reference == "iterate":
        save_file({k: v.contiguous() for k, v in run.reference.state_dict().items()},
                  str(tmp / "reference.safetensors"))
    if separate_iterate(run) is not None:
        save_file({k: v.contiguous() for k, v in separate_iterate(run).state_dict().items()},
                  str(tmp / "iterate.safetensors"))


def load_weights(run, ck: Path) -> None:
    from safetensors.torch import load_file
    weights = load_file(str(ck / "trainable.safetensors"))
    named = dict(run.model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            if k not in named:
                raise RunError(f"{ck}: parameter {k} does not belong to this model (different model or LoRA settings?)")
            named[k].copy_(v.to(named[k].device, named[k].dtype))
    if run.reference is not None and (ck / "reference.safetensors").is_file():
        run.reference.load_state_dict(load_file(str(ck / "reference.safetensors")))
    if separate_iterate(run) is not None and (ck / "iterate.safetensors").is_file():
        separate_iterate(run).load_state_dict(load_file(str(ck / "iterate.safetensors")))


def write_model(run, tmp: Path) -> None:
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
