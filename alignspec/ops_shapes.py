"""Argument checks and small helpers shared by the ops modules (alignspec/ops.py,
ops_select.py, batch_order.py): masks as bool, masked values, group counts, exclusions."""

from __future__ import annotations

import torch



def _valid(mask: torch.Tensor) -> torch.Tensor:
    """Boolean view of a mask (bool, or float/int where nonzero = valid)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    return mask if mask.dtype == torch.bool else mask != 0


def _masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x where valid, exact 0 elsewhere (gradient 0 at invalid positions)."""
    if x.shape != valid.shape:
        raise ValueError(f"tensor shape {tuple(x.shape)} does not match mask shape {tuple(valid.shape)}")
    return torch.where(valid, x, 0.0)


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _num_groups(x: torch.Tensor, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            n = int(n)
        except Exception as e:  # pragma: no cover - defensive
            raise TypeError(f"group size n must be an int, got {n!r}") from e
    if n < 1:
        raise ValueError(f"group size n must be >= 1, got {n}")
    if x.dim() < 1:
        raise ValueError("group ops need a tensor with a leading batch dimension, got a 0-dim tensor")
    b = x.shape[0]
    if b % n != 0:
        raise ValueError(f"batch size {b} is not a multiple of the group size n={n}")
    return b // n


def _check_exclude(exclude, g: int, n: int, device) -> torch.Tensor:
    if exclude is None:
        return torch.zeros(g, n, dtype=torch.bool, device=device)
    exclude = _valid(exclude)
    if tuple(exclude.shape) != (g, n):
        raise ValueError(f"exclude must have shape [G, n] = [{g}, {n}], got {tuple(exclude.shape)}")
    return exclude


def _check_k(k: int, n: int) -> int:
    k = int(k)
    if k < 0 or k > n:
        raise ValueError(f"k must satisfy 0 <= k <= n={n}, got k={k}")
    return k
