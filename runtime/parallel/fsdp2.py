"""FSDP2: the trained model's parameters, gradients and optimizer state sharded over processes.

``shard_forward`` shards the training forward (models/train_forward.py) of the run's trained
model -- the policy, with its value head when there is a critic -- with PyTorch's own
``fully_shard`` (called by parallel/wrap.py, which chooses between this and DDP):

1. activation checkpointing first, when on (parallel/activation_checkpointing.py, applied by wrap.py);
2. ``fully_shard`` on each decoder layer (the classes in the model's ``_no_split_modules``),
   then on the input embedding and on the output layer (see below) when they do not share
   their weight, then on the ``TrainForward`` as the root: the root unit holds what is left
   (final norm, value head, the output layer or a tied embedding / output layer). Each
   process keeps ``1 / world`` of every parameter (a ``DTensor`` sharded on dim 0); a
   unit's parameters are gathered for its
   forward, freed after it when ``reshard_after_forward`` (and gathered again in backward),
   and its gradients are reduce-scattered (averaged) onto the shards as soon as its backward
   is done, so AdamW creates sharded moments;
3. mixed precision through FSDP2's ``MixedPrecisionPolicy`` (runtime/parallel/precision.py).

The output layer (vocabulary x hidden, the largest unit; more than half of a small model's
parameters) is its own unit but is never gathered for training: the engine's log-prob path
does not call its ``forward``, it reads its weight in tiles (models/logprobs.py), and for a
bias-free linear output layer that computation is given the layer's shards
(parallel/vocab_parallel.py: each process computes the logits of its slice of the
vocabulary for every process's rows, and keeps its slice's gradient). Gathered, in the root,
it would stay whole from the start of the forward to the end of the backward with its whole
gradient held until the end (the root reduces last); as an ordinary unit, its whole gradient
would be reduced at the start of the backward, under every layer's activations: both were
measured with bench/scale.py, and both raise the per-process peak by about a tenth of DDP's.
An output layer with a bias or soft-capped logits stays in the root. The
root is the ``TrainForward`` rather than the causal LM for the same reason: the root's hooks
gather what is left before anything in its forward reads it. A no-grad forward at setup
initializes FSDP2's root state, so that generation (which calls the LM itself, not the root)
finds it ready. :func:`gathered` keeps every parameter whole during generation and
evaluation, which would otherwise gather each layer once per generated token.

The frozen reference model is sharded the same way (:func:`shard_frozen`: no gradients, no
optimizer state, float32 compute as without FSDP2), so each process holds ``1 / world`` of it
too. Its forwards are collectives: every process must run as many of them, which the
reference cache (models/fastpath.py: a process whose rows were all cached runs none) does
not ensure; :func:`pad_frozen_forwards` evens the counts out with one-token forwards.

This is done here rather than by ``accelerate``: with ``cpu=True`` accelerate ignores its
FSDP plugin, and applying ``fully_shard`` directly gives the same sharding on CPUs (gloo)
and GPUs (NCCL).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..errors import RunError
from ..models.loaders import unwrap_causal_lm
from ..models.logprobs import HEAD_LOGPROBS, chunked_linear_head
from . import precision
from .vocab_parallel import sharded_logprobs


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
    _init_root(forward, pad_id, device)
    return forward


def shard_frozen(forward: nn.Module, lm: nn.Module, plan, device, pad_id) -> nn.Module:
    """Shard the no-grad forward ``forward`` of the frozen model ``lm`` (the reference): the
    same units as the policy's, computed in the model's own dtype (no mixed precision, as
    frozen models run without FSDP2). Counts its forwards for :func:`pad_frozen_forwards`."""
    shard(forward, lm, plan, device, mixed_precision=False)
    _init_root(forward, pad_id, device)
    forward.forward_calls = 0

    def count(module, args, kwargs):
        module.forward_calls += 1
    forward.register_forward_pre_hook(count, with_kwargs=True)
    return forward


def _init_root(forward: nn.Module, pad_id, device) -> None:
    """A no-grad forward of one token: initializes the root's FSDP state (module docstring)."""
    from ..models.train_forward import dummy_micro_batch
    dummy = dummy_micro_batch(pad_id or 0, device)
    with torch.no_grad():
        forward(*(dummy[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")))


def pad_frozen_forwards(forward: nn.Module, pad_id, device) -> None:
    """Run one-token no-grad forwards of the sharded frozen ``forward`` until every process
    has run as many as the busiest one since the last call (each forward gathers every unit:
    a collective). Every process calls it at the same point of the step."""
    import torch.distributed as dist
    n = torch.tensor([forward.forward_calls], dtype=torch.long, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    for _ in range(int(n) - forward.forward_calls):
        _init_root(forward, pad_id, device)
    forward.forward_calls = 0


def shard(root: nn.Module, lm: nn.Module, plan, device, mixed_precision: bool = True) -> nn.Module:
    """``fully_shard`` the decoder layers of ``lm``, its input embedding and its output layer
    (unless they share their weight; the output layer only when its log-probs can be computed
    from its shards), then ``root`` (a module that contains ``lm``); returns ``root``.
    ``mixed_precision=False``: compute in the parameters' dtype whatever the plan."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (plan.world,))
    kw = {"mesh": mesh, "reshard_after_forward": plan.reshard_after_forward}
    mp = precision.fsdp_policy(plan) if mixed_precision else None
    if mp is not None:
        kw["mp_policy"] = mp
    for layer in decoder_layers(lm):
        fully_shard(layer, **kw)
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = emb is not None and head is not None and head.weight is emb.weight
    if emb is not None and not tied:
        fully_shard(emb, **kw)
    head = None if tied else chunked_linear_head(lm)
    if head is not None and head.bias is None:  # its shards compute the log-probs (module docstring)
        fully_shard(head, **kw)
        setattr(head, HEAD_LOGPROBS, functools.partial(sharded_logprobs, head))
    root_mp = precision.fsdp_policy(plan, root=True) if mixed_precision else None
    fully_shard(root, **{**kw, **({"mp_policy": root_mp} if root_mp is not None else {})})
    if device.type == "cpu":
        # No backward prefetch on CPUs: gloo's gathers block (there are no streams to overlap
        # them with compute), so gathering the next unit early only holds it longer, at the
        # peak (the start of the backward). "Prefetch yourself" (a no-op) replaces FSDP2's
        # default of prefetching the previous unit.
        for m in _fsdp_modules(root):
            m.set_modules_to_backward_prefetch([m])
    return root


def _fsdp_modules(root: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(run, root: nn.Module | None = None):
    """Every parameter of the sharded forward ``root`` (default: the training forward) whole for
    the duration (generation, evaluation): one gather per unit instead of one per forward
    call; resharded on exit."""
    plan = run.parallel_plan
    root = run.train_forward if root is None else root
    mods = _fsdp_modules(root)
    root.set_reshard_after_forward(False)
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        root.set_reshard_after_forward(plan.reshard_after_forward)
        if root is run.train_forward:
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
