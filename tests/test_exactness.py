"""Exactness of every built-in algorithm against independent plain-PyTorch references.

For each spec in algorithms/ (all but the `common` library and the `rlhf` pipeline) a reference
is written here from the paper's formula and the spec's own comments, with explicit loops over
groups, rows and each row's valid tokens (so it shares no reduction code with `alignspec.ops`).
It is compared with `alignspec.compile(spec).loss(batch)` on random tensors with uneven masks
(one row has a single valid token, padding holds garbage), an off-policy `logp_old`, value and
gradient (w.r.t. `logp`, and `value` for ppo, `rm_score` for reward_model, `mu_sqdist_ref` for
flow_grpo): float64 to rtol 1e-9, float32 (against the float64 reference on the same rounded
inputs) to rtol 1e-5. Selection (sppo, rspo: argmax / argmin of the win rate; ampo: argmax of
the reward, then `ops.select_coreset`, used only as the selector) is redone by the reference.

Where TRL 1.16 implements the same loss, TRL's own code is driven with the same tensors:

* `DPOTrainer._compute_loss` (loss_type "sigmoid" vs dpo and spin, "ipo" vs ipo),
  `SFTTrainer.compute_loss`, `RewardTrainer.compute_loss`: called on a bare trainer object
  (`object.__new__`) with the attributes those methods read, and a stand-in "model" module that
  returns the given per-token log-probs (zero on ignored positions, as TRL's fused LM head does)
  or the given reward scores. No model, tokenizer or data set is downloaded.
* `GRPOTrainer._compute_loss` (loss types "grpo", "bnpo", "dr_grpo", "dapo", "cispo", and
  importance_sampling_level "sequence" for GSPO) and `RLOOTrainer._compute_loss`: same, with
  `_get_per_token_logps_and_entropies` replaced on the instance by one returning our `logp`.
* `CPOTrainer.cpo_loss` (trl.experimental, loss_type "simpo") called directly.
* `trl.rewards.get_soft_overlong_punishment` for DAPO's Eq. 13 penalty.
* The group advantages of GRPO (`scale_rewards="group"` / `"none"`) and RLOO's KL-in-reward
  leave-one-out advantage live inside TRL's generation method (`_generate_and_score_completions`),
  which cannot run without generating; those lines are RE-IMPLEMENTED here faithfully from TRL
  1.16's source (using TRL's own `nanstd`), and their output is fed to TRL's loss code.
  `nanstd`'s Bessel factor `count / (count - 1)` is an int / int division, hence float32 even
  for float64 rewards (std off by ~2e-8 relative): comparisons that use TRL's group-std
  advantages are made at rtol 1e-7; TRL's loss code fed our advantages is compared at 1e-9.
* PPO: TRL 1.16 ships no PPOTrainer any more; the PPO reference re-implements the conventions
  of TRL's former PPOTrainer (k1 KL per token in the reward, score at the last token, GAE,
  returns before whitening, `masked_whiten` with Bessel correction and rsqrt(var + 1e-8),
  clipped value loss, token means, loss = pg + vf_coef * vf).

Deliberate differences between our built-in specs and TRL (from the specs' comments):

* grpo: aggregation is the paper's seq-mean-token-mean (Eq. 3) = TRL loss_type="grpo", not
  TRL's default ("dapo" token mean); beta = 0.04 (paper) where TRL's default is 0.0. With one
  update per rollout `logp_old` is `stopgrad(logp)` (TRL: `old_per_token_logps is None`). TRL
  divides the "grpo" loss by the number of accumulation steps, we by the global number of
  responses (the same when micro-batches have equal sizes).
* dapo: the dynamic-sampling filter (drop groups whose rewards are all equal) is not in TRL's
  GRPOTrainer; TRL is therefore given the kept groups only (as DAPO's resampling would). The
  soft overlong penalty is a separate TRL reward function (`get_soft_overlong_punishment`),
  added to the rule reward here inside the spec. TRL "dapo" normalizes by the global token count
  (`num_items_in_batch`) = our `token_mean_all` with totals; TRL "bnpo" is the same loss with
  the local (micro-batch) token count = our loss with `totals=None`.
* dr_grpo: TRL normalizes by batch * `max_completion_length` (default 256); our spec by
  `max_tokens` (default 1024, must be set to the run's generation cap). TRL needs
  `scale_rewards="none"` for the Dr. GRPO advantage; our spec drops the std by construction.
* cispo: TRL caps the IS weight at `epsilon_high` (recommended 5.0); our `eps_high` is the
  distance above 1 (cap 1 + eps_high, 4.0 -> 5.0).
* gspo: TRL `importance_sampling_level="sequence"`, `loss_type="grpo"`, epsilon 3e-4 /
  epsilon_high 4e-4: identical.
* rloo: identical to TRL (k1 sequence KL in the reward on the sampling policy, leave-one-out
  baseline, `normalize_advantages=False`, clipped sequence ratio, mean over responses).
* ipo: TRL averages each response's log-ratio over its tokens (confirmed with the IPO authors
  per TRL's comment); we follow TRL, the paper writes sums.
* simpo: TRL's CPOTrainer adds a behaviour-cloning NLL unless cpo_alpha = 0; pure SimPO (ours)
  has none, so only `cpo_loss` is compared. TRL's `simpo_gamma` is our `gamma` (the margin).
* sppo / rspo: TRL's DPO `loss_type="sppo_hard"` is the hard-probability variant (P = 1 / 0,
  no 0.5 factor); our specs use the official code's soft win rate: not compared with TRL.
* ppo: the former TRL PPOTrainer masked the value loss with a mask one position longer than
  the policy mask (`padding_mask_p1`); our spec uses the same mask for both.
* flow_grpo, ampo, mcts, spin (DPO loss, compared), reward_model (compared): flow_grpo, ampo
  and mcts have no TRL implementation.

Compiler bugs found by these tests, since fixed (their regression tests are at the end):

* sppo, rspo: `P[chosen]` / `P[rejected]` (values of selected roles that read only scores) are
  computed in the score stage with `ops.at_role(P, SAMPLE_GROUP, 0 / 1)`, i.e. at rows 0 and 1
  of each *sampled* group, before selection, instead of at the argmax / argmin rows.
* ppo with `kl_coef=0.0`: compiling raises KeyError in compiler/passes/lower.py (`_loads`): after
  folding, `rewards` is an alias of the score-stage `last_token(r)` read by the rollout-stage
  `gae`, and that score-stage value is never carried between stages.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import alignspec
from alignspec import ops

DT64 = torch.float64
T = 12
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]


# ----------------------------------------------------------------------------- batches
def make_batch(G, n, *, seed=0, lengths=None, single=1, reward=None, preference=None, reward_model=None,
               D=4, t=T):
    """Random rollout batch in float64: B = G * n contiguous rows, right-padded uneven masks.

    Row 0 is full, row `single` has exactly one valid token; padding holds finite garbage.
    `logp_old` is off-policy by a per-row amount between 1e-5 and 0.5 (so clips act on
    some rows and not on others).
    """
    gen = torch.Generator().manual_seed(seed)
    B = G * n
    if lengths is None:
        lengths = torch.randint(2, t + 1, (B,), generator=gen)
        lengths[0] = t
        if single is not None and B > 1:
            lengths[single] = 1
    lengths = torch.as_tensor(lengths)
    valid = torch.arange(t)[None, :] < lengths[:, None]
    mask = valid.to(DT64)

    def act(x):
        return torch.where(valid, x, 2.0 * torch.randn(B, t, generator=gen, dtype=DT64))

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=DT64)

    logp_v = -(3.0 * torch.rand(B, t, generator=gen, dtype=DT64) + 0.01)
    scale = torch.logspace(-5, math.log10(0.5), B, dtype=DT64)[torch.randperm(B, generator=gen)]
    value_old = rnd(B, t)
    b = {
        "mask": mask,
        "logp": act(logp_v),
        "logp_old": act(logp_v + scale[:, None] * rnd(B, t)),
        "logp_ref": act(logp_v + 0.5 * rnd(B, t)),
        "value_old": act(value_old),
        "value": act(value_old + 0.3 * rnd(B, t)),
        "entropy": act(torch.rand(B, t, generator=gen, dtype=DT64)),
        "mu_sqdist_ref": act(0.1 * torch.rand(B, t, generator=gen, dtype=DT64)),
        "step_std": act(0.1 + 0.5 * torch.rand(B, t, generator=gen, dtype=DT64)),
        "reward": rnd(B) if reward is None else torch.as_tensor(reward, dtype=DT64),
        "reward_model": rnd(B) if reward_model is None else torch.as_tensor(reward_model, dtype=DT64),
        "preference": 2.0 * rnd(B) if preference is None else torch.as_tensor(preference, dtype=DT64),
        "rm_score": rnd(B),
        "embedding": rnd(B, D),
    }
    b["length"] = mask.sum(-1)
    extra = torch.Generator().manual_seed(seed + 1000)  # after every draw above: earlier cases unchanged
    b["label"] = (torch.rand(B, generator=extra) < 0.5).to(DT64)
    b["logp_mismatch"] = -3.0 * torch.rand(B, generator=extra, dtype=DT64) * lengths
    b["logp_ref_mismatch"] = b["logp_mismatch"] - 0.3 * torch.randn(B, generator=extra, dtype=DT64) - 0.1
    b["logp_sampler"] = act(b["logp_old"] + 0.6 * (torch.rand(B, t, generator=extra, dtype=DT64) - 0.3))
    b["entropy_old"] = act(torch.rand(B, t, generator=extra, dtype=DT64))
    return b


def cast(batch, dtype):
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def run(fn, batch, wrt):
    """fn(batch) -> scalar loss; returns (loss, {name: grad}) w.r.t. fresh leaves of `wrt`."""
    b = dict(batch)
    leaves = {}
    for k in wrt:
        leaves[k] = batch[k].detach().clone().requires_grad_(True)
        b[k] = leaves[k]
    loss = fn(b)
    grads = torch.autograd.grad(loss, [leaves[k] for k in wrt], allow_unused=True)
    return loss.detach(), {k: (torch.zeros_like(leaves[k]) if g is None else g) for k, g in zip(wrt, grads)}


def compiled(algo):
    """The compiled loss, fed only the inputs it declares (so `.inputs` is checked too)."""
    def fn(b):
        return algo.loss({k: b[k] for k in algo.inputs}).loss
    return fn


def assert_close(got, exp, rtol, what=""):
    got = got.detach().to(DT64)
    exp = exp.detach().to(DT64)
    assert got.shape == exp.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(exp.shape)}"
    scale = float(exp.abs().max()) if exp.numel() else 0.0
    torch.testing.assert_close(got, exp, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- reference helpers
def idx(mask, i):
    """Valid positions of row i."""
    return torch.nonzero(mask[i] != 0).flatten()


def gmean(xs):
    return sum(xs) / len(xs)


def gstd(xs):
    """Unbiased standard deviation of a list of 0-dim tensors."""
    m = gmean(xs)
    return torch.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def group_zscore(r, n, eps=1e-4):
    A = []
    for g in range(r.shape[0] // n):
        rg = [r[g * n + j] for j in range(n)]
        m, s = gmean(rg), gstd(rg)
        A += [(x - m) / (s + eps) for x in rg]
    return torch.stack(A)


def group_center(r, n):
    A = []
    for g in range(r.shape[0] // n):
        rg = [r[g * n + j] for j in range(n)]
        m = gmean(rg)
        A += [x - m for x in rg]
    return torch.stack(A)


def k3(lp, ref):
    return torch.exp(ref - lp) - (ref - lp) - 1


def clipped_surrogate(ratio, A, lo, hi):
    """min(ratio * A, clip(ratio, lo, hi) * A) (the objective, to be maximized)."""
    return torch.minimum(ratio * A, torch.clamp(ratio, lo, hi) * A)


def old_of(b, i, ix, off_policy):
    return b["logp_old"][i, ix] if off_policy else b["logp"][i, ix].detach()


def overlong_penalty(L, max_len, cache):
    """DAPO Eq. 13, piecewise as written in the paper."""
    L = float(L)
    if L <= max_len - cache:
        return 0.0
    if L <= max_len:
        return ((max_len - cache) - L) / cache
    return -1.0


def sigma(x):
    return 1.0 / (1.0 + torch.exp(-x))


# ----------------------------------------------------------------------------- references
def ref_grpo(b, p, off_policy=False):
    n, eps, beta = p["n"], p["eps"], p["beta"]
    A = group_zscore(b["reward"], n)
    B = b["logp"].shape[0]
    total = 0.0
    for i in range(B):
        ix = idx(b["mask"], i)
        lp = b["logp"][i, ix]
        ratio = torch.exp(lp - old_of(b, i, ix, off_policy))
        per_tok = clipped_surrogate(ratio, A[i], 1 - eps, 1 + eps)
        if beta != 0.0:
            per_tok = per_tok - beta * k3(lp, b["logp_ref"][i, ix])
        total = total + per_tok.sum() / ix.numel()
    return -total / B


def dapo_rewards(b, p):
    return torch.stack([b["reward"][i] + overlong_penalty(b["length"][i], p["max_len"], p["cache"])
                        for i in range(b["reward"].shape[0])])


def dapo_kept_groups(r, n):
    return [g for g in range(r.shape[0] // n) if any(r[g * n + j] != r[g * n] for j in range(n))]


def ref_dapo(b, p, off_policy=False):
    n = p["n"]
    r = dapo_rewards(b, p)
    A = group_zscore(r, n)
    num, tokens = 0.0, 0
    for g in dapo_kept_groups(r, n):
        for i in range(g * n, (g + 1) * n):
            ix = idx(b["mask"], i)
            ratio = torch.exp(b["logp"][i, ix] - old_of(b, i, ix, off_policy))
            num = num + clipped_surrogate(ratio, A[i], 1 - p["eps"], 1 + p["eps_high"]).sum()
            tokens += ix.numel()
    return -num / tokens


def ref_cispo(b, p, off_policy=False):
    A = group_zscore(b["reward"], p["n"])
    num, tokens = 0.0, 0
    for i in range(b["logp"].shape[0]):
        ix = idx(b["mask"], i)
        lp = b["logp"][i, ix]
        w = torch.clamp(torch.exp(lp - old_of(b, i, ix, off_policy)), max=1 + p["eps_high"]).detach()
        num = num + (w * A[i] * lp).sum()
        tokens += ix.numel()
    return -num / tokens


def ref_dr_grpo(b, p, off_policy=False):
    A = group_center(b["reward"], p["n"])
    B = b["logp"].shape[0]
    total = 0.0
    for i in range(B):
        ix = idx(b["mask"], i)
        lp = b["logp"][i, ix]
        per_tok = clipped_surrogate(torch.exp(lp - old_of(b, i, ix, off_policy)), A[i], 1 - p["eps"], 1 + p["eps"])
        if p["beta"] != 0.0:
            per_tok = per_tok - p["beta"] * k3(lp, b["logp_ref"][i, ix])
        total = total + per_tok.sum()
    return -(total / B) / p["max_tokens"]


def ref_gspo(b, p):
    A = group_zscore(b["reward"], p["n"])
    B = b["logp"].shape[0]
    total = 0.0
    for i in range(B):
        ix = idx(b["mask"], i)
        s = torch.exp((b["logp"][i, ix] - b["logp_old"][i, ix]).sum() / ix.numel())
        total = total + clipped_surrogate(s, A[i], 1 - p["eps"], 1 + p["eps_high"])
    return -total / B


def ref_rloo(b, p):
    n, B = p["n"], b["logp"].shape[0]
    rw = []
    for i in range(B):
        ix = idx(b["mask"], i)
        kl = (b["logp_old"][i, ix] - b["logp_ref"][i, ix]).sum()
        rw.append(b["reward"][i] - p["beta"] * kl)
    total = 0.0
    for g in range(B // n):
        for j in range(n):
            i = g * n + j
            others = [rw[g * n + o] for o in range(n) if o != j]
            A = rw[i] - sum(others) / (n - 1)
            ix = idx(b["mask"], i)
            ratio = torch.exp((b["logp"][i, ix] - b["logp_old"][i, ix]).sum())
            total = total + clipped_surrogate(ratio, A, 1 - p["eps"], 1 + p["eps"])
    return -total / B


def ppo_rollout(b, p):
    """GAE on per-token rewards (k1 KL + score at the last token), returns, TRL masked_whiten."""
    B = b["logp"].shape[0]
    advs, rets = [], []
    with torch.no_grad():
        for i in range(B):
            ix = idx(b["mask"], i)
            L = ix.numel()
            rew = -p["kl_coef"] * (b["logp_old"][i, ix] - b["logp_ref"][i, ix])
            rew = rew.clone()
            rew[L - 1] = rew[L - 1] + b["reward_model"][i]
            v = b["value_old"][i, ix]
            adv = [None] * L
            last = 0.0
            for t in reversed(range(L)):
                nextv = v[t + 1] if t + 1 < L else 0.0
                delta = rew[t] + p["gamma"] * nextv - v[t]
                last = delta + p["gamma"] * p["lam"] * last
                adv[t] = last
            adv = torch.stack(adv)
            advs.append(adv)
            rets.append(adv + v)
        flat = torch.cat(advs)
        N = flat.numel()
        mean = flat.sum() / N
        var = ((flat - mean) ** 2).sum() / N * (N / (N - 1))  # masked_var(unbiased=True)
        white = [(a - mean) * torch.rsqrt(var + 1e-8) for a in advs]
    return white, rets


def ref_ppo(b, p):
    A, R = ppo_rollout(b, p)
    B = b["logp"].shape[0]
    pg_sum, vf_sum, tokens = 0.0, 0.0, 0
    for i in range(B):
        ix = idx(b["mask"], i)
        ratio = torch.exp(b["logp"][i, ix] - b["logp_old"][i, ix])
        pg = torch.maximum(-A[i] * ratio, -A[i] * torch.clamp(ratio, 1 - p["eps"], 1 + p["eps"]))
        v, vo = b["value"][i, ix], b["value_old"][i, ix]
        vc = torch.maximum(torch.minimum(v, vo + p["eps_value"]), vo - p["eps_value"])
        vf = 0.5 * torch.maximum((v - R[i]) ** 2, (vc - R[i]) ** 2)
        pg_sum = pg_sum + pg.sum()
        vf_sum = vf_sum + vf.sum()
        tokens += ix.numel()
    return pg_sum / tokens + p["vf_coef"] * (vf_sum / tokens)


def seq_sum(x, b, i):
    return x[i, idx(b["mask"], i)].sum()


def seq_mean(x, b, i):
    v = x[i, idx(b["mask"], i)]
    return v.sum() / v.numel()


def pairs(b):
    return range(b["mask"].shape[0] // 2)


def ref_dpo(b, p):
    total = 0.0
    for g in pairs(b):
        hc = p["beta"] * seq_sum(b["logp"] - b["logp_ref"], b, 2 * g)
        hr = p["beta"] * seq_sum(b["logp"] - b["logp_ref"], b, 2 * g + 1)
        total = total + torch.log(sigma(hc - hr))
    return -total / len(pairs(b))


def ref_ipo(b, p):
    total = 0.0
    for g in pairs(b):
        hc = seq_mean(b["logp"] - b["logp_ref"], b, 2 * g)
        hr = seq_mean(b["logp"] - b["logp_ref"], b, 2 * g + 1)
        total = total + (hc - hr - 1 / (2 * p["tau"])) ** 2
    return total / len(pairs(b))


def ref_simpo(b, p):
    total = 0.0
    for g in pairs(b):
        hc = p["beta"] * seq_mean(b["logp"], b, 2 * g)
        hr = p["beta"] * seq_mean(b["logp"], b, 2 * g + 1)
        total = total + torch.log(sigma(hc - hr - p["gamma"]))
    return -total / len(pairs(b))


def ref_mcts(b, p):
    pref, sft = 0.0, 0.0
    for g in pairs(b):
        hc = p["beta"] * seq_sum(b["logp"] - b["logp_ref"], b, 2 * g)
        hr = p["beta"] * seq_sum(b["logp"] - b["logp_ref"], b, 2 * g + 1)
        pref = pref + torch.log(sigma(hc - hr))
        sft = sft + seq_mean(b["logp"], b, 2 * g)
    G = len(pairs(b))
    return -pref / G + p["sft_coef"] * (-sft / G)


def ref_reward_model(b, p):
    s = b["rm_score"]
    total = 0.0
    for g in range(s.shape[0] // 2):
        total = total + torch.log(sigma(s[2 * g] - s[2 * g + 1]))
    return -total / (s.shape[0] // 2)


def ref_sft(b, p):
    num, tokens = 0.0, 0
    for i in range(b["logp"].shape[0]):
        ix = idx(b["mask"], i)
        num = num + b["logp"][i, ix].sum()
        tokens += ix.numel()
    return -num / tokens


def winrates(s, K):
    P = []
    for g in range(s.shape[0] // K):
        for i in range(K):
            P.append(sum(sigma(s[g * K + i] - s[g * K + j]) for j in range(K)) / K)
    return torch.stack(P)


def sppo_picks(P, K):
    """(argmax, argmin among the others) of each group; ties to the lower index."""
    out = []
    for g in range(P.shape[0] // K):
        vals = [float(P[g * K + j]) for j in range(K)]
        c = max(range(K), key=lambda j: (vals[j], -j))
        r = min((j for j in range(K) if j != c), key=lambda j: (vals[j], j))
        out.append((g * K + c, g * K + r))
    return out


def ref_sppo(b, p):
    K = p["k"]
    P = winrates(b["preference"], K).detach()
    total = 0.0
    picks = sppo_picks(P, K)
    for c, r in picks:
        ac = seq_sum(b["logp"] - b["logp_ref"], b, c)
        ar = seq_sum(b["logp"] - b["logp_ref"], b, r)
        total = total + (ac - p["eta"] * (P[c] - 0.5)) ** 2 + (ar - p["eta"] * (P[r] - 0.5)) ** 2
    return 0.5 * total / len(picks)


def ref_rspo(b, p):
    K = p["k"]
    P = winrates(b["preference"], K).detach()
    picks = sppo_picks(P, K)
    sppo, reg = 0.0, 0.0
    for c, r in picks:
        ac = seq_sum(b["logp"] - b["logp_old"], b, c)
        ar = seq_sum(b["logp"] - b["logp_old"], b, r)
        sppo = sppo + (ac - p["eta"] * (P[c] - 0.5)) ** 2 + (ar - p["eta"] * (P[r] - 0.5)) ** 2
        dc = seq_sum(b["logp"] - b["logp_ref"], b, c)
        dr = seq_sum(b["logp"] - b["logp_ref"], b, r)
        rev = dc ** 2 + dr ** 2
        fwd = torch.exp(torch.clamp(-dc, max=p["cap"])) + torch.exp(torch.clamp(-dr, max=p["cap"]))
        reg = reg + fwd + p["k_rev"] * rev
    G = len(picks)
    return 0.5 * sppo / G + p["reg_coef"] * reg / G


def ampo_picks(b, p):
    n, k = p["n"], p["k"]
    r = b["reward_model"].detach()
    G = r.shape[0] // n
    chosen = [max(range(n), key=lambda j: (float(r[g * n + j]), -j)) for g in range(G)]
    taken = torch.zeros(G, n, dtype=torch.bool)
    for g, c in enumerate(chosen):
        taken[g, c] = True
    rejected = ops.select_coreset(r, b["embedding"], n, k, exclude=taken)  # selector only
    out = []
    for g in range(G):
        rej = [int(j) for j in rejected[g]]
        assert chosen[g] not in rej and len(set(rej)) == k
        out.append([g * n + chosen[g]] + [g * n + j for j in rej])
    return out


def ref_ampo(b, p):
    n = p["n"]
    r = b["reward_model"]
    total = 0.0
    picks = ampo_picks(b, p)
    for g, rows in enumerate(picks):
        mean_r = sum(r[g * n + j] for j in range(n)) / n  # over all N sampled responses
        s = [p["beta"] * seq_mean(b["logp"], b, i) + p["alpha"] * (r[i] - mean_r) for i in rows]
        total = total + (s[0] - torch.logsumexp(torch.stack(s), 0))
    return -total / len(picks)


def ref_flow_grpo(b, p):
    n = p["n"]
    r = b["reward"]
    B = r.shape[0]
    rl = [r[i] for i in range(B)]
    std_all = gstd(rl)  # batch std over every sampled row, before the filter
    policy, kl, rows = 0.0, 0.0, 0
    for g in range(B // n):
        rg = rl[g * n:(g + 1) * n]
        if all(float(x) == float(rg[0]) for x in rg):
            continue  # the group filter: all rewards equal
        m = gmean(rg)
        for j in range(n):
            i = g * n + j
            A = torch.clamp((rg[j] - m) / (std_all + 1e-4), -p["adv_clip"], p["adv_clip"])
            ix = idx(b["mask"], i)
            ratio = torch.exp(b["logp"][i, ix] - b["logp_old"][i, ix])
            pg = torch.maximum(-A * ratio, -A * torch.clamp(ratio, 1 - p["eps"], 1 + p["eps"]))
            kl_t = b["mu_sqdist_ref"][i, ix] / (2 * b["step_std"][i, ix] ** 2)
            policy = policy + pg.sum() / ix.numel()
            kl = kl + kl_t.sum() / ix.numel()
            rows += 1
    return policy / rows + p["beta"] * (kl / rows)


def ref_kto(b, p):
    B = b["mask"].shape[0]
    z0 = torch.clamp(sum(b["logp_mismatch"][i] - b["logp_ref_mismatch"][i] for i in range(B)) / B, min=0.0)
    total = 0.0
    for i in range(B):
        h = seq_sum(b["logp"] - b["logp_ref"], b, i)
        if b["label"][i] > 0:
            total = total + p["desirable_weight"] * (1 - sigma(p["beta"] * (h - z0)))
        else:
            total = total + p["undesirable_weight"] * (1 - sigma(p["beta"] * (z0 - h)))
    return total / B


def _chosen_nll(b):
    tokens = sum(idx(b["mask"], 2 * g).numel() for g in pairs(b))
    return -sum(seq_sum(b["logp"], b, 2 * g) for g in pairs(b)) / tokens


def ref_orpo(b, p):
    total = 0.0
    for g in pairs(b):
        c, r = seq_mean(b["logp"], b, 2 * g), seq_mean(b["logp"], b, 2 * g + 1)
        log_odds = (c - torch.log(1 - torch.exp(c))) - (r - torch.log(1 - torch.exp(r)))  # Eq. 7
        total = total + torch.log(sigma(log_odds))
    return _chosen_nll(b) - p["beta"] * total / len(pairs(b))


def ref_cpo(b, p):
    total = 0.0
    for g in pairs(b):
        c, r = seq_sum(b["logp"], b, 2 * g), seq_sum(b["logp"], b, 2 * g + 1)
        total = total + torch.log(sigma(p["beta"] * (c - r)))
    return -total / len(pairs(b)) + p["cpo_alpha"] * _chosen_nll(b)


def ref_aot(b, p):
    """TRL's loss_type="aot": both margins sorted over the batch, paired by rank."""
    m = torch.stack([seq_sum(b["logp"], b, 2 * g) - seq_sum(b["logp"], b, 2 * g + 1) for g in pairs(b)])
    m_ref = torch.stack([seq_sum(b["logp_ref"], b, 2 * g) - seq_sum(b["logp_ref"], b, 2 * g + 1) for g in pairs(b)])
    d = torch.sort(m).values - torch.sort(m_ref).values
    return -sum(torch.log(sigma(p["beta"] * x)) for x in d) / len(d)


def aot_batch(seed):
    b = make_batch(8, 2, seed=seed)
    b["logp_old"] = b["logp"].clone()  # the policy before the update: the same weights
    return b


def ref_reinforce_pp(b, p):
    B = b["mask"].shape[0]
    adv = []
    for i in range(B):
        ix = idx(b["mask"], i)
        kl = b["logp_old"][i, ix] - b["logp_ref"][i, ix]
        adv.append(torch.stack([b["reward"][i] - p["beta"] * kl[t:].sum() for t in range(ix.numel())]))
    flat = torch.cat(adv)
    mean = flat.sum() / flat.numel()
    var = ((flat - mean) ** 2).sum() / (flat.numel() - 1)
    total = 0.0
    for i in range(B):
        ix = idx(b["mask"], i)
        A = (adv[i] - mean) / torch.sqrt(var + 1e-8)
        ratio = torch.exp(b["logp"][i, ix] - b["logp_old"][i, ix])
        total = total + clipped_surrogate(ratio, A, 1 - p["eps"], 1 + p["eps"]).sum()
    return -total / flat.numel()


def ref_grpo_tis(b, p):
    n, eps, beta = p["n"], p["eps"], p["beta"]
    A = group_zscore(b["reward"], n)
    B = b["logp"].shape[0]
    total = 0.0
    for i in range(B):
        ix = idx(b["mask"], i)
        lp, old = b["logp"][i, ix], b["logp_old"][i, ix]
        w = torch.clamp(torch.exp(old - b["logp_sampler"][i, ix]), max=p["tis_cap"])
        per_tok = w * clipped_surrogate(torch.exp(lp - old), A[i], 1 - eps, 1 + eps) - beta * k3(lp, b["logp_ref"][i, ix])
        total = total + per_tok.sum() / ix.numel()
    return -total / B


def episode_batch(seed=0):
    """Episodes (grpo_tools' rollout): each row's action mask has a hole inside it -- an
    observation between two of the policy's turns, mask 0, finite garbage in every per-token
    value there -- besides the right padding; `length` counts the actions only."""
    b = make_batch(3, 8, seed=seed)
    gen = torch.Generator().manual_seed(seed + 2000)
    mask = b["mask"].clone()
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        if n < 3:  # the single-token row and short rows stay one turn
            continue
        start = int(torch.randint(1, n - 1, (1,), generator=gen))
        stop = start + int(torch.randint(1, n - start, (1,), generator=gen))
        mask[i, start:stop] = 0.0
    hole = (mask == 0) & (b["mask"] != 0)
    assert int(hole.sum()) > 10  # the holes are there
    for k in ("logp", "logp_old", "logp_ref", "logp_sampler"):
        b[k] = torch.where(hole, 5.0 * torch.randn(b[k].shape, generator=gen, dtype=DT64), b[k])
    b["mask"], b["length"] = mask, mask.sum(-1)
    return b


# ----------------------------------------------------------------------------- cases
DEFAULTS = {
    "grpo_tools": dict(n=8, eps=0.2, beta=0.04, max_turns=4),
    "kto": dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
    "orpo": dict(beta=0.1),
    "cpo": dict(beta=0.1, cpo_alpha=1.0),
    "aot": dict(beta=0.1),
    "reinforce_pp": dict(n=1, beta=0.001, eps=0.2),
    "grpo_tis": dict(n=8, eps=0.2, beta=0.04, tis_cap=3.0),
    "grpo": dict(n=8, eps=0.2, beta=0.04),
    "dapo": dict(n=8, eps=0.2, beta=0.04, eps_high=0.28, max_len=20480, cache=4096),
    "cispo": dict(n=8, eps=0.2, beta=0.04, eps_high=4.0),
    "dr_grpo": dict(n=8, eps=0.2, beta=0.0, max_tokens=1024),
    "gspo": dict(n=8, eps=3e-4, beta=0.04, eps_high=4e-4),
    "rloo": dict(n=4, beta=0.05, eps=0.2),
    "ppo": dict(kl_coef=0.05, eps=0.2, eps_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95),
    "dpo": dict(beta=0.1),
    "ipo": dict(tau=0.1),
    "simpo": dict(beta=2.0, gamma=0.5),
    "spin": dict(beta=0.1),
    "mcts": dict(simulations=16, branching=3, depth=4, c_puct=1.5, beta=0.1, sft_coef=1.0),
    "reward_model": dict(),
    "sft": dict(),
    "sppo": dict(k=5, eta=1000.0),
    "rspo": dict(k=5, eta=1000.0, reg_coef=0.1, k_rev=5.0, cap=10.0),
    "ampo": dict(n=8, k=3, beta=5.0, alpha=0.0),
    "flow_grpo": dict(n=24, steps=10, noise=0.7, eps=1e-4, adv_clip=5.0, beta=0.04),
}


def offpolicy(name):
    """The built-in spec with several updates per rollout, so that it reads a real logp_old."""
    return f"algorithm {name}_offpolicy extends {name}\n\ntrain\n  minibatches = 2\n"


def dapo_batch(seed=0):
    # group 0: all rewards 1.0 and short -> no penalty -> filtered out;
    # group 1: all rewards -1.0 but lengths 7..12 -> ramp and -1 penalties -> kept;
    # groups 2, 3: mixed +-1 rule rewards; row 17 has a single valid token.
    n = 8
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (4 * n,), generator=gen)
    lengths[0:8] = torch.tensor([1, 2, 3, 4, 5, 6, 6, 3])
    lengths[8:16] = torch.tensor([7, 8, 9, 10, 11, 12, 12, 7])
    lengths[17] = 1
    reward = torch.tensor([1.0] * 8 + [-1.0] * 8 + [1, -1, 1, 1, -1, -1, 1, -1] + [-1, -1, 1, -1, -1, -1, -1, 1.0])
    return make_batch(4, n, seed=seed, lengths=lengths, reward=reward)


def flow_batch(seed=0):
    n = 24
    gen = torch.Generator().manual_seed(seed + 1)
    reward = torch.randn(3 * n, generator=gen, dtype=DT64)
    reward[n:2 * n] = 0.75  # one group with equal rewards: filtered
    reward[5] = 60.0        # an outlier so that the advantage clip acts
    return make_batch(3, n, seed=seed, reward=reward, single=7)


def sppo_batch(seed=0, K=5):
    b = make_batch(4, K, seed=seed)
    b["preference"][1] = 10.0  # the single-token row wins its group
    return b


def rspo_batch(seed=0, K=5):
    b = sppo_batch(seed, K)
    # make the forward-KL cap act in group 2: logp_ref far above logp there (-d >> cap)
    rows = slice(2 * K, 3 * K)
    # (2.3 * L never equals cap = 10: no row sits on the clamp's kink)
    b["logp_ref"][rows] = torch.where(b["mask"][rows] != 0, b["logp"][rows] + 2.3, b["logp_ref"][rows])
    return b


def rows01(b, K=5):
    """Preferences such that the winner is row 0 and the loser row 1 of every group: the layout in
    which the sppo/rspo role bug (see the end of this file) is invisible, so the rest of the
    formula is still checked."""
    pref = b["preference"].clone()
    for g in range(pref.shape[0] // K):
        pref[g * K] = 3.0 + 0.1 * g
        pref[g * K + 1] = -3.0 - 0.1 * g
        pref[g * K + 2:(g + 1) * K] = pref[g * K + 2:(g + 1) * K].clamp(-1.0, 1.0)
    b["preference"] = pref
    return b


def ampo_batch(seed=0):
    b = make_batch(3, 8, seed=seed)
    b["reward_model"][1] = 5.0  # the single-token row is chosen in group 0
    return b


CASES = {
    # id: (spec, overrides, batch factory, reference, wrt)
    "grpo": ("grpo", {}, lambda: make_batch(3, 8), lambda b, p: ref_grpo(b, p, False), ["logp"]),
    "grpo-offpolicy": (offpolicy("grpo"), {}, lambda: make_batch(3, 8, seed=1),
                       lambda b, p: ref_grpo(b, p, True), ["logp"]),
    "grpo-beta0-offpolicy": (offpolicy("grpo"), {"beta": 0.0}, lambda: make_batch(3, 8, seed=2),
                             lambda b, p: ref_grpo(b, p, True), ["logp"]),
    "dapo": ("dapo", {"max_len": 10, "cache": 4}, dapo_batch, lambda b, p: ref_dapo(b, p, False), ["logp"]),
    "dapo-offpolicy": (offpolicy("dapo"), {"max_len": 10, "cache": 4}, lambda: dapo_batch(3),
                       lambda b, p: ref_dapo(b, p, True), ["logp"]),
    "cispo": ("cispo", {}, lambda: make_batch(3, 8, seed=4), lambda b, p: ref_cispo(b, p, False), ["logp"]),
    "cispo-offpolicy": (offpolicy("cispo"), {"eps_high": 0.1}, lambda: make_batch(3, 8, seed=5),
                        lambda b, p: ref_cispo(b, p, True), ["logp"]),
    "dr_grpo": ("dr_grpo", {}, lambda: make_batch(3, 8, seed=6), lambda b, p: ref_dr_grpo(b, p, False), ["logp"]),
    "dr_grpo-kl-offpolicy": (offpolicy("dr_grpo"), {"beta": 0.04, "max_tokens": 16}, lambda: make_batch(3, 8, seed=7),
                             lambda b, p: ref_dr_grpo(b, p, True), ["logp"]),
    "gspo": ("gspo", {}, lambda: make_batch(3, 8, seed=8), ref_gspo, ["logp"]),
    "rloo": ("rloo", {}, lambda: make_batch(4, 4, seed=9), ref_rloo, ["logp"]),
    "ppo": ("ppo", {}, lambda: make_batch(10, 1, seed=10), ref_ppo, ["logp", "value"]),
    "ppo-gamma": ("ppo", {"gamma": 0.9, "lam": 0.8, "kl_coef": 0.3}, lambda: make_batch(10, 1, seed=11),
                  ref_ppo, ["logp", "value"]),
    "dpo": ("dpo", {}, lambda: make_batch(6, 2, seed=12), ref_dpo, ["logp"]),
    "dpo-beta": ("dpo", {"beta": 0.5}, lambda: make_batch(6, 2, seed=13), ref_dpo, ["logp"]),
    "ipo": ("ipo", {}, lambda: make_batch(6, 2, seed=14), ref_ipo, ["logp"]),
    "simpo": ("simpo", {}, lambda: make_batch(6, 2, seed=15), ref_simpo, ["logp"]),
    "spin": ("spin", {}, lambda: make_batch(6, 2, seed=16), ref_dpo, ["logp"]),
    "mcts": ("mcts", {}, lambda: make_batch(6, 2, seed=17), ref_mcts, ["logp"]),
    "reward_model": ("reward_model", {}, lambda: make_batch(6, 2, seed=18), ref_reward_model, ["rm_score"]),
    "sft": ("sft", {}, lambda: make_batch(10, 1, seed=19), ref_sft, ["logp"]),
    "ampo": ("ampo", {}, lambda: ampo_batch(20), ref_ampo, ["logp"]),
    "ampo-alpha": ("ampo", {"alpha": 0.7, "k": 2}, lambda: ampo_batch(21), ref_ampo, ["logp"]),
    "flow_grpo": ("flow_grpo", {}, flow_batch, ref_flow_grpo, ["logp", "mu_sqdist_ref"]),
    "sppo": ("sppo", {}, lambda: sppo_batch(22), ref_sppo, ["logp"]),
    "rspo": ("rspo", {}, lambda: rspo_batch(23), ref_rspo, ["logp"]),
    "sppo-rows01": ("sppo", {"eta": 10.0}, lambda: rows01(sppo_batch(24)), ref_sppo, ["logp"]),
    "rspo-rows01": ("rspo", {}, lambda: rows01(rspo_batch(25)), ref_rspo, ["logp"]),
    "kto": ("kto", {}, lambda: make_batch(10, 1, seed=26), ref_kto, ["logp"]),
    "kto-z0": ("kto", {"beta": 2.0, "undesirable_weight": 1.5}, lambda: make_batch(10, 1, seed=27), ref_kto, ["logp"]),
    "orpo": ("orpo", {}, lambda: make_batch(6, 2, seed=28), ref_orpo, ["logp"]),
    "cpo": ("cpo", {}, lambda: make_batch(6, 2, seed=29), ref_cpo, ["logp"]),
    "aot": ("aot", {}, lambda: aot_batch(30), ref_aot, ["logp"]),
    "reinforce_pp": ("reinforce_pp", {}, lambda: make_batch(10, 1, seed=31), ref_reinforce_pp, ["logp"]),
    "reinforce_pp-beta": ("reinforce_pp", {"beta": 0.5}, lambda: make_batch(10, 1, seed=32), ref_reinforce_pp,
                          ["logp"]),
    "grpo_tis": ("grpo_tis", {"tis_cap": 1.1}, lambda: make_batch(3, 8, seed=33), ref_grpo_tis, ["logp"]),
    # episodes: GRPO's Eq. 3 over the policy's tokens only (ref_grpo's loops run over the action mask)
    "grpo_tools": ("grpo_tools", {}, lambda: episode_batch(34), lambda b, p: ref_grpo(b, p, False), ["logp"]),
    "grpo_tools-offpolicy": (offpolicy("grpo_tools"), {"beta": 0.1}, lambda: episode_batch(35),
                             lambda b, p: ref_grpo(b, p, True), ["logp"]),
}
# Cases that fail because of a compiler bug (see the module docstring and the tests at the end).
KNOWN_BUGS: dict[str, str] = {}  # case id → reason, for a compiler bug found and not yet fixed

ALL_SPECS = sorted(DEFAULTS)
ROLLOUT_ONLY = ("_rollout_metrics", "_keep", "_rows")  # what prepare() adds that is not a batch value


def _case_params(case_id):
    spec, overrides, *_ = CASES[case_id]
    name = case_id.split("-")[0]
    return {**DEFAULTS[name], **overrides}


def test_every_builtin_spec_has_a_case():
    from alignspec.dsl.load import builtin_names
    names = set(builtin_names()) - {"common", "rlhf"}
    assert names == set(ALL_SPECS)
    assert names <= {c.split("-")[0] for c in CASES}


@pytest.mark.parametrize("name", ALL_SPECS)
def test_default_params(name):
    assert alignspec.compile(name).params == DEFAULTS[name]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case_id", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=KNOWN_BUGS[c]))
    if c in KNOWN_BUGS else c
    for c in CASES])
def test_matches_reference(case_id, dtype):
    spec, overrides, factory, ref, wrt = CASES[case_id]
    algo = alignspec.compile(spec, **overrides)
    params = _case_params(case_id)
    assert algo.params == params
    batch = cast(factory(), dtype)
    got_loss, got_grad = run(compiled(algo), batch, wrt)
    assert got_loss.dtype == dtype
    # reference in float64 on the (possibly float32-rounded) inputs
    exp_loss, exp_grad = run(lambda b: ref(b, params), cast(batch, DT64), wrt)
    rtol = RTOL[dtype]
    assert_close(got_loss, exp_loss, rtol, f"{case_id} loss")
    for k in wrt:
        assert got_grad[k].dtype == dtype
        assert_close(got_grad[k], exp_grad[k], rtol, f"{case_id} d/d{k}")
        # padding never receives gradient
        if batch[k].shape == batch["mask"].shape:
            assert bool((got_grad[k][batch["mask"] == 0] == 0).all()), f"{case_id}: gradient on padding"


@pytest.mark.parametrize("case_id", list(CASES))
def test_bool_mask_same_as_float_mask(case_id):
    spec, overrides, factory, ref, wrt = CASES[case_id]
    algo = alignspec.compile(spec, **overrides)
    b = factory()
    with_float = algo.loss({k: b[k] for k in algo.inputs}).loss
    b["mask"] = b["mask"] != 0
    with_bool = algo.loss({k: b[k] for k in algo.inputs}).loss
    assert_close(with_bool, with_float, 1e-12, f"{case_id} bool mask")


def test_cases_exercise_the_clips():
    """The random batches are not degenerate: each clip is active somewhere and inactive elsewhere."""
    b = make_batch(3, 8, seed=1)
    ratio = torch.exp(b["logp"] - b["logp_old"])[b["mask"] != 0]
    assert (ratio > 1.2).any() and (ratio < 0.8).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    b = make_batch(3, 8, seed=8)  # gspo: sequence ratio vs 1 +- 3e-4 / 4e-4
    s = torch.stack([torch.exp(seq_mean(b["logp"] - b["logp_old"], b, i)) for i in range(24)])
    assert (s > 1 + 4e-4).any() and (s < 1 - 3e-4).any() and ((s > 1 - 3e-4) & (s < 1 + 4e-4)).any()
    b = flow_batch()
    r = b["reward"]
    assert float((r[5] - r[:24].mean()) / r.std()) > 5.0  # adv_clip acts
    b = rspo_batch(23)
    d = torch.stack([seq_sum(b["logp"] - b["logp_ref"], b, i) for i in range(20)])
    assert (-d > 10.0).any() and (-d < 10.0).any()  # the cap acts on some rows only
    b = make_batch(10, 1, seed=10)
    v, vo = b["value"][b["mask"] != 0], b["value_old"][b["mask"] != 0]
    assert ((v - vo).abs() > 0.2).any() and ((v - vo).abs() < 0.2).any()


def test_dapo_filter_and_penalty_are_exercised():
    p = _case_params("dapo")
    b = dapo_batch()
    r = dapo_rewards(b, p)
    assert dapo_kept_groups(r, 8) == [1, 2, 3]
    pens = {overlong_penalty(L, p["max_len"], p["cache"]) for L in b["length"].tolist()}
    assert 0.0 in pens and -1.0 in pens and any(-1 < x < 0 for x in pens)
    algo = alignspec.compile("dapo", max_len=10, cache=4)
    prepared = algo.prepare({k: b[k] for k in algo.inputs})
    assert prepared["logp"].shape[0] == 24


# ----------------------------------------------------------------------------- requires / inputs
def test_grpo_beta0_drops_the_reference():
    algo = alignspec.compile("grpo", beta=0.0)
    assert "reference" not in algo.requires
    assert "logp_ref" not in algo.inputs
    full = alignspec.compile("grpo")
    assert "reference" in full.requires and "logp_ref" in full.inputs


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.01])
def test_dpo_always_needs_the_reference(beta):
    algo = alignspec.compile("dpo", beta=beta)
    assert "reference" in algo.requires and "logp_ref" in algo.inputs


def test_ppo_needs_critic_and_old_logp():
    algo = alignspec.compile("ppo")
    assert {"critic", "old_logp", "reference", "reward_model", "policy"} <= algo.requires
    assert {"logp", "logp_old", "logp_ref", "value", "value_old", "mask", "reward_model"} <= set(algo.inputs)


def test_dapo_has_no_reference():
    algo = alignspec.compile("dapo")
    assert "reference" not in algo.requires
    assert "logp_ref" not in algo.inputs and "logp_old" not in algo.inputs
    assert "old_logp" not in algo.requires  # one update per rollout: logp_old = stopgrad(logp)


def test_inputs_levels():
    algo = alignspec.compile("ppo")
    assert algo.inputs["logp"] == "action" and algo.inputs["reward_model"] == "response"
    assert alignspec.compile(offpolicy("grpo")).inputs.get("logp_old") == "action"
    assert "old_logp" in alignspec.compile(offpolicy("grpo")).requires


# ----------------------------------------------------------------------------- TRL drivers
class _Accel:
    """What TRL's loss methods use of `accelerate.Accelerator`, on one process."""
    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True
    parallelism_config = None

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


class _LM(torch.nn.Module):
    """Stand-in for a causal LM: returns the given outputs whatever the inputs."""

    def __init__(self, **outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, **kwargs):
        return SimpleNamespace(**self.outputs)


def _bare(cls, **attrs):
    obj = object.__new__(cls)
    obj.accelerator = _Accel()
    obj._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    obj._total_train_tokens = 0
    obj._tp_size = 1
    obj.aux_loss_enabled = False
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


def _pair_order(B):
    """Our interleaved (chosen, rejected) rows -> TRL's [chosen..., rejected...]."""
    return torch.cat([torch.arange(0, B, 2), torch.arange(1, B, 2)])


def trl_dpo(loss_type, beta, logp, logp_ref, mask):
    from trl.trainer.dpo_trainer import DPOTrainer
    B = logp.shape[0]
    o = _pair_order(B)
    m = mask[o]
    valid = m != 0
    per_tok = torch.where(valid, logp[o], torch.zeros((), dtype=logp.dtype))
    ref_sum = torch.where(valid, logp_ref[o], torch.zeros((), dtype=logp.dtype)).sum(1)
    zeros = torch.zeros_like(per_tok)
    model = _LM(log_probs=per_tok, entropy=zeros, mean_logits=zeros, is_top1=torch.zeros_like(valid),
                log_sum_sq_probs=zeros)
    tr = _bare(DPOTrainer, model=model, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
               loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0)
    completion_mask = torch.cat([torch.zeros(B, 1, dtype=m.dtype), m], 1)  # one prompt token, then completion
    ref_c, ref_r = ref_sum.chunk(2)
    inputs = {"input_ids": torch.zeros(B, T + 1, dtype=torch.long), "attention_mask": torch.ones(B, T + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return tr._compute_loss(model, inputs, False)


def trl_grpo(loss_type, logp, mask, advantages, *, old=None, ref=None, beta=0.0, eps_low=0.2, eps_high=0.2,
             level="token", max_completion_length=None, num_items_in_batch=None, ga_steps=1, steps_per_generation=1):
    from trl.trainer.grpo_trainer import GRPOTrainer
    model = torch.nn.Linear(1, 1)
    tr = _bare(GRPOTrainer, model=model, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
               importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low,
               epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
               current_gradient_accumulation_steps=ga_steps, max_completion_length=max_completion_length,
               _entropy_bonus_enabled=False,
               args=SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                    steps_per_generation=steps_per_generation))
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    B = logp.shape[0]
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, logp.shape[1], dtype=torch.long), "completion_mask": mask,
              "advantages": advantages}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = torch.as_tensor(num_items_in_batch, dtype=logp.dtype)
    return tr._compute_loss(model, inputs)


def trl_grpo_advantages(rewards, num_generations, scale_rewards="group"):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, multi_objective_aggregation
    "sum_then_normalize", one reward function: re-implemented line by line (it runs inside generation)."""
    from trl.trainer.utils import nanstd
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:  # "batch"
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_rloo_advantages(rewards, old, ref, mask, num_generations, beta):
    """TRL 1.16 RLOOTrainer._generate_and_score_completions (normalize_advantages=False),
    re-implemented line by line."""
    per_token_kl = old - ref
    kl = (per_token_kl * mask).sum(-1)
    rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    advantages = rewards - baselines.view(-1)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_rloo(logp, old, mask, advantages, eps=0.2):
    from trl.trainer.rloo_trainer import RLOOTrainer
    model = torch.nn.Linear(1, 1)
    tr = _bare(RLOOTrainer, model=model, epsilon_low=eps, epsilon_high=eps)
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    B = logp.shape[0]
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, logp.shape[1], dtype=torch.long), "completion_mask": mask,
              "old_logps": (old * mask).sum(1), "advantages": advantages}
    return tr._compute_loss(model, inputs)


def trl_sft(logp, mask, num_items_in_batch=None):
    from trl.trainer.sft_trainer import SFTTrainer
    valid = mask != 0
    per_tok = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype))
    model = _LM(log_probs=per_tok, label_mask=valid, entropy=torch.zeros_like(per_tok),
                is_top1=torch.zeros_like(valid))
    tr = _bare(SFTTrainer, model=model, compute_loss_func=None, label_smoother=None,
               args=SimpleNamespace(loss_type="nll", average_tokens_across_devices=False, max_length=None))
    inputs = {"input_ids": torch.zeros(logp.shape, dtype=torch.long), "attention_mask": torch.ones(logp.shape)}
    return tr.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)


def trl_reward(scores):
    from trl.trainer.reward_trainer import RewardTrainer
    B = scores.shape[0]
    model = _LM(logits=scores[_pair_order(B)][:, None])
    tr = _bare(RewardTrainer, model=model, args=SimpleNamespace(center_rewards_coefficient=None))
    inputs = {"input_ids": torch.zeros(B, 3, dtype=torch.long), "attention_mask": torch.ones(B, 3)}
    return tr.compute_loss(model, inputs)


def trl_simpo(logp, mask, beta, gamma):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    B = logp.shape[0]
    valid = mask != 0
    avg = torch.where(valid, logp, torch.zeros((), dtype=logp.dtype)).sum(1) / valid.sum(1)  # average_log_prob
    avg = avg[_pair_order(B)]
    tr = _bare(CPOTrainer, alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0)
    losses, _, _ = tr.cpo_loss(*avg.chunk(2))
    return losses.mean()


def compare(ours_fn, trl_fn, batch, wrt=("logp",), rtol=1e-9, what=""):
    got_loss, got_grad = run(ours_fn, batch, list(wrt))
    exp_loss, exp_grad = run(trl_fn, batch, list(wrt))
    assert_close(got_loss, exp_loss, rtol, f"{what} loss vs TRL")
    for k in wrt:
        assert_close(got_grad[k], exp_grad[k], rtol, f"{what} d/d{k} vs TRL")


# ----------------------------------------------------------------------------- TRL comparisons
@pytest.mark.parametrize("spec,beta", [("dpo", 0.1), ("dpo", 0.5), ("spin", 0.1)])
def test_trl_dpo_sigmoid(spec, beta):
    algo = alignspec.compile(spec, beta=beta)
    compare(compiled(algo), lambda b: trl_dpo("sigmoid", beta, b["logp"], b["logp_ref"], b["mask"]),
            make_batch(6, 2, seed=30), what=spec)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_trl_ipo(tau):
    algo = alignspec.compile("ipo", tau=tau)
    compare(compiled(algo), lambda b: trl_dpo("ipo", tau, b["logp"], b["logp_ref"], b["mask"]),
            make_batch(6, 2, seed=31), what="ipo")


# TRL's advantages use `trl.trainer.utils.nanstd`, whose Bessel factor count / (count - 1) is an
# int / int division, i.e. float32 even for float64 rewards: its std is off by ~2e-8 relative.
# So TRL's loss code is compared at 1e-9 when fed our advantages ("A-ours"), and end to end
# with TRL's own advantages ("A-trl") at 1e-7.
ADV = [pytest.param("ours", 1e-9, id="A-ours"), pytest.param("trl", 1e-7, id="A-trl")]


def _adv(source, algo, b, rewards=None, rows=None, scale="group"):
    if source == "ours":
        return algo.prepare({k: b[k] for k in algo.inputs})["A"].detach()
    r = b["reward"] if rewards is None else rewards
    return trl_grpo_advantages(r if rows is None else r[rows], 8, scale)


@pytest.mark.parametrize("source,rtol", ADV)
def test_trl_grpo_on_policy(source, rtol):
    """Our grpo (one update per rollout) = TRL loss_type="grpo", beta=0.04, no old_per_token_logps."""
    algo = alignspec.compile("grpo")
    b = make_batch(3, 8, seed=32)
    A = _adv(source, algo, b)
    compare(compiled(algo), lambda x: trl_grpo("grpo", x["logp"], x["mask"], A, ref=x["logp_ref"], beta=0.04), b,
            rtol=rtol, what="grpo")


@pytest.mark.parametrize("source,rtol", ADV)
@pytest.mark.parametrize("beta", [0.04, 0.0])
def test_trl_grpo_off_policy(beta, source, rtol):
    algo = alignspec.compile(offpolicy("grpo"), beta=beta)
    b = make_batch(3, 8, seed=33)
    A = _adv(source, algo, b)
    compare(compiled(algo),
            lambda x: trl_grpo("grpo", x["logp"], x["mask"], A, old=x["logp_old"],
                               ref=x["logp_ref"] if beta else None, beta=beta), b, rtol=rtol, what="grpo off-policy")


def _dapo_kept(b, algo):
    """DAPO's kept rows, and the rewards TRL sees: rule reward + TRL's own soft overlong
    punishment reward function."""
    from trl.rewards import get_soft_overlong_punishment
    pen = get_soft_overlong_punishment(max_completion_len=algo.params["max_len"],
                                       soft_punish_cache=algo.params["cache"])
    lengths = [int(x) for x in b["length"]]
    r = b["reward"] + torch.tensor(pen([[0] * L for L in lengths]), dtype=b["reward"].dtype)
    n = algo.group_size
    keep = [g for g in range(r.shape[0] // n) if float(r[g * n:(g + 1) * n].std()) > 0]
    rows = torch.cat([torch.arange(g * n, (g + 1) * n) for g in keep])
    return rows, r


@pytest.mark.parametrize("source,rtol", ADV)
def test_trl_dapo(source, rtol):
    """TRL "dapo" (global token normalizer) on the kept groups, TRL's overlong penalty, eps_high 0.28."""
    algo = alignspec.compile(offpolicy("dapo"), max_len=10, cache=4)
    b = dapo_batch(34)
    rows, r_trl = _dapo_kept(b, algo)
    A = _adv(source, algo, b, r_trl, rows)

    def trl_fn(x):
        m = x["mask"][rows]
        return trl_grpo("dapo", x["logp"][rows], m, A, old=x["logp_old"][rows], eps_low=0.2, eps_high=0.28,
                        num_items_in_batch=m.sum())
    compare(compiled(algo), trl_fn, b, rtol=rtol, what="dapo")


@pytest.mark.parametrize("source,rtol", ADV)
def test_trl_bnpo_is_dapo_on_its_own_batch(source, rtol):
    """TRL "bnpo" = token mean over the local batch = our dapo loss with totals=None."""
    algo = alignspec.compile(offpolicy("dapo"), max_len=10, cache=4)
    b = dapo_batch(35)
    rows, r_trl = _dapo_kept(b, algo)
    A = _adv(source, algo, b, r_trl, rows)
    compare(compiled(algo), lambda x: trl_grpo("bnpo", x["logp"][rows], x["mask"][rows], A, old=x["logp_old"][rows],
                                               eps_low=0.2, eps_high=0.28), b, rtol=rtol, what="bnpo")


def test_trl_dapo_micro_batches():
    """TRL "dapo" split in 2 accumulation steps sums to the full loss, as our step_loss with totals does."""
    algo = alignspec.compile(offpolicy("dapo"), max_len=10, cache=4)
    b = dapo_batch(36)
    rows, r_trl = _dapo_kept(b, algo)
    prepared = algo.prepare({k: b[k] for k in algo.inputs})
    totals = ops.local_totals(prepared, algo.group_size)
    A = prepared["A"]
    halves = [slice(0, 8), slice(8, 24)]  # uneven: 1 group, then 2

    def ours(x):
        p = dict(prepared, logp=x["logp"][rows])
        return sum(algo.step_loss({k: v[h] if torch.is_tensor(v) and v.dim() else v for k, v in p.items()
                                   if k not in ROLLOUT_ONLY}, totals).loss for h in halves)

    def trl_fn(x):
        lp, m, old = x["logp"][rows], x["mask"][rows], x["logp_old"][rows]
        return sum(trl_grpo("dapo", lp[h], m[h], A[h], old=old[h], eps_low=0.2, eps_high=0.28,
                            num_items_in_batch=m.sum(), ga_steps=2, steps_per_generation=2) for h in halves)
    compare(ours, trl_fn, b, what="dapo micro-batches")


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_trl_dr_grpo(beta):
    """TRL "dr_grpo" with scale_rewards="none" (no std: TRL's advantage is exact here)."""
    algo = alignspec.compile(offpolicy("dr_grpo"), beta=beta, max_tokens=T)
    b = make_batch(3, 8, seed=37)
    compare(compiled(algo),
            lambda x: trl_grpo("dr_grpo", x["logp"], x["mask"], trl_grpo_advantages(x["reward"], 8, "none"),
                               old=x["logp_old"], ref=x["logp_ref"] if beta else None, beta=beta,
                               max_completion_length=T), b, what="dr_grpo")


@pytest.mark.parametrize("source,rtol", ADV)
def test_trl_cispo(source, rtol):
    algo = alignspec.compile(offpolicy("cispo"))
    b = make_batch(3, 8, seed=38)
    b["logp_old"] = torch.where(b["mask"] != 0, b["logp_old"] - 1.0, b["logp_old"])  # ratios above the cap
    A = _adv(source, algo, b)
    compare(compiled(algo),
            lambda x: trl_grpo("cispo", x["logp"], x["mask"], A, old=x["logp_old"], eps_high=5.0,
                               num_items_in_batch=x["mask"].sum()), b, rtol=rtol, what="cispo")


@pytest.mark.parametrize("source,rtol", ADV)
def test_trl_gspo(source, rtol):
    algo = alignspec.compile("gspo")
    b = make_batch(3, 8, seed=39)
    A = _adv(source, algo, b)
    compare(compiled(algo),
            lambda x: trl_grpo("grpo", x["logp"], x["mask"], A, old=x["logp_old"], eps_low=3e-4, eps_high=4e-4,
                               level="sequence"), b, rtol=rtol, what="gspo")


def test_trl_rloo():
    algo = alignspec.compile("rloo")
    b = make_batch(4, 4, seed=40)
    compare(compiled(algo),
            lambda x: trl_rloo(x["logp"], x["logp_old"], x["mask"],
                               trl_rloo_advantages(x["reward"], x["logp_old"], x["logp_ref"], x["mask"], 4, 0.05)),
            b, what="rloo")


def test_trl_rloo_advantage():
    algo = alignspec.compile("rloo")
    b = make_batch(4, 4, seed=41)
    prepared = algo.prepare({k: b[k] for k in algo.inputs})
    exp = trl_rloo_advantages(b["reward"], b["logp_old"], b["logp_ref"], b["mask"], 4, 0.05)
    assert_close(prepared["A"], exp, 1e-12, "rloo advantage")


def test_trl_grpo_advantage():
    for name, scale in [("grpo", "group"), ("dr_grpo", "none")]:
        algo = alignspec.compile(name)
        b = make_batch(3, 8, seed=42)
        b["reward"][8:16] = 1.0  # a zero-std group
        prepared = algo.prepare({k: b[k] for k in algo.inputs})
        rtol = 1e-7 if scale == "group" else 1e-12  # TRL's float32 Bessel factor (see ADV)
        assert_close(prepared["A"], trl_grpo_advantages(b["reward"], 8, scale), rtol, f"{name} advantage")


def test_trl_overlong_penalty():
    from trl.rewards import get_soft_overlong_punishment
    algo = alignspec.compile("dapo", max_len=10, cache=4)
    lengths = torch.arange(1, 13, dtype=DT64).repeat(2)[:16]
    mask = (torch.arange(12)[None, :] < lengths[:, None]).to(DT64)
    reward = torch.zeros(16, dtype=DT64)
    reward[0] = 1.0  # keep both groups
    reward[8] = 1.0
    s = algo.score({"reward": reward, "length": mask.sum(-1), "mask": mask})
    pen = torch.tensor(get_soft_overlong_punishment(10, 4)([[0] * int(L) for L in lengths]), dtype=DT64)
    exp = trl_grpo_advantages(reward + pen, 8)
    assert_close(s["A"], exp, 1e-7, "dapo advantage with TRL's overlong penalty")  # TRL nanstd: see ADV


def test_trl_sft():
    algo = alignspec.compile("sft")
    compare(compiled(algo), lambda b: trl_sft(b["logp"], b["mask"]), make_batch(10, 1, seed=43), what="sft")


def test_trl_sft_num_items_in_batch():
    """TRL's global token count (num_items_in_batch) = our totals["tokens"], micro-batch by micro-batch."""
    algo = alignspec.compile("sft")
    b = make_batch(10, 1, seed=44)
    totals = ops.local_totals(b, 1)
    parts = [slice(0, 3), slice(3, 10)]
    compare(lambda x: sum(algo.step_loss({"logp": x["logp"][s], "mask": x["mask"][s]}, totals).loss for s in parts),
            lambda x: sum(trl_sft(x["logp"][s], x["mask"][s], num_items_in_batch=x["mask"].sum()) for s in parts),
            b, what="sft micro-batches")


def test_trl_reward_model():
    algo = alignspec.compile("reward_model")
    compare(compiled(algo), lambda b: trl_reward(b["rm_score"]), make_batch(6, 2, seed=45), wrt=("rm_score",),
            what="reward_model")


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4)])
def test_trl_simpo(beta, gamma):
    algo = alignspec.compile("simpo", beta=beta, gamma=gamma)
    compare(compiled(algo), lambda b: trl_simpo(b["logp"], b["mask"], beta, gamma), make_batch(6, 2, seed=46),
            what="simpo")


# ----------------------------------------------------------------------------- compiler bugs (minimal)
def test_bug_sppo_role_value_before_selection():
    algo = alignspec.compile("sppo")
    s = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=DT64)  # winner is row 4, loser row 0
    mask = torch.ones(5, 3, dtype=DT64)
    out = algo.loss({"logp": torch.zeros(5, 3, dtype=DT64), "logp_ref": torch.zeros(5, 3, dtype=DT64),
                     "mask": mask, "preference": s})
    P = ops.winrate(s, 5)  # [0.1907, 0.3333, 0.5, 0.6667, 0.8093]
    expected = 0.5 * ((1000 * (P[4] - 0.5)) ** 2 + (1000 * (P[0] - 0.5)) ** 2)  # 95659.509...
    # got: 0.5 * ((1000 * (P[0] - 0.5)) ** 2 + (1000 * (P[1] - 0.5)) ** 2) = 61719.906...
    assert_close(out.loss, expected, 1e-12, "sppo")


def test_bug_ppo_kl_coef_zero_compiles():
    algo = alignspec.compile("ppo", kl_coef=0.0)
    assert "reference" not in algo.requires
