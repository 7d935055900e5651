"""Selectors (``ops.select_*``): discrete picks within each group, returned as ``LongTensor``
within-group indices ``[G, m]``; ``gather_rows`` turns them into flat row indices."""

from __future__ import annotations

import torch

from .ops_shapes import _check_exclude, _check_k, _num_groups


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
