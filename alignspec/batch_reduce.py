"""Batch-wide sums and gathers over processes: inside ``batch_stats_reduce(sum_fn, gather_fn)``
the ops' batch statistics (alignspec/ops.py) and order statistics (alignspec/batch_order.py)
see every process's rows. Outside it, each sees the tensor it gets."""

from __future__ import annotations

import contextlib

import torch



_BATCH_SUM = None  # set by batch_stats_reduce: sums a tensor over processes
_BATCH_GATHER = None  # set by batch_stats_reduce: concatenates a 1-D tensor over processes


@contextlib.contextmanager
def batch_stats_reduce(sum_fn, gather_fn=None):
    """Within the block, batch-wide statistics sum their partial sums and counts with
    ``sum_fn(tensor) -> tensor`` (e.g. an all-reduce over processes), and order statistics
    (``batch_rank``, ``batch_sorted``, ``batch_quantile``) see every process's values through
    ``gather_fn(x) -> (concatenation in process order, this process's offset)``. Every process
    must run the same statistics in the same order (they run the same compiled code)."""
    global _BATCH_SUM, _BATCH_GATHER
    prev, _BATCH_SUM = _BATCH_SUM, sum_fn
    prev_g, _BATCH_GATHER = _BATCH_GATHER, gather_fn
    try:
        yield
    finally:
        _BATCH_SUM, _BATCH_GATHER = prev, prev_g


def global_cat(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The 1-D ``x`` of every process, concatenated in process order, and this process's
    offset in it (``x`` itself and 0 outside :func:`batch_stats_reduce`)."""
    if _BATCH_GATHER is None:
        if _BATCH_SUM is not None:
            raise RuntimeError("an order statistic over several processes needs batch_stats_reduce(sum_fn, gather_fn)")
        return x, 0
    return _BATCH_GATHER(x)


def _global_sums(*parts: torch.Tensor) -> list[torch.Tensor]:
    """The 0-dim ``parts`` summed over processes (one reduction), or as given outside
    :func:`batch_stats_reduce`. Gradients flow to the local parts."""
    if _BATCH_SUM is None:
        return list(parts)
    local = torch.stack([p.detach().to(torch.float64) for p in parts])
    total = _BATCH_SUM(local.clone())
    # the other processes' share as a constant: value global, gradient local
    return [p + (t - l).to(p.dtype) for p, t, l in zip(parts, total, local)]
