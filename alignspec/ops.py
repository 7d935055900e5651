"""Pure-torch helpers called by compiler-generated code as ``ops.NAME(...)``.

Layout (see docs/contracts.md):

* action level   ``[B, T]`` with ``mask`` ``[B, T]`` (bool, or float 0/1; any nonzero
  entry counts as valid). Values at masked positions are never read, so padding may
  hold garbage (even ``nan``/``inf``) without leaking into results or gradients.
* response level ``[B]``; groups are contiguous blocks of ``n`` rows, ``B = G * n``.
* group level    ``[G]``.
* batch level    0-dim tensor.

Everything works in float32 and float64 and is differentiable where the math is.
Selectors (``select_*``) are discrete and return ``LongTensor`` within-group indices.

Batch-wide reductions (``whiten``, ``batch_std``, ``batch_sum``, ``token_sum``, and
``batch_mean`` / ``token_mean`` without a ``count``) are over the tensor they get, unless a
runtime splits one batch over processes: inside
``with batch_stats_reduce(sum_fn):`` their sums and counts go through ``sum_fn`` (an
all-reduce with a sum), so every process gets the statistic of the whole batch.

This module is the namespace the generated code reads; the ops live in it and in
alignspec/ops_select.py (selectors), alignspec/batch_order.py (order statistics),
alignspec/batch_reduce.py (batch-wide sums over processes) and alignspec/ops_shapes.py
(argument checks shared by them).
"""

from __future__ import annotations

import torch

from . import batch_reduce as _reduce
from .batch_order import batch_quantile, batch_rank, batch_sorted  # noqa: F401  (re-exported)
from .batch_reduce import _global_sums, batch_stats_reduce, global_cat  # noqa: F401  (the runtime enters it)
from .ops_select import (gather_rows, select_argmax, select_argmin, select_bottom_k,  # noqa: F401
                         select_coreset, select_opt, select_top_k)
from .ops_shapes import _float_dtype, _masked, _num_groups, _valid



__all__ = [
    "sum_tokens",
    "mean_tokens",
    "token_sum",
    "token_mean",
    "batch_mean",
    "batch_sum",
    "batch_std",
    "group_view",
    "broadcast_group",
    "group_mean",
    "group_sum",
    "group_max",
    "group_min",
    "group_logsumexp",
    "group_std",
    "loo_mean",
    "winrate",
    "at_role",
    "last_token",
    "suffix_sum",
    "gae",
    "whiten",
    "clip_fraction",
    "select_argmax",
    "select_argmin",
    "select_top_k",
    "select_bottom_k",
    "select_coreset",
    "select_opt",
    "gather_rows",
    "batch_rank",
    "batch_sorted",
    "batch_quantile",
]


# ---------------------------------------------------------------------------
# token reductions
# ---------------------------------------------------------------------------


def sum_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row masked sum. ``x``, ``mask``: ``[B, T]`` -> ``[B]``.

    ``out[b] = sum_t x[b, t] * mask[b, t]``.
    """
    return _masked(x, _valid(mask)).sum(dim=-1)


def mean_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row masked mean. ``[B, T]`` -> ``[B]``.

    ``out[b] = sum_t x[b, t] * mask[b, t] / max(1, sum_t mask[b, t])``.
    """
    valid = _valid(mask)
    count = valid.sum(dim=-1).to(x.dtype).clamp_min(1)
    return _masked(x, valid).sum(dim=-1) / count


def token_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked sum over all tokens. ``[B, T]`` -> scalar: ``sum_{b,t} x * mask``."""
    return _global_sums(_masked(x, _valid(mask)).sum())[0]


def token_mean(x: torch.Tensor, mask: torch.Tensor, count=None) -> torch.Tensor:
    """Masked token mean. ``[B, T]`` -> scalar.

    ``out = sum_{b,t} x * mask / count``; ``count`` defaults to ``max(1, mask.sum())`` of
    this tensor, or is a global token count (float or 0-dim tensor) passed in from outside
    the micro-batch (used as given).
    """
    valid = _valid(mask)
    total = _masked(x, valid).sum()
    if count is None:
        total, count = _global_sums(total, valid.sum().to(_float_dtype(x)))
        count = count.clamp_min(1)
    return total / count


def batch_mean(x: torch.Tensor, count=None) -> torch.Tensor:
    """Mean of a ``[B]`` or ``[G]`` tensor -> scalar: ``x.sum() / count``.

    ``count`` defaults to ``x.numel()``; pass a global count (float or 0-dim tensor) to
    normalise across micro-batches.
    """
    if count is None:
        total, n = _global_sums(x.sum(), x.new_tensor(float(x.numel())))
        return total / n.clamp_min(1)
    return x.sum() / count


def batch_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a ``[B]`` or ``[G]`` tensor -> scalar (over every process's rows inside
    ``batch_stats_reduce``)."""
    return _global_sums(x.sum())[0]


def batch_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation over all elements -> scalar.

    ``sqrt(sum (x - mean)^2 / (N - 1))`` with ``N = x.numel()`` (ValueError if N < 2).
    """
    if _reduce._BATCH_SUM is None:
        if x.numel() < 2:
            raise ValueError(f"batch_std needs at least 2 elements for the unbiased estimate, got {x.numel()}")
        return x.std(unbiased=True)
    total, n = _global_sums(x.sum(), x.new_tensor(float(x.numel())))
    if n < 2:
        raise ValueError(f"batch_std needs at least 2 elements for the unbiased estimate, got {int(n)}")
    mean = total / n
    (ss,) = _global_sums(((x - mean) ** 2).sum())
    return (ss / (n - 1)).sqrt()


# ---------------------------------------------------------------------------
# group ops
# ---------------------------------------------------------------------------


def group_view(x: torch.Tensor, n: int) -> torch.Tensor:
    """View ``[B, ...]`` as ``[G, n, ...]`` (contiguous groups, ``B = G * n``)."""
    g = _num_groups(x, n)
    return x.reshape(g, int(n), *x.shape[1:])


def broadcast_group(g: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat each group value ``n`` times: ``[G, ...]`` -> ``[G*n, ...]``.

    ``out[i*n + j] = g[i]`` for ``j < n``.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"group size n must be >= 1, got {n}")
    return g.repeat_interleave(n, dim=0)


def group_mean(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B]`` -> ``[G]``: ``out[g] = (1/n) sum_j x[g*n + j]``."""
    return group_view(x, n).mean(dim=1)


def group_sum(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B]`` -> ``[G]``: ``out[g] = sum_j x[g*n + j]``."""
    return group_view(x, n).sum(dim=1)


def group_max(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B]`` -> ``[G]``: ``out[g] = max_j x[g*n + j]``."""
    return group_view(x, n).amax(dim=1)


def group_min(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B]`` -> ``[G]``: ``out[g] = min_j x[g*n + j]``."""
    return group_view(x, n).amin(dim=1)


def group_logsumexp(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B]`` -> ``[G]``: ``out[g] = log sum_j exp(x[g*n + j])`` (stable)."""
    return torch.logsumexp(group_view(x, n), dim=1)


def group_std(x: torch.Tensor, n: int, unbiased: bool = True) -> torch.Tensor:
    """``[B]`` -> ``[G]``: ``sqrt(sum_j (x_gj - mean_g)^2 / (n - 1))`` (``/ n`` if not unbiased).

    Raises ValueError when ``n < 2`` and ``unbiased``.
    """
    if unbiased and int(n) < 2:
        raise ValueError(f"group_std(unbiased=True) needs group size n >= 2, got n={n}")
    return group_view(x, n).std(dim=1, unbiased=bool(unbiased))


def loo_mean(x: torch.Tensor, n: int) -> torch.Tensor:
    """Leave-one-out group mean. ``[B]`` -> ``[B]``.

    ``out[i] = (sum_{j in group(i)} x_j - x_i) / (n - 1)``; ValueError if ``n < 2``.
    """
    if int(n) < 2:
        raise ValueError(f"loo_mean needs group size n >= 2, got n={n}")
    return (broadcast_group(group_sum(x, n), n) - x) / (int(n) - 1)


def winrate(s: torch.Tensor, n: int) -> torch.Tensor:
    """Mean in-group pairwise win probability. ``[B]`` -> ``[B]``.

    ``out[i] = (1/n) sum_{j in group(i)} sigmoid(s_i - s_j)`` (``j = i`` included,
    contributing 0.5). Materialises ``[G, n, n]``.
    """
    v = group_view(s, n)
    p = torch.sigmoid(v.unsqueeze(2) - v.unsqueeze(1))
    return p.mean(dim=2).reshape(s.shape)


def at_role(x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Pick row ``k`` of each group. ``[B]`` -> ``[G]``: ``out[g] = x[g*n + k]``.

    (For pairs, ``k = 0`` is chosen and ``k = 1`` rejected.)
    """
    n = int(n)
    k = int(k)
    if not 0 <= k < n:
        raise ValueError(f"role index k must satisfy 0 <= k < n={n}, got k={k}")
    return group_view(x, n)[:, k]


# ---------------------------------------------------------------------------
# action-level shaping
# ---------------------------------------------------------------------------


def last_token(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place a response-level value on each row's last valid token. ``[B]`` -> ``[B, T]``.

    ``out[b, t] = x[b]`` if ``t`` is the largest valid position of row ``b``, else 0;
    rows with no valid token are all zero.
    """
    valid = _valid(mask)
    if valid.dim() != 2 or x.shape != valid.shape[:1]:
        raise ValueError(f"last_token expects x [B] and mask [B, T], got {tuple(x.shape)} and {tuple(valid.shape)}")
    t = valid.shape[1]
    has = valid.any(dim=1)
    # first True in the flipped row is the last True in the row (argmax returns the first max).
    last = (t - 1) - valid.flip(1).to(torch.uint8).argmax(dim=1)
    pos = torch.arange(t, device=valid.device)
    hit = (pos.unsqueeze(0) == last.unsqueeze(1)) & has.unsqueeze(1)
    return torch.where(hit, x.unsqueeze(1), torch.zeros((), dtype=x.dtype, device=x.device))


def suffix_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse cumulative sum over valid positions. ``[B, T]`` -> ``[B, T]``.

    ``out[b, t] = mask[b, t] * sum_{s >= t} x[b, s] * mask[b, s]``.
    """
    valid = _valid(mask)
    xm = _masked(x, valid)
    rev = xm.flip(-1).cumsum(dim=-1).flip(-1)
    return _masked(rev, valid)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma, lam) -> torch.Tensor:
    """Generalized advantage estimation. ``rewards``, ``values``, ``mask``: ``[B, T]`` -> ``[B, T]``.

    Masked positions are treated as absent. Walking each row backwards over its valid
    positions, with ``t'`` the next valid position after ``t`` (``V_{t'} = 0``, ``A_{t'} = 0``
    past the last one)::

        delta_t = r_t + gamma * V_{t'} - V_t
        A_t     = delta_t + gamma * lam * A_{t'}

    Result is 0 at masked positions. Loops over T, vectorised over B.
    """
    valid = _valid(mask)
    if rewards.shape != valid.shape or values.shape != valid.shape:
        raise ValueError(
            f"gae expects rewards, values, mask of one shape [B, T], got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(valid.shape)}"
        )
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    r = _masked(rewards.to(dtype), valid)
    v = _masked(values.to(dtype), valid)
    b, t_len = valid.shape
    zero = torch.zeros(b, dtype=dtype, device=r.device)
    next_v = zero
    next_a = zero
    out = [None] * t_len
    for t in range(t_len - 1, -1, -1):
        ok = valid[:, t]
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_a
        a = torch.where(ok, a, zero)
        out[t] = a
        next_v = torch.where(ok, v[:, t], next_v)
        next_a = torch.where(ok, a, next_a)
    if t_len == 0:
        return torch.zeros(b, 0, dtype=dtype, device=r.device)
    return torch.stack(out, dim=1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """Masked whitening (as TRL's ``masked_whiten``). Any shape -> same shape.

    With ``N = sum(mask)``: ``mean = sum(x*mask)/N``,
    ``var = sum((x-mean)^2 * mask) / (N - 1)`` (denominator clamped to >= 1),
    ``out = (x - mean) * rsqrt(var + 1e-8)``, plus ``mean`` if ``shift_mean`` is False.
    Statistics are over all valid elements together; masked positions are 0 in the output.
    ``mask=None`` means every element is valid.
    """
    if mask is None:
        valid = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    else:
        valid = _valid(mask)
    xm = _masked(x, valid)
    total, n = _global_sums(xm.sum(), valid.sum().to(x.dtype))
    mean = total / n.clamp_min(1)
    centered = _masked(x - mean, valid)
    (ss,) = _global_sums((centered * centered).sum())
    var = ss / (n - 1).clamp_min(1)
    out = centered * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return _masked(out, valid)


def clip_fraction(ratio: torch.Tensor, lo, hi, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of (valid) elements outside ``[lo, hi]`` -> float scalar (no gradient).

    ``sum(((ratio < lo) | (ratio > hi)) & mask) / max(1, sum(mask))``.
    """
    out_dtype = _float_dtype(ratio)
    with torch.no_grad():
        clipped = (ratio < lo) | (ratio > hi)
        if mask is None:
            count = max(1, ratio.numel())
            return clipped.sum().to(out_dtype) / count
        valid = _valid(mask)
        if valid.shape != ratio.shape:
            raise ValueError(f"ratio shape {tuple(ratio.shape)} does not match mask shape {tuple(valid.shape)}")
        count = valid.sum().to(out_dtype).clamp_min(1)
        return (clipped & valid).sum().to(out_dtype) / count


def taken_mask(picks, n):
    """`[G, n]` bool: True at the within-group indices already in `picks` (`[G, m]`)."""
    taken = torch.zeros(picks.shape[0], n, dtype=torch.bool, device=picks.device)
    if picks.numel():
        taken.scatter_(1, picks, True)
    return taken


def kept_rows(keep, n, picks=None):
    """Row indices of the training batch: the rows of kept groups (all of them, or `picks`).

    `keep` is `[G]` bool (None keeps every group); `picks` `[G, m]` within-group indices.
    Returns a `[G_kept * m]` LongTensor in group-major order, so the result is again
    contiguous groups (of size m, or n without picks).
    """
    if picks is None:
        g = keep.shape[0] if keep is not None else None
        picks = torch.arange(n, device=keep.device if keep is not None else None).expand(g, n)
    groups = torch.arange(picks.shape[0], device=picks.device)
    if keep is not None:
        groups, picks = groups[keep], picks[keep]
    return (groups[:, None] * n + picks).reshape(-1)


def local_totals(batch, n, need=("tokens", "responses", "groups")):
    """Normalizers of one batch on its own: valid tokens, responses and groups.

    Only the keys in `need` are computed (counting tokens reads the whole mask).
    """
    rows = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)
    out = {"responses": max(rows, 1), "groups": max(rows // n, 1)}
    if "tokens" in need:
        mask = batch.get("mask")
        tokens = _valid(mask).sum() if mask is not None else torch.tensor(0)
        out["tokens"] = tokens.clamp(min=1)
    return out


def batch_share(batch, totals, n):
    """This batch's share of the whole optimizer batch (its responses over ``totals``'):
    the shares of its micro-batches on every process add up to 1. A loss term that reads no
    trained quantity is scaled by it, so it counts once in the step's loss and metrics."""
    mask = batch.get("mask")
    rows = mask.shape[0] if torch.is_tensor(mask) else local_totals(batch, n, need=())["responses"]
    return rows / totals["responses"]


def float_dtype(batch) -> torch.dtype:
    """The widest floating dtype among the batch's tensors (the default dtype if none): the
    type of numbers the generated code makes into tensors (``where(c, 0.3, 1)``)."""
    best = None
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            if best is None or torch.finfo(v.dtype).bits > torch.finfo(best).bits:
                best = v.dtype
    return best or torch.get_default_dtype()


def valid_mask(mask):
    """The mask as bool, converted once per stage so every masked reduction reuses it."""
    return _valid(mask)
