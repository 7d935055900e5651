"""The new built-ins against TRL 1.16's own code, loss and gradient, in float64.

- aot: TRL's DPOTrainer._compute_loss with loss_type="aot" (a stub model, tests/trl_stubs.py)
- kto: TRL's KTOTrainer._compute_loss (a stub model for the matched and mismatched forwards)
- orpo: TRL's ORPOTrainer.odds_ratio_loss (its NLL is CrossEntropyLoss over the chosen
  completions' tokens: -mean of their log-probs, written here)
- cpo: TRL's CPOTrainer.cpo_loss (+ the same NLL)
- grpo_tis: TRL's GRPOTrainer._compute_loss with the vLLM importance-sampling ratio given as
  TRL's generation step computes it in "token_truncate" mode (those four lines, written here:
  that step needs vLLM)
- reinforce_pp: no TRL trainer; the formula of the paper / verl written out here.

TRL's ORPO casts log-probs to float32 (`.float()`), so orpo is compared at float32 precision.
"""

from __future__ import annotations

import torch
from trl_stubs import StubLM, trainer_self, trl_dpo, with_prompt_token

import alignspec
from alignspec import ops

DT = torch.float64


def _batch(rows, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (rows,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).to(DT)

    def lp():
        return -(2 * torch.rand(rows, T, generator=g, dtype=DT) + 0.05) * mask

    b = {"mask": mask, "logp": lp(), "logp_ref": lp(), "logp_old": lp(), "logp_sampler": lp(),
         "reward": torch.randn(rows, generator=g, dtype=DT)}
    b["length"] = mask.sum(1)
    return b


def _ours(name, batch, **over):
    algo = alignspec.compile(name, **over)
    b = {k: batch[k] for k in algo.inputs}
    leaf = batch["logp"].clone().requires_grad_(True)
    b["logp"] = leaf
    out = algo.loss(b)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out.loss.detach(), grad


def _close(a, b, rtol=1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, float(b.abs().max())))


def test_aot_matches_trl():
    b = _batch(16, seed=1)
    b["logp_old"] = b["logp"].clone()  # the policy before the update: the same weights
    want, want_g = trl_dpo(b, "aot", 0.1)
    got, got_g = _ours("aot", b)
    _close(got, want)
    _close(got_g, want_g)
    assert not torch.allclose(want, trl_dpo(b, "sigmoid", 0.1)[0])  # the sorting matters here


def test_aot_is_the_same_on_micro_batches_and_processes():
    algo = alignspec.compile("aot")
    b = _batch(16, seed=2)
    b["logp_old"] = b["logp"].clone()
    full = algo.prepare({k: b[k] for k in algo.inputs})
    for k in ("_rollout_metrics", "_keep", "_rows"):
        full.pop(k)
    whole = algo.step_loss(full).loss
    totals = ops.local_totals(full, 2)
    parts = []
    for g0, g1 in [(0, 3), (3, 4), (4, 8)]:  # uneven micro-batches of whole pairs
        micro = {k: (v[g0:g1] if v.shape[0] == 8 else v[2 * g0:2 * g1]) if torch.is_tensor(v) and v.dim() else v
                 for k, v in full.items()}
        parts.append(algo.step_loss(micro, totals).loss)
    _close(sum(parts), whole)
    # two processes: each prepares its own half; the ranks are over both (a gather of both halves)
    halves = [{k: v[:8] if torch.is_tensor(v) and v.dim() else v for k, v in b.items()},
              {k: v[8:] if torch.is_tensor(v) and v.dim() else v for k, v in b.items()}]
    m_old = [((h["logp_old"] * h["mask"]).sum(1)) for h in halves]
    m_old = [m[0::2] - m[1::2] for m in m_old]
    m_ref = [((h["logp_ref"] * h["mask"]).sum(1)) for h in halves]
    m_ref = [m[0::2] - m[1::2] for m in m_ref]
    losses = []
    for rank, h in enumerate(halves):
        seen = iter([m_old, m_ref])  # in the order the generated code gathers: the ranks' values, then the sorted

        def gather(x, rank=rank):
            parts = next(seen)
            return torch.cat(parts), sum(p.numel() for p in parts[:rank])

        with ops.batch_stats_reduce(lambda t: t * 2, gather):
            prepared = algo.prepare({k: h[k] for k in algo.inputs})
        for k in ("_rollout_metrics", "_keep", "_rows"):
            prepared.pop(k)
        losses.append(algo.step_loss(prepared, totals).loss)
    _close(sum(losses), whole)


# ------------------------------------------------------------------ kto
def _trl_kto(batch, labels, beta=0.1):
    from trl.trainer.kto_trainer import KTOTrainer
    leaf = batch["logp"].clone().requires_grad_(True)
    mask = batch["mask"]
    B, T = mask.shape
    lm = StubLM()
    ids, kl_ids = torch.zeros(B, T + 1, dtype=torch.long), torch.zeros(B, T + 1, dtype=torch.long)
    lm.add(ids, leaf * mask)
    lm.add(kl_ids, batch["kl_logp"] * mask)  # TRL sums the mismatched pairs' per-token log-probs
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": with_prompt_token(mask),
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
              "KL_completion_mask": with_prompt_token(mask), "label": labels,
              "ref_logps": (batch["logp_ref"] * mask).sum(1), "ref_KL_logps": batch["ref_kl"]}
    me = trainer_self(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                      desirable_weight=1.0, undesirable_weight=1.0)
    me._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(me, model, batch)
    out = KTOTrainer._compute_loss(me, lm, inputs, False)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def test_kto_matches_trl():
    b = _batch(10, seed=3)
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    b["kl_logp"] = b["logp_old"]  # any per-token log-probs of the mismatched pairs
    b["ref_kl"] = (b["logp_ref"] * b["mask"]).sum(1).flip(0) - 0.4
    want, want_g = _trl_kto(b, labels)
    ours = dict(b, label=labels.to(DT), logp_mismatch=(b["kl_logp"] * b["mask"]).sum(1), logp_ref_mismatch=b["ref_kl"])
    got, got_g = _ours("kto", ours)
    _close(got, want)
    _close(got_g, want_g)
    # z0 at its clamp: the mismatched pairs more likely under the reference
    b["ref_kl"] = b["ref_kl"] + 50.0
    want, want_g = _trl_kto(b, labels)
    ours["logp_ref_mismatch"] = b["ref_kl"]
    got, got_g = _ours("kto", ours)
    _close(got, want)
    _close(got_g, want_g)


# ------------------------------------------------------------------ orpo, cpo
def _nll_chosen(logp, mask):
    return -(logp[0::2] * mask[0::2]).sum() / mask[0::2].sum()


def test_orpo_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    b = _batch(12, seed=4)
    leaf = b["logp"].clone().requires_grad_(True)
    avg = (leaf * b["mask"]).sum(1) / b["mask"].sum(1)
    me = trainer_self(beta=0.1)
    losses, *_ = ORPOTrainer.odds_ratio_loss(me, avg[0::2], avg[1::2])
    want = _nll_chosen(leaf, b["mask"]) - losses.mean()
    (want_g,) = torch.autograd.grad(want, leaf)
    got, got_g = _ours("orpo", b)
    _close(got, want.detach().to(DT), rtol=1e-6)  # TRL computes the odds ratio in float32
    _close(got_g, want_g, rtol=1e-6)


def test_orpo_near_probability_one_stays_finite():
    b = _batch(4, seed=5)
    b["logp"] = b["logp"] * 1e-9  # log p ~ -1e-9: log(1 - p) needs expm1
    got, g = _ours("orpo", b)
    assert torch.isfinite(got) and torch.isfinite(g).all()


def test_cpo_matches_trl():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    b = _batch(12, seed=6)
    leaf = b["logp"].clone().requires_grad_(True)
    s = (leaf * b["mask"]).sum(1)
    me = trainer_self(beta=0.1, alpha=0.0, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5)
    losses, *_ = CPOTrainer.cpo_loss(me, s[0::2], s[1::2])
    want = losses.mean() + 1.0 * _nll_chosen(leaf, b["mask"])
    (want_g,) = torch.autograd.grad(want, leaf)
    got, got_g = _ours("cpo", b)
    _close(got, want.detach())
    _close(got_g, want_g)


# ------------------------------------------------------------------ grpo_tis
def test_grpo_tis_matches_trl():
    from trl.trainer.grpo_trainer import GRPOTrainer
    G, n = 3, 8
    b = _batch(G * n, seed=7)
    b["logp_sampler"] = b["logp_old"] + 3.0 * (torch.rand(b["mask"].shape, dtype=DT) - 0.5)  # some ratios > 3
    mask = b["mask"]
    # TRL's generation step, vllm_importance_sampling_mode="token_truncate", clip_max 3
    is_ratio = torch.clamp(torch.exp((b["logp_old"] - b["logp_sampler"]) * mask), min=None, max=3.0)
    assert bool((is_ratio == 3.0).any())
    r = b["reward"]
    rg = r.view(G, n)
    adv = ((rg - rg.mean(1, keepdim=True)) / (rg.std(1, keepdim=True) + 1e-4)).reshape(-1)
    leaf = b["logp"].clone().requires_grad_(True)
    me = trainer_self(top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
                      beta=0.04, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, use_vllm=True,
                      vllm_importance_sampling_correction=True, current_gradient_accumulation_steps=1,
                      _entropy_bonus_enabled=False, args=type("A", (), {"use_bias_correction_kl": False,
                                                                         "delta": None})())
    me._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.zeros_like(leaf), None)
    ids = torch.zeros(G * n, 1, dtype=torch.long)
    inputs = {"prompt_ids": ids, "prompt_mask": torch.ones_like(ids), "completion_ids": mask.long(),
              "completion_mask": mask.long(), "advantages": adv, "old_per_token_logps": b["logp_old"],
              "ref_per_token_logps": b["logp_ref"], "importance_sampling_ratio": is_ratio}
    want = GRPOTrainer._compute_loss(me, None, inputs)
    (want_g,) = torch.autograd.grad(want, leaf)
    got, got_g = _ours("grpo_tis", b)
    _close(got, want.detach())
    _close(got_g, want_g)


# ------------------------------------------------------------------ reinforce_pp
def test_reinforce_pp_matches_the_paper():
    b = _batch(16, seed=8)
    m = b["mask"]
    beta, eps = 0.001, 0.2
    kl = (b["logp_old"] - b["logp_ref"]) * m                     # Eq. 9 (k1)
    tail = kl.flip(1).cumsum(1).flip(1)                          # sum_{i >= t} KL(i)
    A = (b["reward"][:, None] - beta * tail) * m                 # Eq. 8
    n = m.sum()
    mean = A.sum() / n
    var = (((A - mean) * m) ** 2).sum() / (n - 1)
    A = (A - mean) * torch.rsqrt(var + 1e-8) * m                 # Eq. 10 (verl's masked_whiten)
    leaf = b["logp"].clone().requires_grad_(True)
    ratio = torch.exp(leaf - b["logp_old"])
    pg = torch.minimum(ratio * A, torch.clamp(ratio, 1 - eps, 1 + eps) * A)
    want = -(pg * m).sum() / n
    (want_g,) = torch.autograd.grad(want, leaf)
    got, got_g = _ours("reinforce_pp", b)
    _close(got, want.detach())
    _close(got_g, want_g)
