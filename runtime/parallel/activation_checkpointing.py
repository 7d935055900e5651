"""Activation checkpointing: the model's own gradient checkpointing, non-reentrant.

``apply(model)`` turns on ``transformers``' gradient checkpointing of each decoder layer with
``use_reentrant=False`` (torch's non-reentrant ``checkpoint``: works with FSDP2's hooks and
with inputs that need no gradient). It must run *before* ``fully_shard``: transformers then
checkpoints each layer's ``forward`` inside FSDP2's pre/post hooks, so a recomputed layer does
not gather its parameters twice. In backward each layer's forward runs again; only the layer
inputs are kept between forward and backward.

A checkpointed layer cannot write a KV cache (the recompute would write it again), so the
training forward then runs each row's prompt itself (``share_prompt`` off for the trained
model's forwards; see :func:`training_config`).
"""

from __future__ import annotations

from ..errors import RunError


def apply(model) -> None:
    """Turn on non-reentrant gradient checkpointing in ``model`` (a transformers model)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RunError(f"{type(model).__name__} does not support gradient checkpointing",
                       hint="set gradient_checkpointing=false for this model")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def training_config(cfg, plan):
    """The run config the trained model's forward uses: without a shared prompt KV cache when
    layers are checkpointed (a checkpointed layer drops its cache)."""
    if plan.gradient_checkpointing and cfg.share_prompt:
        return cfg.model_copy(update={"share_prompt": False})
    return cfg
