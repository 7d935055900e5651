"""Mixed precision: float32 master weights and optimizer state, low-precision compute.

``mixed_precision: bf16 | fp16`` (``no``: everything in the weights' dtype) is separate from
``dtype``, which *stores* the weights in low precision (no float32 master copy):

- under ``parallel=fsdp2``, FSDP2's own :class:`MixedPrecisionPolicy` (:func:`fsdp_policy`):
  the sharded parameters stay float32 (so do the AdamW moments, which the optimizer allocates
  like them); each unit's parameters are gathered in bf16, the forward and backward run in
  bf16, gradients are reduced in float32 and land on the float32 shards;
- otherwise (one process, DDP) ``accelerate``'s autocast (:func:`accelerator_setting`): the
  training forward runs under ``torch.autocast`` and, for fp16, accelerate's ``GradScaler``
  scales the loss, unscales before clipping and skips steps with overflowed gradients.

The no-grad forwards of frozen models (reference) run in their own dtype.
"""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(plan) -> torch.dtype | None:
    """The low-precision compute dtype of ``plan`` (None: no mixed precision)."""
    return DTYPES.get(plan.mixed_precision)


def accelerator_setting(plan) -> str:
    """``Accelerator(mixed_precision=...)``: autocast (+ loss scaling for fp16) for DDP / one
    process; ``"no"`` under FSDP2, whose policy casts instead (:func:`fsdp_policy`).

    accelerate keeps one ``AcceleratorState`` per process and refuses an ``Accelerator`` with
    another precision than the state's; a process that builds engines one after the other
    (pipelines, tests) gets the state's precision reset here (the process group is kept)."""
    mp = "no" if plan.fsdp2 else plan.mixed_precision
    from accelerate.state import AcceleratorState
    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != mp:
        AcceleratorState._reset_state(reset_partial_state=False)
    return mp


def fsdp_policy(plan, root: bool = False):
    """FSDP2's ``MixedPrecisionPolicy`` for ``plan``: bf16 gathers and compute, float32
    gradient reduction; the root also returns float32 outputs. None without mixed precision."""
    dtype = compute_dtype(plan)
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                output_dtype=torch.float32 if root else None)
