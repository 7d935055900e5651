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
"""

from __future__ import annotations

import contextlib

import torch

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


# ---------------------------------------------------------------------------
# internal helpers
# ---------------------------------------------------------------------------


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
    if _BATCH_SUM is None:
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


# ---------------------------------------------------------------------------
# selectors (discrete; return within-group indices [G, m] as LongTensor)
# ---------------------------------------------------------------------------


def _order(x: torch.Tensor, n: int, exclude, descending: bool):
    """Per-group within-group indices ordered by (excluded last, x, index) and the
    number of non-excluded rows per group. Returns (order [G, n], n_ok [G], excl [G, n])."""
    g = _num_groups(x, n)
    if x.dim() != 1:
        raise ValueError(f"selectors expect a response-level [B] tensor, got shape {tuple(x.shape)}")
    excl = _check_exclude(exclude, g, int(n), x.device)
    v = x.detach().reshape(g, int(n))
    # Two stable sorts give the lexicographic order (excluded, x, index).
    order = torch.sort(v, dim=1, descending=descending, stable=True).indices
    ex_sorted = torch.gather(excl, 1, order).to(torch.uint8)
    order = torch.gather(order, 1, torch.sort(ex_sorted, dim=1, stable=True).indices)
    return order, (~excl).sum(dim=1), excl


def _check_enough(n_ok: torch.Tensor, k: int, what: str) -> None:
    if k > 0 and bool((n_ok < k).any()):
        g = int(torch.nonzero(n_ok < k)[0, 0])
        raise ValueError(
            f"{what}: group {g} has only {int(n_ok[g])} selectable (non-excluded) rows, need k={k}"
        )


def select_top_k(x: torch.Tensor, n: int, k: int, exclude=None) -> torch.Tensor:
    """Indices of the ``k`` largest ``x`` per group, descending. ``[B]`` -> ``[G, k]`` long.

    Ties go to the lower index; rows with ``exclude[g, j]`` are never picked (ValueError if a
    group has fewer than ``k`` selectable rows).
    """
    k = _check_k(k, int(n))
    order, n_ok, _ = _order(x, n, exclude, descending=True)
    _check_enough(n_ok, k, "select_top_k")
    return order[:, :k].contiguous()


def select_bottom_k(x: torch.Tensor, n: int, k: int, exclude=None) -> torch.Tensor:
    """Indices of the ``k`` smallest ``x`` per group, ascending. ``[B]`` -> ``[G, k]`` long.

    Ties go to the lower index; excluded rows are never picked.
    """
    k = _check_k(k, int(n))
    order, n_ok, _ = _order(x, n, exclude, descending=False)
    _check_enough(n_ok, k, "select_bottom_k")
    return order[:, :k].contiguous()


def select_argmax(x: torch.Tensor, n: int, exclude=None) -> torch.Tensor:
    """Index of the largest non-excluded ``x`` per group. ``[B]`` -> ``[G, 1]`` long."""
    return select_top_k(x, n, 1, exclude)


def select_argmin(x: torch.Tensor, n: int, exclude=None) -> torch.Tensor:
    """Index of the smallest non-excluded ``x`` per group. ``[B]`` -> ``[G, 1]`` long."""
    return select_bottom_k(x, n, 1, exclude)


def _group_candidates(x: torch.Tensor, emb: torch.Tensor, n: int, k: int, exclude, what: str):
    """Shared prep for coreset/opt: per group, the candidate within-group indices sorted by
    (x, index) ascending, as Python lists, plus float64 CPU copies of x and emb."""
    n = int(n)
    k = _check_k(k, n)
    order, n_ok, _ = _order(x, n, exclude, descending=False)
    _check_enough(n_ok, k, what)
    g = order.shape[0]
    if emb.dim() != 2 or emb.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: emb must have shape [B, D] with B={x.shape[0]}, got {tuple(emb.shape)}")
    xv = x.detach().to("cpu", torch.float64).reshape(g, n)
    ev = emb.detach().to("cpu", torch.float64).reshape(g, n, emb.shape[1])
    order = order.cpu()
    n_ok = n_ok.cpu()
    cands = [order[i, : int(n_ok[i])] for i in range(g)]
    return k, xv, ev, cands


def _sort_by_x(idx: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
    """Sort within-group indices by (x, index) ascending."""
    idx = torch.sort(idx, stable=True).values
    return idx[torch.sort(xg[idx], stable=True).indices]


def select_coreset(x: torch.Tensor, emb: torch.Tensor, n: int, k: int, exclude=None, iters: int = 20) -> torch.Tensor:
    """AMPO-Coreset selection. ``x`` ``[B]``, ``emb`` ``[B, D]`` -> ``[G, k]`` long.

    Per group, over non-excluded rows: k-means on ``emb`` into ``k`` clusters, initialised by
    farthest-point traversal starting at the lowest-``x`` row (ties in the traversal go to the
    lower-``x`` row), then up to ``iters`` Lloyd steps (nearest centre, ties to the lower
    cluster id; an empty cluster keeps its centre; stops early when assignments are stable).
    From each non-empty cluster take its lowest-``x`` row; if fewer than ``k`` clusters are
    non-empty, fill with the lowest-``x`` rows not yet chosen. The ``k`` picks are returned
    sorted by ``x`` ascending (ties: lower index).
    """
    k, xv, ev, cands = _group_candidates(x, emb, n, k, exclude, "select_coreset")
    g = xv.shape[0]
    out = torch.empty(g, k, dtype=torch.long)
    for gi in range(g):
        if k == 0:
            continue
        c = cands[gi]  # sorted by (x, index) ascending
        pts = ev[gi, c]  # [m, D]
        d = torch.cdist(pts, pts)  # [m, m]
        # farthest-point init (position 0 is the lowest-x candidate)
        centres = [0]
        mind = d[0].clone()
        for _ in range(1, k):
            nxt = int(torch.argmax(mind))  # first max = lowest x among ties
            centres.append(nxt)
            mind = torch.minimum(mind, d[nxt])
        cent = pts[centres].clone()  # [k, D]
        assign = None
        for _ in range(max(1, int(iters))):
            new_assign = torch.argmin(torch.cdist(pts, cent), dim=1)  # first min on ties
            if assign is not None and torch.equal(new_assign, assign):
                break
            assign = new_assign
            for ci in range(k):
                members = assign == ci
                if bool(members.any()):
                    cent[ci] = pts[members].mean(dim=0)
        chosen = []
        for ci in range(k):
            members = torch.nonzero(assign == ci).flatten()
            if members.numel() > 0:
                chosen.append(int(members.min()))  # lowest position = lowest x
        taken = set(chosen)
        for pos in range(len(c)):
            if len(chosen) >= k:
                break
            if pos not in taken:
                chosen.append(pos)
                taken.add(pos)
        out[gi] = _sort_by_x(c[torch.tensor(chosen, dtype=torch.long)], xv[gi])
    return out.to(x.device)


def _medoid_cost(w: torch.Tensor, d: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * min_{j in sel} d[i, j]."""
    return (w * d[:, sel].amin(dim=1)).sum()


def select_opt(x: torch.Tensor, emb: torch.Tensor, n: int, k: int, exclude=None, iters: int = 50) -> torch.Tensor:
    """AMPO-Opt-Select (weighted k-medoids). ``x`` ``[B]``, ``emb`` ``[B, D]`` -> ``[G, k]`` long.

    Per group, over the candidate (non-excluded) rows ``C``: ``w_i = exp(mean_C(x) - x_i)``,
    ``cost(S) = sum_{i in C} w_i * min_{j in S} ||e_i - e_j||_2`` for ``S`` subset of ``C``,
    ``|S| = k``. Start from the bottom-k rows; each round evaluate every swap (medoid ->
    non-medoid) and apply the best one if it lowers the cost; stop when none does or after
    ``iters`` rounds. Weights are computed as ``exp(min_C(x) - x_i)`` (the same up to a
    positive factor, so the same argmin, without overflow). Returned sorted by ``x`` ascending.
    """
    k, xv, ev, cands = _group_candidates(x, emb, n, k, exclude, "select_opt")
    g = xv.shape[0]
    out = torch.empty(g, k, dtype=torch.long)
    for gi in range(g):
        if k == 0:
            continue
        c = cands[gi]  # sorted by (x, index) ascending
        m = c.numel()
        xs = xv[gi, c]
        w = torch.exp(xs.min() - xs)  # proportional to exp(mean - x)
        d = torch.cdist(ev[gi, c], ev[gi, c])  # [m, m]
        sel = torch.arange(k)  # bottom-k init (positions in c)
        cost = _medoid_cost(w, d, sel)
        for _ in range(int(iters)):
            if k == m:
                break
            inside = torch.zeros(m, dtype=torch.bool)
            inside[sel] = True
            outside = torch.nonzero(~inside).flatten()  # [m-k]
            dsel = d[:, sel]  # [m, k]
            # min distance to the medoids other than the p-th one: [k, m]
            if k > 1:
                eye = torch.eye(k, dtype=torch.bool)
                rest = dsel.unsqueeze(0).masked_fill(eye.unsqueeze(1), float("inf")).amin(dim=2)
            else:
                rest = torch.full((1, m), float("inf"), dtype=d.dtype)
            # swap p -> h: [k, m-k, m]
            cand_min = torch.minimum(rest.unsqueeze(1), d[:, outside].T.unsqueeze(0))
            costs = (cand_min * w).sum(dim=2)  # [k, m-k]
            best = int(torch.argmin(costs))
            p, h = divmod(best, outside.numel())
            new_cost = costs[p, h]
            if not bool(new_cost < cost - 1e-12 * max(1.0, float(cost.abs()))):
                break
            sel = sel.clone()
            sel[p] = outside[h]
            cost = new_cost
        out[gi] = _sort_by_x(c[sel], xv[gi])
    return out.to(x.device)


def gather_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Flat row indices for within-group picks. ``idx`` ``[G, m]`` -> ``[G*m]`` long.

    ``out[g*m + j] = g*n + idx[g, j]`` (group-major, so the result is again contiguous groups
    of size ``m``).
    """
    if idx.dim() != 2:
        raise ValueError(f"gather_rows expects idx of shape [G, m], got {tuple(idx.shape)}")
    g = idx.shape[0]
    base = torch.arange(g, device=idx.device, dtype=torch.long).unsqueeze(1) * int(n)
    return (base + idx.long()).reshape(-1)


# ---------------------------------------------------------------- filter and selection plumbing
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


from .batch_order import batch_quantile, batch_rank, batch_sorted  # noqa: E402  (they read global_cat)
