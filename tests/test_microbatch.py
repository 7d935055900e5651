"""Micro-batch and multi-process exactness of every aggregation.

The rollout stages run once on the whole batch (`prepare`); the batch is then split along whole
groups into micro-batches, and `step_loss(micro, totals)` is given the whole batch's normalizers
(`totals = ops.local_totals(full, group_size)`: valid tokens, responses, groups). The losses and
the gradients (each micro-batch with its own leaf tensors, as in gradient accumulation) summed
over micro-batches must equal the full-batch loss and gradient:

* token_mean_all: dapo (with its group filter), sft, cispo, ppo (two token-mean terms, + value)
* mean over responses: grpo (seq-mean-token-mean), gspo, rloo, flow_grpo (+ mu_sqdist_ref)
* mean over groups: dpo, mcts, ampo (after selection: groups of 1 + k rows)
* sum-based: dr_grpo (token sums / responses / max_tokens)
* the later built-ins: kto (rows, z0 a rollout mean), orpo and cpo (an NLL over the chosen
  tokens counted once per rollout), aot (ranks over the whole batch), reinforce_pp (token
  mean after whiten), grpo_tis

"Processes" are simulated: each process holds a shard of groups and computes its local totals;
the global totals are their sum (an all-reduce); every micro-batch of every process uses them
and the losses and gradients are summed over processes (with DDP, which averages gradients,
that is the per-process loss times the world size).

A negative control shows that without global totals (each micro-batch normalized by itself,
`totals=None`) token_mean_all is not exact for uneven masks, so these tests can fail.
"""

from __future__ import annotations

import pytest
import torch

import alignspec
from alignspec import ops

DT = torch.float64
T = 10
RTOL = 1e-6  # observed: <= 3e-14


def make_batch(G, n, *, seed=0, reward=None):
    gen = torch.Generator().manual_seed(seed)
    B = G * n
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    lengths[-1] = 1
    valid = torch.arange(T)[None, :] < lengths[:, None]

    def act(x):
        return torch.where(valid, x, 3.0 * torch.randn(B, T, generator=gen, dtype=DT))

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=DT)

    logp = -(2.0 * torch.rand(B, T, generator=gen, dtype=DT) + 0.01)
    value_old = rnd(B, T)
    b = {
        "mask": valid.to(DT),
        "logp": act(logp),
        "logp_old": act(logp + 0.3 * rnd(B, T)),
        "logp_ref": act(logp + 0.3 * rnd(B, T)),
        "value_old": act(value_old),
        "value": act(value_old + 0.3 * rnd(B, T)),
        "mu_sqdist_ref": act(0.1 * torch.rand(B, T, generator=gen, dtype=DT)),
        "step_std": act(0.2 + torch.rand(B, T, generator=gen, dtype=DT)),
        "reward": rnd(B) if reward is None else reward,
        "reward_model": rnd(B),
        "preference": rnd(B),
        "embedding": rnd(B, 3),
    }
    b["length"] = b["mask"].sum(-1)
    extra = torch.Generator().manual_seed(seed + 1000)
    b["label"] = (torch.rand(B, generator=extra) < 0.5).to(DT)
    b["logp_mismatch"] = -3.0 * torch.rand(B, generator=extra, dtype=DT)
    b["logp_ref_mismatch"] = b["logp_mismatch"] - 0.3 * torch.randn(B, generator=extra, dtype=DT)
    b["logp_sampler"] = act(b["logp_old"] + 0.3 * rnd(B, T))
    return b


def same_weights(b):
    b["logp_old"] = b["logp"].clone()  # aot ranks by the policy before the update
    return b


def dapo_batch():
    b = make_batch(5, 8, seed=1, reward=torch.tensor([1.0, -1.0] * 20, dtype=DT))
    b["reward"][16:24] = 1.0  # group 2: all equal -> filtered (no overlong penalty at the default max_len)
    return b


def flow_batch():
    r = torch.randn(72, generator=torch.Generator().manual_seed(5), dtype=DT)
    r[24:48] = 0.5  # filtered group
    return make_batch(3, 24, seed=6, reward=r)


def offpolicy(name):
    return f"algorithm {name}_mb extends {name}\n\ntrain\n  minibatches = 2\n"


# name: (spec, overrides, batch, gradient w.r.t.)
CASES = {
    "dapo": (offpolicy("dapo"), {}, dapo_batch, ["logp"]),
    "sft": ("sft", {}, lambda: make_batch(12, 1, seed=2), ["logp"]),
    "cispo": (offpolicy("cispo"), {}, lambda: make_batch(4, 8, seed=3), ["logp"]),
    "ppo": ("ppo", {}, lambda: make_batch(12, 1, seed=4), ["logp", "value"]),
    "grpo": ("grpo", {}, lambda: make_batch(4, 8, seed=7), ["logp"]),
    "grpo-offpolicy": (offpolicy("grpo"), {}, lambda: make_batch(4, 8, seed=8), ["logp"]),
    "gspo": ("gspo", {"eps": 0.1, "eps_high": 0.1}, lambda: make_batch(4, 8, seed=9), ["logp"]),
    "rloo": ("rloo", {}, lambda: make_batch(6, 4, seed=10), ["logp"]),
    "flow_grpo": ("flow_grpo", {"eps": 0.1}, flow_batch, ["logp", "mu_sqdist_ref"]),
    "dpo": ("dpo", {}, lambda: make_batch(8, 2, seed=11), ["logp"]),
    "mcts": ("mcts", {}, lambda: make_batch(8, 2, seed=12), ["logp"]),
    "ampo": ("ampo", {"alpha": 0.5}, lambda: make_batch(4, 8, seed=13), ["logp"]),
    "dr_grpo": ("dr_grpo", {"beta": 0.04, "max_tokens": T}, lambda: make_batch(4, 8, seed=14), ["logp"]),
    "dr_grpo-offpolicy": (offpolicy("dr_grpo"), {}, lambda: make_batch(4, 8, seed=15), ["logp"]),
    "kto": ("kto", {}, lambda: make_batch(12, 1, seed=16), ["logp"]),
    "orpo": ("orpo", {}, lambda: make_batch(8, 2, seed=17), ["logp"]),
    "cpo": ("cpo", {}, lambda: make_batch(8, 2, seed=18), ["logp"]),
    "aot": ("aot", {}, lambda: same_weights(make_batch(8, 2, seed=19)), ["logp"]),
    "reinforce_pp": ("reinforce_pp", {}, lambda: make_batch(12, 1, seed=20), ["logp"]),
    "grpo_tis": ("grpo_tis", {}, lambda: make_batch(4, 8, seed=21), ["logp"]),
}
TOKEN_MEAN_ALL = ["dapo", "sft", "ppo"]


def prepared(case):
    spec, overrides, factory, wrt = CASES[case]
    algo = alignspec.compile(spec, **overrides)
    raw = factory()
    full = algo.prepare({k: raw[k] for k in algo.inputs})
    full = {k: v for k, v in full.items() if k not in ("_rollout_metrics", "_keep", "_rows")}  # carried values stay
    return algo, raw, full, wrt


def rows_of(batch):
    return batch["mask"].shape[0] if "mask" in batch else next(v.shape[0] for v in batch.values() if v.dim())


def take(batch, n, g0, g1):
    """Groups g0..g1-1 of a prepared batch (row-level and group-level values)."""
    rows = rows_of(batch)
    G = rows // n
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0:
            if v.shape[0] == rows:
                v = v[g0 * n:g1 * n]
            elif v.shape[0] == G:
                v = v[g0:g1]
            else:
                raise AssertionError(f"{k}: leading size {v.shape[0]} is neither rows {rows} nor groups {G}")
        out[k] = v
    return out


def loss_and_grads(algo, batch, wrt, totals):
    b = dict(batch)
    leaves = {k: batch[k].detach().clone().requires_grad_(True) for k in wrt}
    b.update(leaves)
    loss = algo.step_loss(b, totals).loss
    grads = torch.autograd.grad(loss, [leaves[k] for k in wrt])
    return loss.detach(), dict(zip(wrt, grads))


def accumulate(algo, full, wrt, bounds, totals):
    """Sum of losses and gradients over micro-batches (group ranges), each with its own leaves."""
    n = algo.group_size
    loss = torch.zeros((), dtype=DT)
    grads = {k: torch.zeros_like(full[k]) for k in wrt}
    for g0, g1 in bounds:
        micro = take(full, n, g0, g1)
        tot = totals(micro) if callable(totals) else totals
        l, g = loss_and_grads(algo, micro, wrt, tot)
        loss = loss + l
        for k in wrt:
            grads[k][g0 * n:g1 * n] += g[k]
    return loss, grads


def splits(G):
    """Uneven group ranges: k = 2, k = 3, and one group per micro-batch."""
    out = {"k2": [(0, 1), (1, G)]}
    if G >= 3:
        out["k3"] = [(0, G - 2), (G - 2, G - 1), (G - 1, G)]
    out["each"] = [(g, g + 1) for g in range(G)]
    return out


def assert_close(got, exp, what, rtol=RTOL):
    scale = float(exp.abs().max())
    torch.testing.assert_close(got, exp, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_sum_to_the_full_batch(case):
    algo, raw, full, wrt = prepared(case)
    n = algo.group_size
    G = rows_of(full) // n
    assert G >= 2
    ref_loss, ref_grads = loss_and_grads(algo, full, wrt, None)
    # the full-batch step loss is the end-to-end loss
    torch.testing.assert_close(ref_loss, algo.loss({k: raw[k] for k in algo.inputs}).loss.detach(),
                               rtol=1e-12, atol=0)
    totals = ops.local_totals(full, n)
    for name, bounds in splits(G).items():
        loss, grads = accumulate(algo, full, wrt, bounds, totals)
        assert_close(loss, ref_loss, f"{case} {name} loss")
        for k in wrt:
            assert_close(grads[k], ref_grads[k], f"{case} {name} d/d{k}")


@pytest.mark.parametrize("case", list(CASES))
def test_processes_with_all_reduced_totals(case):
    """2 processes x 2 micro-batches each; totals all-reduced (summed) from the processes' local totals."""
    algo, raw, full, wrt = prepared(case)
    n = algo.group_size
    G = rows_of(full) // n
    half = G // 2
    shards = [(0, half), (half, G)]
    local = [ops.local_totals(take(full, n, g0, g1), n) for g0, g1 in shards]
    totals = {k: sum(t[k] for t in local) for k in ("tokens", "responses", "groups")}
    expect = ops.local_totals(full, n)
    assert {k: int(v) for k, v in totals.items()} == {k: int(v) for k, v in expect.items()}
    bounds = []
    for g0, g1 in shards:  # each process splits its shard again, unevenly where it can
        mid = g0 + max(1, (g1 - g0) // 3)
        bounds += [(g0, mid), (mid, g1)] if g1 - g0 > 1 else [(g0, g1)]
    ref_loss, ref_grads = loss_and_grads(algo, full, wrt, None)
    loss, grads = accumulate(algo, full, wrt, bounds, totals)
    assert_close(loss, ref_loss, f"{case} processes loss")
    for k in wrt:
        assert_close(grads[k], ref_grads[k], f"{case} processes d/d{k}")


@pytest.mark.parametrize("case", TOKEN_MEAN_ALL)
def test_negative_control_without_global_totals(case):
    """Each micro-batch normalized by its own token count: neither the sum nor the mean of the
    micro-batch losses is the full-batch token mean when masks are uneven."""
    algo, raw, full, wrt = prepared(case)
    n = algo.group_size
    G = rows_of(full) // n
    bounds = [(0, 1), (1, G)]
    tokens = [float(take(full, n, g0, g1)["mask"].sum()) / (g1 - g0) for g0, g1 in bounds]
    assert abs(tokens[0] - tokens[1]) > 0.1  # uneven tokens per group between micro-batches
    ref_loss, ref_grads = loss_and_grads(algo, full, wrt, None)
    loss, grads = accumulate(algo, full, wrt, bounds, None)
    k = len(bounds)
    for scale, label in [(1.0, "sum"), (1.0 / k, "mean")]:
        err_loss = float((scale * loss - ref_loss).abs() / ref_loss.abs())
        err_grad = float((scale * grads["logp"] - ref_grads["logp"]).abs().max() / ref_grads["logp"].abs().max())
        assert max(err_loss, err_grad) > 1e-3, f"{case} ({label}): local normalization was exact"
    # and with the global totals it is exact (same split)
    loss, grads = accumulate(algo, full, wrt, bounds, ops.local_totals(full, n))
    assert_close(loss, ref_loss, f"{case} loss")


def test_dapo_filter_leaves_whole_groups():
    algo, raw, full, wrt = prepared("dapo")
    assert rows_of(full) == 32 and algo.group_size == 8  # one of 5 groups filtered out
