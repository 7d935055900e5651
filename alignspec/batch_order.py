"""Order statistics over the whole batch: ranks, sorted values and quantiles (``ops.batch_*``).

They are rollout-time statistics (the checker keeps them out of per-update code), computed
once per rollout over every row of the batch -- and, inside ``ops.batch_stats_reduce(sum_fn,
gather_fn)``, over every process's rows: ``gather_fn(x)`` returns the concatenation of every
process's ``x`` in process order and this process's offset in it. So micro-batches and
processes see the statistic of the whole batch.

Ties are broken by position in the (gathered) batch, as a stable sort does. Results carry no
gradient.
"""

from __future__ import annotations

import torch

from .batch_reduce import global_cat
from .ops_shapes import _valid


def _flat(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    x = x.detach()
    if mask is not None:
        return x[_valid(mask).bool()] if x.shape == mask.shape else x.reshape(-1)
    if x.dim() != 1:
        raise ValueError(f"expected a [B] or [G] tensor, got shape {tuple(x.shape)}")
    return x


def _float(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def batch_rank(x: torch.Tensor) -> torch.Tensor:
    """Rank of each element of ``x`` (``[B]`` or ``[G]``) among all of the batch's: 0 for the
    smallest, ``N - 1`` for the largest (``N`` counted over every process)."""
    flat = _flat(x)
    everything, offset = global_cat(flat)
    order = torch.argsort(everything, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks[offset:offset + flat.numel()].to(_float(x))


def batch_sorted(x: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """The value of rank ``rank`` (0-based, per element) among all of the batch's values of
    ``x`` sorted ascending: ``sort(x over the batch)[rank]``. With ``rank = batch_rank(y)`` it
    pairs each row's ``y`` with the equally ranked ``x`` (AOT's sorted log-ratios)."""
    everything, _ = global_cat(_flat(x))
    s = torch.sort(everything, stable=True).values
    if s.numel() == 0:
        raise ValueError("batch_sorted of an empty batch")
    idx = rank.detach().round().long()
    if bool(((idx < 0) | (idx >= s.numel())).any()):
        raise ValueError(f"batch_sorted: ranks must lie in 0..{s.numel() - 1}, got {idx.min()}..{idx.max()}")
    return s[idx].to(_float(x))


def batch_quantile(x: torch.Tensor, q, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``q``-quantile (0 <= q <= 1) of every valid value of ``x`` in the batch, a scalar:
    ``[B, T]`` values with ``mask`` (valid tokens only) or ``[B]``/``[G]``. Linear
    interpolation between order statistics, as ``torch.quantile`` and ``numpy.quantile``."""
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"batch_quantile: q must lie in [0, 1], got {q}")
    everything, _ = global_cat(_flat(x, mask))
    if everything.numel() == 0:
        raise ValueError("batch_quantile of an empty batch (no valid values)")
    s = torch.sort(everything.to(torch.float64)).values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return (s[lo] + (pos - lo) * (s[hi] - s[lo])).to(_float(x))
