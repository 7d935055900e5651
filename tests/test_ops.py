"""Tests for alignspec.ops against naive, loop-based references (float64)."""

import itertools
import math

import pytest
import torch

from alignspec import ops

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


def _uneven_mask(as_bool=False):
    # rows: full, left-aligned prefix, right-aligned, holes, empty
    m = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 1, 1],
            [1, 0, 1, 0, 0, 1],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 0],
        ],
        dtype=DT,
    )
    return m.bool() if as_bool else m


# ---------------------------------------------------------------------------
# token reductions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_bool", [False, True])
def test_token_reductions_vs_loops(as_bool):
    x = _rand(6, 6, seed=1)
    mask = _uneven_mask(as_bool)
    mf = _uneven_mask(False)
    B, T = x.shape
    sums, means = [], []
    for b in range(B):
        s = 0.0
        c = 0
        for t in range(T):
            if mf[b, t] == 1:
                s += float(x[b, t])
                c += 1
        sums.append(s)
        means.append(s / max(c, 1))
    torch.testing.assert_close(ops.sum_tokens(x, mask), torch.tensor(sums, dtype=DT))
    torch.testing.assert_close(ops.mean_tokens(x, mask), torch.tensor(means, dtype=DT))
    tot = sum(sums)
    ntok = int(mf.sum())
    torch.testing.assert_close(ops.token_sum(x, mask), torch.tensor(tot, dtype=DT))
    torch.testing.assert_close(ops.token_mean(x, mask), torch.tensor(tot / ntok, dtype=DT))
    # external global count: float and 0-dim tensor
    torch.testing.assert_close(ops.token_mean(x, mask, count=40.0), torch.tensor(tot / 40.0, dtype=DT))
    torch.testing.assert_close(
        ops.token_mean(x, mask, count=torch.tensor(40.0, dtype=DT)), torch.tensor(tot / 40.0, dtype=DT)
    )
    assert ops.mean_tokens(x, mask)[4] == 0  # empty row -> 0, not nan
    assert ops.token_mean(x, mask).dim() == 0


def test_masked_garbage_does_not_leak():
    x = _rand(6, 6, seed=2)
    mask = _uneven_mask()
    x = torch.where(mask.bool(), x, torch.full_like(x, float("nan")))
    x.requires_grad_(True)
    out = ops.mean_tokens(x, mask).sum() + ops.token_mean(x, mask) + ops.suffix_sum(x, mask).sum()
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask.bool()] == 0).all()


def test_empty_mask_token_mean():
    x = _rand(2, 3, seed=3)
    m = torch.zeros(2, 3, dtype=DT)
    assert ops.token_mean(x, m) == 0
    assert ops.token_sum(x, m) == 0


def test_batch_mean_std():
    x = _rand(7, seed=4)
    vals = [float(v) for v in x]
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
    torch.testing.assert_close(ops.batch_mean(x), torch.tensor(mu, dtype=DT))
    torch.testing.assert_close(ops.batch_mean(x, count=10), torch.tensor(sum(vals) / 10, dtype=DT))
    torch.testing.assert_close(ops.batch_std(x), torch.tensor(sd, dtype=DT))
    with pytest.raises(ValueError):
        ops.batch_std(x[:1])


# ---------------------------------------------------------------------------
# group ops
# ---------------------------------------------------------------------------


def test_group_view_and_broadcast():
    x = torch.arange(12, dtype=DT)
    v = ops.group_view(x, 4)
    assert v.shape == (3, 4)
    assert v[1].tolist() == [4, 5, 6, 7]
    g = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    assert ops.broadcast_group(g, 2).tolist() == [1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        ops.group_view(x, 5)


def test_group_reductions_vs_loops():
    n, G = 4, 3
    x = _rand(G * n, seed=5)
    rows = [[float(x[g * n + j]) for j in range(n)] for g in range(G)]
    mean = [sum(r) / n for r in rows]
    ssum = [sum(r) for r in rows]
    mx = [max(r) for r in rows]
    mn = [min(r) for r in rows]
    lse = [math.log(sum(math.exp(v) for v in r)) for r in rows]
    sd_u = [math.sqrt(sum((v - m) ** 2 for v in r) / (n - 1)) for r, m in zip(rows, mean)]
    sd_b = [math.sqrt(sum((v - m) ** 2 for v in r) / n) for r, m in zip(rows, mean)]

    def T(v):
        return torch.tensor(v, dtype=DT)

    torch.testing.assert_close(ops.group_mean(x, n), T(mean))
    torch.testing.assert_close(ops.group_sum(x, n), T(ssum))
    torch.testing.assert_close(ops.group_max(x, n), T(mx))
    torch.testing.assert_close(ops.group_min(x, n), T(mn))
    torch.testing.assert_close(ops.group_logsumexp(x, n), T(lse))
    torch.testing.assert_close(ops.group_std(x, n), T(sd_u))
    torch.testing.assert_close(ops.group_std(x, n, unbiased=False), T(sd_b))

    loo = []
    for g in range(G):
        for i in range(n):
            loo.append(sum(rows[g][j] for j in range(n) if j != i) / (n - 1))
    torch.testing.assert_close(ops.loo_mean(x, n), T(loo))

    for k in range(n):
        torch.testing.assert_close(ops.at_role(x, n, k), T([rows[g][k] for g in range(G)]))
    with pytest.raises(ValueError):
        ops.at_role(x, n, n)


def test_group_errors_small_n():
    x = _rand(4, seed=6)
    with pytest.raises(ValueError, match="n >= 2"):
        ops.group_std(x, 1)
    with pytest.raises(ValueError):
        ops.loo_mean(x, 1)
    # biased std with n == 1 is fine (zero)
    assert (ops.group_std(x, 1, unbiased=False) == 0).all()


def test_winrate_vs_matrix():
    n, G = 5, 2
    s = _rand(G * n, seed=7)
    ref = []
    for g in range(G):
        K = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                K[i][j] = 1.0 / (1.0 + math.exp(-(float(s[g * n + i]) - float(s[g * n + j]))))
        for i in range(n):
            ref.append(sum(K[i]) / n)
    torch.testing.assert_close(ops.winrate(s, n), torch.tensor(ref, dtype=DT))
    # constant scores -> 0.5 everywhere
    assert torch.allclose(ops.winrate(torch.zeros(6, dtype=DT), 3), torch.full((6,), 0.5, dtype=DT))


# ---------------------------------------------------------------------------
# action-level shaping
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_bool", [False, True])
def test_last_token(as_bool):
    mask = _uneven_mask(as_bool)
    mf = _uneven_mask(False)
    x = torch.arange(1, 7, dtype=DT)
    out = ops.last_token(x, mask)
    ref = torch.zeros(6, 6, dtype=DT)
    for b in range(6):
        last = None
        for t in range(6):
            if mf[b, t] == 1:
                last = t
        if last is not None:
            ref[b, last] = x[b]
    torch.testing.assert_close(out, ref)


def test_suffix_sum():
    mask = _uneven_mask()
    x = _rand(6, 6, seed=8)
    out = ops.suffix_sum(x, mask)
    ref = torch.zeros(6, 6, dtype=DT)
    for b in range(6):
        for t in range(6):
            if mask[b, t] == 1:
                ref[b, t] = sum(float(x[b, s]) for s in range(t, 6) if mask[b, s] == 1)
    torch.testing.assert_close(out, ref)


def test_gae_hand_example():
    g, l = 0.9, 0.8
    r = torch.tensor([[1.0, 0.0, 2.0]], dtype=DT)
    v = torch.tensor([[0.5, 1.0, 0.0]], dtype=DT)
    m = torch.ones(1, 3, dtype=DT)
    # t=2: delta = 2 - 0 = 2, A = 2
    # t=1: delta = 0 + 0.9*0 - 1 = -1, A = -1 + 0.72*2 = 0.44
    # t=0: delta = 1 + 0.9*1 - 0.5 = 1.4, A = 1.4 + 0.72*0.44 = 1.7168
    expected = torch.tensor([[1.7168, 0.44, 2.0]], dtype=DT)
    torch.testing.assert_close(ops.gae(r, v, m, g, l), expected)
    # the same row with padding/holes (garbage in the masked slots) -> masked slots skipped
    r2 = torch.tensor([[1.0, 99.0, 0.0, 2.0, 99.0]], dtype=DT)
    v2 = torch.tensor([[0.5, 99.0, 1.0, 0.0, 99.0]], dtype=DT)
    m2 = torch.tensor([[True, False, True, True, False]])
    expected2 = torch.tensor([[1.7168, 0.0, 0.44, 2.0, 0.0]], dtype=DT)
    torch.testing.assert_close(ops.gae(r2, v2, m2, g, l), expected2)


def _gae_ref(r, v, m, gamma, lam):
    B, T = r.shape
    out = torch.zeros(B, T, dtype=DT)
    for b in range(B):
        idx = [t for t in range(T) if m[b, t] != 0]
        nv, na = 0.0, 0.0
        for t in reversed(idx):
            delta = float(r[b, t]) + gamma * nv - float(v[b, t])
            a = delta + gamma * lam * na
            out[b, t] = a
            nv, na = float(v[b, t]), a
    return out


@pytest.mark.parametrize("as_bool", [False, True])
def test_gae_vs_loop(as_bool):
    mask = _uneven_mask(as_bool)
    r = _rand(6, 6, seed=9)
    v = _rand(6, 6, seed=10)
    ref = _gae_ref(r, v, _uneven_mask(False), 0.9, 0.8)
    torch.testing.assert_close(ops.gae(r, v, mask, 0.9, 0.8), ref)
    # tensor hyper-parameters too
    torch.testing.assert_close(
        ops.gae(r, v, mask, torch.tensor(0.9, dtype=DT), torch.tensor(0.8, dtype=DT)), ref
    )


def test_whiten_vs_formula():
    mask = _uneven_mask()
    x = _rand(6, 6, seed=11) * 3 + 2
    vals = [float(x[b, t]) for b in range(6) for t in range(6) if mask[b, t] == 1]
    N = len(vals)
    mu = sum(vals) / N
    var = sum((v - mu) ** 2 for v in vals) / (N - 1)
    scale = 1.0 / math.sqrt(var + 1e-8)
    ref = torch.zeros(6, 6, dtype=DT)
    ref_keep = torch.zeros(6, 6, dtype=DT)
    for b in range(6):
        for t in range(6):
            if mask[b, t] == 1:
                ref[b, t] = (float(x[b, t]) - mu) * scale
                ref_keep[b, t] = (float(x[b, t]) - mu) * scale + mu
    torch.testing.assert_close(ops.whiten(x, mask), ref)
    torch.testing.assert_close(ops.whiten(x, mask.bool(), shift_mean=False), ref_keep)
    # [B] with mask=None
    y = _rand(9, seed=12)
    yv = [float(v) for v in y]
    m = sum(yv) / 9
    s = math.sqrt(sum((v - m) ** 2 for v in yv) / 8 + 1e-8)
    torch.testing.assert_close(ops.whiten(y), torch.tensor([(v - m) / s for v in yv], dtype=DT))


def test_clip_fraction():
    ratio = torch.tensor([[0.5, 1.0, 1.3], [0.79, 1.21, 1.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=DT)
    # valid: 0.5(out) 1.0(in) 0.79(out) 1.21(out) 1.0(in) -> 3/5
    cf = ops.clip_fraction(ratio, 0.8, 1.2, mask)
    torch.testing.assert_close(cf, torch.tensor(0.6, dtype=DT))
    torch.testing.assert_close(ops.clip_fraction(ratio, 0.8, 1.2), torch.tensor(4 / 6, dtype=DT))
    assert cf.dim() == 0 and cf.is_floating_point()


def test_float32_works():
    x = torch.randn(4, 5, generator=_gen(13))
    m = torch.ones(4, 5)
    assert ops.mean_tokens(x, m).dtype == torch.float32
    assert ops.gae(x, x, m, 0.9, 0.8).dtype == torch.float32
    assert ops.whiten(x, m).dtype == torch.float32
    assert ops.winrate(x[:, 0], 2).dtype == torch.float32


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


def test_gradcheck_reductions():
    mask = _uneven_mask()
    x = _rand(6, 6, seed=14).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ops.mean_tokens(a, mask), (x,))
    assert torch.autograd.gradcheck(lambda a: ops.sum_tokens(a, mask.bool()), (x,))
    assert torch.autograd.gradcheck(lambda a: ops.token_mean(a, mask), (x,))
    assert torch.autograd.gradcheck(lambda a: ops.token_mean(a, mask, count=17.0), (x,))
    assert torch.autograd.gradcheck(lambda a: ops.suffix_sum(a, mask), (x,))
    assert torch.autograd.gradcheck(lambda a: ops.whiten(a, mask), (x,))
    r = _rand(6, seed=15).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ops.last_token(a, mask), (r,))
    assert torch.autograd.gradcheck(lambda a: ops.batch_std(a), (r,))


def test_gradcheck_group_ops():
    n = 3
    x = _rand(6, seed=16).requires_grad_(True)
    for fn in (
        ops.group_mean,
        ops.group_sum,
        ops.group_max,
        ops.group_min,
        ops.group_logsumexp,
        ops.group_std,
        ops.loo_mean,
        ops.winrate,
    ):
        assert torch.autograd.gradcheck(lambda a, fn=fn: fn(a, n), (x,)), fn.__name__
    assert torch.autograd.gradcheck(lambda a: ops.broadcast_group(ops.group_mean(a, n), n), (x,))


# ---------------------------------------------------------------------------
# selectors
# ---------------------------------------------------------------------------


def test_top_bottom_arg():
    x = torch.tensor([3.0, 1.0, 2.0, 5.0, 0.0, 4.0, 4.0, -1.0], dtype=DT)  # n=4, G=2
    # group 0: [3, 1, 2, 5]; group 1: [0, 4, 4, -1] (tie -> lower index)
    assert ops.select_argmax(x, 4).tolist() == [[3], [1]]
    assert ops.select_argmin(x, 4).tolist() == [[1], [3]]
    assert ops.select_top_k(x, 4, 2).tolist() == [[3, 0], [1, 2]]
    assert ops.select_bottom_k(x, 4, 3).tolist() == [[1, 2, 0], [3, 0, 1]]
    ex = torch.tensor([[False, False, False, True], [True, False, False, True]])
    assert ops.select_argmax(x, 4, exclude=ex).tolist() == [[0], [1]]
    assert ops.select_argmin(x, 4, exclude=ex).tolist() == [[1], [1]]
    assert ops.select_top_k(x, 4, 2, exclude=ex).tolist() == [[0, 2], [1, 2]]
    assert ops.select_bottom_k(x, 4, 2, exclude=ex).tolist() == [[1, 2], [1, 2]]
    with pytest.raises(ValueError):
        ops.select_top_k(x, 4, 3, exclude=ex)  # group 1 has only 2 selectable rows
    idx = ops.select_top_k(x, 4, 2)
    assert idx.dtype == torch.long
    assert ops.gather_rows(idx, 4).tolist() == [3, 0, 5, 6]


def _two_cluster_group():
    emb = torch.tensor(
        [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0], [10.1, 10.0], [10.0, 10.1]], dtype=DT
    )
    # the two lowest rewards (rows 0 and 1) share a cluster
    x = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 3.0], dtype=DT)
    return x, emb


def test_coreset_differs_from_bottom_k():
    x, emb = _two_cluster_group()
    assert ops.select_bottom_k(x, 6, 2).tolist() == [[0, 1]]
    assert ops.select_coreset(x, emb, 6, 2).tolist() == [[0, 3]]
    # exclude the lowest row of each cluster -> next lowest in each cluster
    ex = torch.tensor([[True, False, False, True, False, False]])
    assert ops.select_coreset(x, emb, 6, 2, exclude=ex).tolist() == [[1, 4]]
    # two groups stacked, second group permuted
    perm = torch.tensor([5, 3, 1, 0, 4, 2])
    x2 = torch.cat([x, x[perm]])
    e2 = torch.cat([emb, emb[perm]])
    out = ops.select_coreset(x2, e2, 6, 2)
    assert out.tolist() == [[0, 3], [3, 1]]  # rows with x=0.0 and x=1.0 in each group
    assert ops.gather_rows(out, 6).tolist() == [0, 3, 9, 7]


def test_coreset_fill_when_clusters_collapse():
    # all embeddings identical -> one non-empty cluster; fill with lowest-x rows
    x = torch.tensor([0.3, 0.1, 0.2, 0.0], dtype=DT)
    emb = torch.zeros(4, 3, dtype=DT)
    assert ops.select_coreset(x, emb, 4, 3).tolist() == [[3, 1, 2]]


def _opt_cost(x, emb, cand, S):
    xs = [float(x[i]) for i in cand]
    mu = sum(xs) / len(xs)
    total = 0.0
    for i in cand:
        w = math.exp(mu - float(x[i]))
        total += w * min(float(torch.dist(emb[i], emb[j])) for j in S)
    return total


def _opt_brute(x, emb, cand, k):
    best = min(_opt_cost(x, emb, cand, S) for S in itertools.combinations(cand, k))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [2, 3])
def test_opt_select_vs_brute_force(seed, k):
    n = 7
    x = _rand(n, seed=100 + seed)
    emb = _rand(n, 2, seed=200 + seed) * 2
    idx = ops.select_opt(x, emb, n, k)
    assert idx.shape == (1, k)
    S = idx[0].tolist()
    assert len(set(S)) == k
    got = _opt_cost(x, emb, list(range(n)), S)
    assert got == pytest.approx(_opt_brute(x, emb, list(range(n)), k), rel=1e-9)
    # returned ascending in x
    assert [float(x[i]) for i in S] == sorted(float(x[i]) for i in S)


def test_opt_select_exclude_and_groups():
    n, k = 6, 2
    x = _rand(2 * n, seed=300)
    emb = _rand(2 * n, 3, seed=301)
    ex = torch.tensor([[True, False, False, True, False, False], [False] * 6])
    idx = ops.select_opt(x, emb, n, k, exclude=ex)
    assert idx.shape == (2, k)
    assert not any(ex[0, j] for j in idx[0].tolist())
    for g in range(2):
        cand = [j for j in range(n) if not ex[g, j]]
        xg, eg = x[g * n:(g + 1) * n], emb[g * n:(g + 1) * n]
        got = _opt_cost(xg, eg, cand, idx[g].tolist())
        assert got == pytest.approx(_opt_brute(xg, eg, cand, k), rel=1e-9)


def test_opt_select_prefers_spread_and_low_reward():
    # Same two-cluster group: covering both clusters beats two medoids in one cluster.
    x, emb = _two_cluster_group()
    S = ops.select_opt(x, emb, 6, 2)[0].tolist()
    assert S[0] in (0, 1, 2) and S[1] in (3, 4, 5)


# -- batch statistics over processes (ops.batch_stats_reduce) ---------------------------------

def _as_two_processes(fn, parts):
    """Run ``fn(part)`` in two threads that stand for two processes: inside
    ``batch_stats_reduce`` each reduction sums the two threads' tensors (a barrier-based
    all-reduce). Returns the two results."""
    import threading
    slots, ids = [None, None], {}
    barrier = threading.Barrier(2)

    def all_sum(t):
        me = ids[threading.get_ident()]
        slots[me] = t.clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()  # both have read before the next reduction overwrites a slot
        return total

    results = [None, None]

    def work(i):
        ids[threading.get_ident()] = i
        results[i] = fn(parts[i])

    with ops.batch_stats_reduce(all_sum):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


def test_batch_statistics_over_processes_equal_the_whole_batch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    m = (torch.rand(7, 5, generator=g) > 0.3).double()
    r = torch.randn(7, generator=g, dtype=torch.float64)
    halves = [slice(0, 3), slice(3, 7)]  # uneven split
    w = _as_two_processes(lambda s: ops.whiten(x[s], m[s]), halves)
    torch.testing.assert_close(torch.cat(w), ops.whiten(x, m), atol=1e-12, rtol=0)
    std = _as_two_processes(lambda s: ops.batch_std(r[s]), halves)
    assert all(torch.allclose(v, r.std(unbiased=True), atol=1e-12, rtol=0) for v in std)
    mean = _as_two_processes(lambda s: ops.batch_mean(r[s]), halves)
    assert all(torch.allclose(v, r.mean(), atol=1e-12, rtol=0) for v in mean)
    total = _as_two_processes(lambda s: ops.batch_sum(r[s]), halves)
    assert all(torch.allclose(v, r.sum(), atol=1e-12, rtol=0) for v in total)
    tsum = _as_two_processes(lambda s: ops.token_sum(x[s], m[s]), halves)
    assert all(torch.allclose(v, (x * m).sum(), atol=1e-12, rtol=0) for v in tsum)
    tmean = _as_two_processes(lambda s: ops.token_mean(x[s], m[s]), halves)
    assert all(torch.allclose(v, (x * m).sum() / m.sum(), atol=1e-12, rtol=0) for v in tmean)
    # a given count (the loss stage's global normalizer) is used as it is, no reduction
    share = _as_two_processes(lambda s: ops.batch_mean(r[s], count=7.0), halves)
    torch.testing.assert_close(share[0] + share[1], r.mean(), atol=1e-12, rtol=0)
    # outside the context: per tensor
    assert not torch.allclose(ops.whiten(x[:3], m[:3]), ops.whiten(x, m)[:3])
