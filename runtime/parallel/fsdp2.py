"""FSDP2: the trained model's parameters, gradients and optimizer state sharded over processes.

``shard_forward`` shards the training forward (models/train_forward.py) of the run's trained
model -- the policy, with its value head when there is a critic -- with PyTorch's own
``fully_shard`` (called by parallel/wrap.py, which chooses between this and DDP):

1. activation checkpointing first, when on (parallel/activation_checkpointing.py, applied by wrap.py);
2. ``fully_shard`` on each decoder layer (the classes in the model's ``_no_split_modules``),
   then on the input embedding when the output layer does not share its weight, then on the
   ``TrainForward`` as the root: the root unit holds what is left (final norm, output layer,
   value head). Each process keeps ``1 / world`` of every parameter (a ``DTensor`` sharded
   on dim 0); a unit's parameters are gathered for its forward, freed after it when
   ``reshard_after_forward`` (and gathered again in backward), and its gradients are
   reduce-scattered (averaged) onto the shards, so AdamW creates sharded moments;
3. mixed precision through FSDP2's ``MixedPrecisionPolicy`` (runtime/parallel/precision.py).

The root is the ``TrainForward`` rather than the causal LM because the engine's log-prob path
calls the LM's body and reads its output layer's weight directly: the root's hooks gather
those parameters before anything in its forward reads them. A no-grad forward at setup
initializes FSDP2's root state, so that generation (which calls the LM itself, not the root)
finds it ready. :func:`gathered` keeps every parameter whole during generation and
evaluation, which would otherwise gather each layer once per generated token.

This is done here rather than by ``accelerate``: with ``cpu=True`` accelerate ignores its
FSDP plugin, and applying ``fully_shard`` directly gives the same sharding on CPUs (gloo)
and GPUs (NCCL). Frozen models (the reference, scorers) are not sharded: they hold no
gradients and no optimizer state (4 bytes a parameter in float32 against the 16 of a
trained one).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import RunError
from ..models.loaders import unwrap_causal_lm
from . import precision


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (the classes in ``_no_split_modules``)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise RunError(f"{type(lm).__name__}: no decoder layers found to shard (its _no_split_modules "
                       f"names {sorted(names) or 'none'})", hint="use parallel=ddp for this model")
    return layers


def shard_forward(forward: nn.Module, lm: nn.Module, plan, device, pad_id) -> nn.Module:
    """Shard the training forward ``forward`` of ``lm`` (see the module docstring). Call before
    the optimizer is built: sharding replaces the parameters by their shards."""
    shard(forward, lm, plan, device)
    from ..models.train_forward import dummy_micro_batch
    dummy = dummy_micro_batch(pad_id or 0, device)
    with torch.no_grad():  # initializes the root's FSDP state (see the module docstring)
        forward(*(dummy[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")))
    return forward


def shard(root: nn.Module, lm: nn.Module, plan, device) -> nn.Module:
    """``fully_shard`` the decoder layers of ``lm``, its input embedding (unless tied to the
    output layer), then ``root`` (a module that contains ``lm``); returns ``root``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (plan.world,))
    kw = {"mesh": mesh, "reshard_after_forward": plan.reshard_after_forward}
    mp = precision.fsdp_policy(plan)
    if mp is not None:
        kw["mp_policy"] = mp
    for layer in decoder_layers(lm):
        fully_shard(layer, **kw)
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if emb is not None and (head is None or head.weight is not emb.weight):
        fully_shard(emb, **kw)
    root_mp = precision.fsdp_policy(plan, root=True)
    fully_shard(root, **{**kw, **({"mp_policy": root_mp} if root_mp is not None else {})})
    return root


def _fsdp_modules(root: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(run):
    """Every parameter of the sharded training forward whole for the duration (generation,
    evaluation): one gather per unit instead of one per forward call; resharded on exit."""
    plan = run.parallel_plan
    root = run.train_forward
    mods = _fsdp_modules(root)
    root.set_reshard_after_forward(False)
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        root.set_reshard_after_forward(plan.reshard_after_forward)
        root.set_reshard_after_forward(False, recurse=False)  # the root keeps its units until backward
        for m in mods:
            m.reshard()


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Clip sharded gradients to ``max_norm`` (their norm over all shards); the norm before."""
    total = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    from torch.distributed.tensor import DTensor
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return float(total)


def full_state_dict(module: nn.Module) -> dict:
    """``module``'s state dict with every sharded tensor gathered, on the CPU, on the main
    process (empty elsewhere). A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
