"""The flow-matching policy family (alignspec.runtime.models.flow) against independent closed forms,
and a short end-to-end Flow-GRPO run driven by the compiled ``flow_grpo`` spec."""

import math
import time

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import alignspec
from alignspec import ops
from alignspec.runtime.models.flow import (FlowPolicy, FlowTask, VelocityNet, ode_sample, pretrain, rollout,
                                    sde_sigma, sde_step, step_logprob)

PRETRAIN_STEPS = 1500


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The nets are tiny: intra-op threads only add overhead, and on a busy 2-core machine
    # spinning OpenMP workers slowed these tests down by more than 10x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def task():
    return FlowTask()


@pytest.fixture(scope="module")
def pretrained(task):
    torch.manual_seed(0)
    model = VelocityNet()
    state = pretrain(model, task, steps=PRETRAIN_STEPS, seed=0)
    return state


def _model(state):
    m = VelocityNet()
    m.load_state_dict(state)
    return m.eval()


class LinearVelocity(nn.Module):
    """v(x, t, c) = A x + t b + c e: a fixed, class- and time-dependent linear field."""

    dim = 2

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[0.5, -0.3], [0.2, 0.8]]))
        self.b = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.e = torch.tensor([0.1, 0.3])

    def forward(self, x, t, c):
        t = torch.as_tensor(t, dtype=x.dtype)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        return x @ self.A.T + t[:, None] * self.b + c[:, None].to(x.dtype) * self.e


# ---------------------------------------------------------------------------------------
# closed forms
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,t_next", [(0.6, 0.5), (1.0, 0.9), (0.1, 0.0), (0.75, 0.5)])
def test_sde_step_matches_hand_formula(t, t_next):
    model, a = LinearVelocity(), 0.7
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]])
    c = torch.tensor([0, 1, 3])
    eps = torch.tensor([[0.5, -1.0], [0.0, 2.0], [1.5, 0.3]])
    x_next, mu, std = sde_step(model, x, t, t_next, c, a, eps=eps)

    # by hand, element by element
    sigma = a * math.sqrt(t / (1 - (t_next if t == 1.0 else t)))
    dt = t_next - t
    for i in range(3):
        xi = x[i].tolist()
        vi = [sum(model.A[r, k].item() * xi[k] for k in range(2)) + t * model.b[r].item() + c[i].item() * model.e[r].item()
              for r in range(2)]
        for d in range(2):
            drift = vi[d] + sigma ** 2 / (2 * t) * (xi[d] + (1 - t) * vi[d])
            m = xi[d] + drift * dt
            assert mu[i, d].item() == pytest.approx(m, rel=1e-5, abs=1e-5)
            assert x_next[i, d].item() == pytest.approx(m + sigma * math.sqrt(-dt) * eps[i, d].item(), rel=1e-5, abs=1e-5)
    assert std == pytest.approx(sigma * math.sqrt(-dt))
    assert mu.requires_grad and not x_next.requires_grad


def test_sigma_at_t1_uses_next_grid_point():
    assert sde_sigma(1.0, 0.9, 0.7) == pytest.approx(0.7 * math.sqrt(1 / 0.1))
    assert sde_sigma(0.5, 0.4, 0.7) == pytest.approx(0.7)


def test_step_logprob_is_element_mean_of_gaussian_logpdf():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 7, 3, generator=g)
    x = torch.randn(5, 7, 3, generator=g)
    std = torch.rand(5, 7, generator=g) + 0.1
    want = Normal(mu, std[..., None]).log_prob(x).mean(-1)
    torch.testing.assert_close(step_logprob(x, mu, std), want)
    torch.testing.assert_close(step_logprob(x, mu, 0.37), Normal(mu, 0.37).log_prob(x).mean(-1))


def test_kl_identity_equal_stds():
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(4, 6, 5, generator=g), torch.randn(4, 6, 5, generator=g)
    sigma = torch.rand(4, 6, generator=g) + 0.2
    closed = (mu1 - mu2).pow(2).mean(-1) / (2 * sigma ** 2)
    want = kl_divergence(Normal(mu1, sigma[..., None]), Normal(mu2, sigma[..., None])).mean(-1)
    torch.testing.assert_close(closed, want)


def test_policy_kl_matches_gaussian_kl(task, pretrained):
    model, ref = _model(pretrained), _model(pretrained)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ro = rollout(model, torch.tensor([0, 2]), n=3, steps=6, noise=0.7, generator=torch.Generator().manual_seed(0))
    out = FlowPolicy(model, ref).logprobs(ro)
    out_ref = FlowPolicy(ref).logprobs(ro)
    s = ro.step_std[..., None]
    kl = kl_divergence(Normal(out["mu"].detach(), s), Normal(out_ref["mu"].detach(), s)).mean(-1)
    torch.testing.assert_close(out["mu_sqdist_ref"].detach() / (2 * ro.step_std ** 2), kl)
    assert out["mu_sqdist_ref"].requires_grad and (out["mu_sqdist_ref"] > 0).all()
    # the same model as its own reference: exactly zero
    same = FlowPolicy(ref, _model(pretrained)).logprobs(ro)["mu_sqdist_ref"]
    assert torch.equal(same, torch.zeros_like(same))


def test_sde_preserves_gaussian_marginals():
    """With the exact velocity of Gaussian data, the SDE ends at the data law (Fokker-Planck).

    Data x_0 ~ N(m, s^2 I); x_t = (1-t) x_0 + t eps has mean (1-t) m, variance
    V = (1-t)^2 s^2 + t^2, and the exact velocity E[eps - x_0 | x_t] is
        v = (t - (1-t) s^2) / V * (x_t - (1-t) m) - m.
    """
    m, s = torch.tensor([1.5, -0.5]), 0.4

    class Exact(nn.Module):
        dim = 2

        def forward(self, x, t, c):
            t = torch.as_tensor(t, dtype=x.dtype)
            t = (t.expand(x.shape[0]) if t.dim() == 0 else t)[:, None]
            V = (1 - t) ** 2 * s ** 2 + t ** 2
            return (t - (1 - t) * s ** 2) / V * (x - (1 - t) * m) - m

    g = torch.Generator().manual_seed(0)
    ro = rollout(Exact(), torch.tensor([0]), n=20000, steps=200, noise=0.7, generator=g)
    x = ro.samples
    torch.testing.assert_close(x.mean(0), m, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), s), atol=0.03, rtol=0)
    ode = ode_sample(Exact(), torch.zeros(20000, dtype=torch.long), 200, generator=g)
    torch.testing.assert_close(ode.std(0), torch.full((2,), s), atol=0.03, rtol=0)


# ---------------------------------------------------------------------------------------
# rollout / policy
# ---------------------------------------------------------------------------------------


def test_rollout_layout_and_ratio_is_exactly_one(pretrained):
    model = _model(pretrained)
    T, n = 10, 4
    ro = rollout(model, torch.tensor([2, 0, 3]), n=n, steps=T, noise=0.7, generator=torch.Generator().manual_seed(3))
    B = 3 * n
    assert ro.traj.shape == (B, T + 1, 2) and ro.logp_old.shape == (B, T) == ro.step_std.shape
    assert ro.classes.tolist() == [2] * n + [0] * n + [3] * n
    assert torch.equal(ro.samples, ro.traj[:, -1]) and torch.equal(ro.mask, torch.ones(B, T))
    assert not ro.logp_old.requires_grad and not ro.traj.requires_grad
    ts = torch.linspace(1, 0, T + 1)
    want_sigma = [0.7 * math.sqrt(ts[i] / (1 - (ts[1] if i == 0 else ts[i]))) for i in range(T)]
    torch.testing.assert_close(ro.step_std[0], torch.tensor(want_sigma))
    torch.testing.assert_close(ro.trans_std[0], torch.tensor(want_sigma) * math.sqrt(0.1))

    out = FlowPolicy(model).logprobs(ro)
    assert out["logp"].requires_grad and "mu_sqdist_ref" not in out
    assert torch.equal(out["logp"].detach(), ro.logp_old)  # ratio exactly 1 on-policy
    # the batched recomputation equals the step-by-step sampler's means
    for i in range(T):
        _, mu_i, _ = sde_step(model, ro.traj[:, i], float(ts[i]), float(ts[i + 1]), ro.classes, 0.7,
                              eps=torch.zeros(B, 2))
        torch.testing.assert_close(out["mu"][:, i].detach(), mu_i.detach())
    # gradients reach the parameters only through mu_theta
    out["logp"].sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    # the compiled spec sees ratio == 1 and the unclipped policy term
    algo = alignspec.compile("flow_grpo", n=n, steps=T)
    batch = dict(ro.batch(), reward=torch.arange(B, dtype=torch.float32), logp=out["logp"].detach(),
                 mu_sqdist_ref=torch.zeros(B, T))
    res = algo.loss(batch)
    assert res.metrics["ratio/mean"] == 1.0 and res.metrics["pg/clip_fraction"] == 0.0


def test_pretrained_ode_samples_land_on_the_blobs(task, pretrained):
    model = _model(pretrained)
    classes = task.eval_classes(128)
    x = ode_sample(model, classes, 20, generator=torch.Generator().manual_seed(0))
    near = task.nearest_blob_distance(x, classes) < 0.4
    assert near.float().mean() > 0.8
    # every blob of every class gets a fair share (the model fits the mixture, not one mode)
    blob = (x[:, None] - task.centers[classes]).norm(dim=-1).argmin(-1)
    for c in range(task.num_classes):
        frac = torch.bincount(blob[classes == c], minlength=task.k).float() / 128
        assert (frac > 0.15).all(), (c, frac)
    # hence the reward leaves room: about 1/k of the maximum
    assert 0.2 < task.eval_score(x, classes) < 0.4


# ---------------------------------------------------------------------------------------
# end to end: the compiled spec learns
# ---------------------------------------------------------------------------------------


def grpo_iteration(algo, policy, opt, task, generator, prompts: int) -> dict | None:
    """One rollout + the spec's optimizer steps (train.minibatches of them, split by groups)."""
    n = algo.params["n"]
    classes = torch.randint(0, task.num_classes, (prompts,), generator=generator)
    ro = rollout(policy.model, classes, n, algo.params["steps"], algo.params["noise"], generator)
    batch = dict(ro.batch(), reward=task.reward(ro.samples, ro.classes))
    prepared = algo.prepare(batch)
    prepared.pop("_keep")
    prepared.pop("_rollout_metrics")
    rows = prepared.pop("_rows")
    if rows is None:
        rows = torch.arange(len(batch["reward"]))
    groups = rows.numel() // n
    if groups == 0:  # every group filtered: the spec's loss would be 0/0
        return None
    kept = ro.select(rows)
    metrics = {}
    for chunk in torch.arange(groups).chunk(algo.train["minibatches"]):
        r = (chunk[:, None] * n + torch.arange(n)).reshape(-1)
        lp = policy.logprobs(kept.select(r))  # recomputed after the previous optimizer step
        mb = {k: v[r] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in prepared.items()}
        mb.update(logp=lp["logp"], mu_sqdist_ref=lp["mu_sqdist_ref"])
        out = algo.step_loss(mb)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        opt.step()
        metrics = out.metrics
    return metrics


def test_flow_grpo_raises_eval_score(task, pretrained):
    t0 = time.perf_counter()
    model, ref = _model(pretrained), _model(pretrained)
    algo = alignspec.compile("flow_grpo", n=8, steps=10)  # the code's eps = 1e-4 is kept
    policy = FlowPolicy(model, ref)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    start = task.evaluate(model)
    model.train()
    for _ in range(60):
        grpo_iteration(algo, policy, opt, task, g, prompts=8)
    model.eval()
    end = task.evaluate(model)
    elapsed = time.perf_counter() - t0
    print(f"flow_grpo eval_score {start:.3f} -> {end:.3f} in {elapsed:.1f}s")
    assert end > start + 0.25, (start, end)
    # still samples of the data, not a collapse off the blobs
    classes = task.eval_classes(128)
    x = ode_sample(model, classes, 20, generator=torch.Generator().manual_seed(0))
    assert (task.nearest_blob_distance(x, classes) < 0.4).float().mean() > 0.8
