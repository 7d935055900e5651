"""Batch-wide ranks, sorted values and quantiles (alignspec/batch_order.py), log1p/expm1, and
the checks on the quantities that exist only for some data kinds or samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignspec
from alignspec import ops
from alignspec.dsl.errors import SpecError

DT = torch.float64


def _processes(parts):
    """A gather over simulated processes: every call returns the same concatenation."""
    def run(rank, fn):
        def gather(x):
            assert torch.equal(x, parts[rank])
            return torch.cat(parts), sum(p.numel() for p in parts[:rank])
        with ops.batch_stats_reduce(lambda t: t, gather):
            return fn(parts[rank])
    return run


def test_rank_and_sorted_against_numpy():
    x = torch.tensor([0.3, -1.0, 2.0, 0.3, 5.0, -7.0], dtype=DT)
    ranks = ops.batch_rank(x)
    assert ranks.tolist() == [2.0, 1.0, 4.0, 3.0, 5.0, 0.0]  # ties by position (stable)
    y = torch.tensor([10.0, 30.0, 20.0, 0.0, 50.0, 40.0], dtype=DT)
    np.testing.assert_array_equal(ops.batch_sorted(y, ranks).numpy(), np.sort(y.numpy())[ranks.long().numpy()])


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_quantile_against_numpy_and_masks(q):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=DT)
    mask = (torch.rand(5, 7, generator=g) > 0.3).to(DT)
    x_bad = torch.where(mask > 0, x, torch.tensor(float("nan"), dtype=DT))  # masked positions never read
    got = ops.batch_quantile(x_bad, q, mask)
    assert got.item() == pytest.approx(np.quantile(x[mask > 0].numpy(), q), rel=1e-12)


def test_every_process_sees_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    whole = torch.randn(11, generator=g, dtype=DT)
    parts = [whole[:4], whole[4:9], whole[9:]]
    run = _processes(parts)
    ranks = torch.cat([run(r, ops.batch_rank) for r in range(3)])
    torch.testing.assert_close(ranks, ops.batch_rank(whole))
    for r in range(3):
        assert run(r, lambda x: ops.batch_quantile(x, 0.7)).item() == pytest.approx(
            torch.quantile(whole, 0.7).item(), rel=1e-12)
    other = torch.randn(11, generator=g, dtype=DT)
    sorted_parts = [other[:4], other[4:9], other[9:]]
    got = []
    for r in range(3):
        calls = iter([sorted_parts])

        def gather(x, r=r):
            ps = next(calls)
            return torch.cat(ps), sum(p.numel() for p in ps[:r])
        with ops.batch_stats_reduce(lambda t: t, gather):
            got.append(ops.batch_sorted(sorted_parts[r], ranks[sum(p.numel() for p in parts[:r]):][:parts[r].numel()]))
    torch.testing.assert_close(torch.cat(got), ops.batch_sorted(other, ops.batch_rank(whole)))


def test_order_statistics_need_a_gather_across_processes():
    with ops.batch_stats_reduce(lambda t: t):
        with pytest.raises(RuntimeError, match="gather_fn"):
            ops.batch_rank(torch.ones(3))


def _spec(tmp_path, text):
    p = tmp_path / "t.align"
    p.write_text(text)
    return p


TOP_ENTROPY = """algorithm t
import common
sample
  responses = generate(prompt, n = 4)
score
  r = reward(response)
advantage
  A = r - group_mean(r)
  hot = entropy_old >= batch_quantile(entropy_old, 0.8)
loss
  minimize -token_mean_all(where(hot, exp(logp - logp_old) * A, 0))
"""


def test_top_entropy_tokens_through_a_batch_quantile(tmp_path):
    """Wang et al., arXiv:2506.01939: the policy gradient only on the 20% highest-entropy tokens."""
    algo = alignspec.compile(_spec(tmp_path, TOP_ENTROPY))
    assert "entropy_old" in algo.inputs and algo.batch_statistics
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(8, 5, generator=g) > 0.2).to(DT)
    mask[:, 0] = 1
    b = {"mask": mask, "entropy_old": torch.rand(8, 5, generator=g, dtype=DT),
         "logp": -torch.rand(8, 5, generator=g, dtype=DT), "reward": torch.randn(8, generator=g, dtype=DT)}
    b["logp_old"] = b["logp"].clone()
    b["logp"].requires_grad_(True)
    out = algo.loss(dict(b))
    tau = np.quantile(b["entropy_old"][mask > 0].numpy(), 0.8)
    hot = (b["entropy_old"] >= tau) & (mask > 0)
    A = (b["reward"] - b["reward"].view(2, 4).mean(1).repeat_interleave(4))[:, None].expand(8, 5)
    want = -(A * hot).sum() / mask.sum()
    torch.testing.assert_close(out.loss, want)
    assert 0 < int(hot.sum()) < int(mask.sum())


@pytest.mark.parametrize("text,where,what", [
    ("algorithm t\ndata pairs\nloss\n  q = batch_quantile(stopgrad(entropy), 0.5)\n  minimize -mean(q * sum_tokens(logp))\n",
     "t.align:4:7", "once per rollout"),
    ("algorithm t\ndata pairs\nadvantage\n  q = batch_quantile(logp_ref, 1.5)\nloss\n  minimize -mean(sum_tokens(logp))\n",
     "t.align:4:32", "between 0 and 1"),
    ("algorithm t\ndata pairs\nloss\n  minimize -mean(label * sum_tokens(logp))\n", "t.align:4:18", "data unpaired"),
    ("algorithm t\ndata pairs\nloss\n  minimize -mean(sum_tokens(logp - logp_sampler))\n", "t.align:4:36",
     "recorded by generate"),
])
def test_order_and_data_errors(tmp_path, text, where, what):
    with pytest.raises(SpecError) as e:
        alignspec.load(_spec(tmp_path, text))
    assert where in str(e.value) and what in str(e.value)


def test_log1p_expm1(tmp_path):
    algo = alignspec.compile(_spec(tmp_path, "algorithm t\ndata pairs\nparams\n  c = 1e-12\nloss\n"
                                             "  minimize -mean(log1p(c) * sum_tokens(expm1(logp)))\n"))
    assert "math.log1p" in algo.source or "1e-12" in algo.source
    b = {"mask": torch.ones(2, 3, dtype=DT), "logp": torch.full((2, 3), -1e-10, dtype=DT)}
    out = algo.loss(b)
    assert out.loss.item() == pytest.approx(-1e-12 * 3 * -1e-10, rel=1e-9)
