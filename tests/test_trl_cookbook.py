"""Every loss_type of TRL 1.16's DPOTrainer and GRPOTrainer written as a spec, each compared
with TRL's own `_compute_loss` (tests/trl_stubs.py) on the same float64 tensors, loss and
gradient. docs/language.md shows three of them; this file is the full list (and what cannot
be written is listed at the end of docs/language.md's cookbook)."""

from __future__ import annotations

import pytest
import torch
from trl_stubs import trl_dpo, trl_grpo

import alignspec

DT = torch.float64


def _pairs(G=8, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * G,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).to(DT)
    b = {"mask": mask, "logp": -(2 * torch.rand(2 * G, T, generator=g, dtype=DT) + 0.05) * mask,
         "logp_ref": -(2 * torch.rand(2 * G, T, generator=g, dtype=DT) + 0.05) * mask}
    b["logp_old"] = b["logp"].clone()
    b["length"] = mask.sum(1)
    return b


PAIR_HEAD = """algorithm cookbook
data pairs
params
  beta = {beta}
  eps = {eps}
  tau = 0.05
  alpha = 0.5
  ld = 0.3
"""

# name: (sections after the params, TRL loss_type, TRL settings)
DPO = {
    "sigmoid": ("loss\n  h = beta * sum_tokens(logp - logp_ref)\n  minimize -mean(logsigmoid(h[chosen] - h[rejected]))",),
    "hinge": ("loss\n  h = beta * sum_tokens(logp - logp_ref)\n  minimize mean(relu(1 - (h[chosen] - h[rejected])))",),
    "ipo": ("loss\n  h = mean_tokens(logp - logp_ref)\n  minimize mean((h[chosen] - h[rejected] - 1 / (2 * beta)) ** 2)",),
    "exo_pair": ("loss\n  z = beta * (sum_tokens(logp - logp_ref)[chosen] - sum_tokens(logp - logp_ref)[rejected])\n"
                 "  minimize mean(sigmoid(z) * (logsigmoid(z) - log1p(-eps)) + sigmoid(-z) * (logsigmoid(-z) - log(eps)))",
                 {"label_smoothing": 0.1}),
    "nca_pair": ("loss\n  h = beta * sum_tokens(logp - logp_ref)\n"
                 "  minimize -mean(logsigmoid(h[chosen]) + 0.5 * logsigmoid(-h[chosen]) + 0.5 * logsigmoid(-h[rejected]))",),
    "robust": ("loss\n  z = beta * (sum_tokens(logp - logp_ref)[chosen] - sum_tokens(logp - logp_ref)[rejected])\n"
               "  minimize mean((-(1 - eps) * logsigmoid(z) + eps * logsigmoid(-z)) / (1 - 2 * eps))",
               {"label_smoothing": 0.1}),
    "bco_pair": ("loss\n  h = beta * sum_tokens(logp - logp_ref)\n  minimize -mean(logsigmoid(h[chosen]) + logsigmoid(-h[rejected]))",),
    "sppo_hard": ("loss\n  h = sum_tokens(logp - logp_ref)\n"
                  "  minimize mean((h[chosen] - 0.5 / beta) ** 2 + (h[rejected] + 0.5 / beta) ** 2)",),
    "aot": None,  # the built-in algorithms/aot.align (tests/test_trl_losses.py)
    "aot_unpaired": (
        # sort(chosen log-ratios)_k against sort(rejected log-ratios)_k. Each chosen row meets the
        # rejected value of its rank and each rejected row the chosen value of its rank (ranks and
        # partner values from the rollout's logp_old: the same weights at the first update);
        # the third sum removes the double-counted value, so value and gradient are TRL's.
        "advantage\n  h_old = sum_tokens(logp_old - logp_ref)\n  c_old = h_old[chosen]\n"
        "  r_at = batch_sorted(h_old[rejected], batch_rank(h_old[chosen]))\n"
        "  c_at = batch_sorted(h_old[chosen], batch_rank(h_old[rejected]))\n"
        "loss\n  h = sum_tokens(logp - logp_ref)\n"
        "  minimize -mean(logsigmoid(beta * (h[chosen] - r_at)) + logsigmoid(beta * (c_at - h[rejected]))"
        " - logsigmoid(beta * (c_old - r_at)))",),
    "apo_zero": ("loss\n  h = beta * sum_tokens(logp - logp_ref)\n  minimize mean(1 - sigmoid(h[chosen]) + sigmoid(h[rejected]))",),
    "apo_down": ("loss\n  h = beta * sum_tokens(logp - logp_ref)\n"
                 "  minimize mean(sigmoid(h[chosen]) + 1 - sigmoid(h[chosen] - h[rejected]))",),
    "discopop": ("loss\n  h = beta * sum_tokens(logp - logp_ref)\n  z = h[chosen] - h[rejected]\n"
                 "  m = sigmoid(z / tau)\n  minimize mean(-logsigmoid(z) * (1 - m) + exp(-z) * m)",),
    "sft": ("advantage\n  chosen_tokens = sum(length[chosen])\nloss\n"
            "  minimize -sum(sum_tokens(logp)[chosen]) / chosen_tokens",),
    "sigmoid_norm": ("loss\n  h = beta * mean_tokens(logp - logp_ref)\n  minimize -mean(logsigmoid(h[chosen] - h[rejected]))",),
    # options of the loss: f-divergences (f'(t) as a function of the log-ratio), several loss
    # types with weights, LD-DPO's down-weighted tail beyond the shorter response's length
    "forward_kl": ("loss\n  f = 1 - exp(-sum_tokens(logp - logp_ref))\n"
                   "  minimize -mean(logsigmoid(beta * (f[chosen] - f[rejected])))",
                   {"f_divergence_type": "forward_kl"}, "sigmoid"),
    "js_divergence": ("loss\n  f = log(2) + logsigmoid(sum_tokens(logp - logp_ref))\n"
                      "  minimize -mean(logsigmoid(beta * (f[chosen] - f[rejected])))",
                      {"f_divergence_type": "js_divergence"}, "sigmoid"),
    "alpha_divergence": ("loss\n  f = (exp((alpha - 1) * sum_tokens(logp - logp_ref)) - 1) / (alpha - 1)\n"
                         "  minimize -mean(logsigmoid(beta * (f[chosen] - f[rejected])))",
                         {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}, "sigmoid"),
    "sigmoid+sft": ("advantage\n  chosen_tokens = sum(length[chosen])\nloss\n"
                    "  h = beta * sum_tokens(logp - logp_ref)\n  minimize -mean(logsigmoid(h[chosen] - h[rejected]))\n"
                    "  minimize sft = -sum(sum_tokens(logp)[chosen]) / chosen_tokens",
                    {}, ("sigmoid", "sft")),
    "ld_alpha": ("loss\n  pos = length - suffix_sum(mask) + 1\n"
                 "  shared = min(length, group_min(length))\n"
                 "  w = where(pos <= shared, 1, ld)\n  h = beta * sum_tokens(w * (logp - logp_ref))\n"
                 "  minimize -mean(logsigmoid(h[chosen] - h[rejected]))",
                 {"ld_alpha": 0.3}, "sigmoid"),
}


@pytest.mark.parametrize("name", [k for k, v in DPO.items() if v is not None])
def test_dpo_loss_types_as_specs(tmp_path, name):
    body, *rest = DPO[name]
    attrs = rest[0] if rest else {}
    loss_type = rest[1] if len(rest) > 1 else name
    ref = None
    spec = tmp_path / "cookbook.align"
    spec.write_text(PAIR_HEAD.format(beta=0.1, eps=attrs.get("label_smoothing", 0.1)) + body + "\n")
    algo = alignspec.compile(spec)
    b = _pairs(seed=len(name))
    if name == "ld_alpha":  # precomputed reference log-probs are LD-weighted too (shared prefix + ld * tail)
        pos = b["mask"].cumsum(1)
        shared = torch.minimum(b["length"][0::2], b["length"][1::2]).repeat_interleave(2)[:, None]
        w = torch.where(pos <= shared, 1.0, 0.3).to(DT) * b["mask"]
        ref = (b["logp_ref"] * w).sum(1)
        attrs = dict(attrs, ref=ref)
    if name == "alpha_divergence":  # TRL's clamp table has no float64 entry: TRL runs in float32 here
        f32 = {k: v.float() for k, v in b.items()}
        want, want_g = (x.double() for x in trl_dpo(f32, loss_type, 0.1, **attrs))
    else:
        want, want_g = trl_dpo(b, loss_type, 0.1, **attrs)
    # TRL's exo_pair makes its epsilon a float32 tensor; alpha_divergence is float32 above
    rtol = 1e-6 if name in ("exo_pair", "alpha_divergence") else 1e-9
    del ref
    inputs = {k: b[k] for k in algo.inputs}
    leaf = b["logp"].clone().requires_grad_(True)
    inputs["logp"] = leaf
    got = algo.loss(inputs).loss
    (got_g,) = torch.autograd.grad(got, leaf)
    torch.testing.assert_close(got.detach(), want, rtol=rtol, atol=max(rtol * 1e-3, 1e-10))
    torch.testing.assert_close(got_g, want_g, rtol=rtol, atol=max(rtol * 1e-3, 1e-10))


GROUP_HEAD = """algorithm cookbook_grpo
data prompts
params
  n: int = 4
  eps = 0.2
  c = 3.0
sample
  responses = generate(prompt, n = n)
score
  r = reward(response)
advantage
  A = (r - group_mean(r)) / (group_std(r) + 1e-4)
"""

GRPO = {
    "grpo": "loss\n  ratio = exp(logp - logp_old)\n  minimize -mean(mean_tokens(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)))",
    "bnpo": "loss\n  ratio = exp(logp - logp_old)\n  minimize -token_mean_all(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))",
    "dapo": "loss\n  ratio = exp(logp - logp_old)\n  minimize -token_mean_all(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))",
    "dr_grpo": "params\n  T_max = 6\nloss\n  ratio = exp(logp - logp_old)\n"
               "  minimize -mean(sum_tokens(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))) / T_max",
    "luspo": "loss\n  ratio = exp(mean_tokens(logp - logp_old))\n"
             "  minimize -mean(length * min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))",
    "cispo": "params\n  eps_high = 4.0\nloss\n"
             "  minimize -token_mean_all(stopgrad(min(exp(logp - logp_old), eps_high)) * A * logp)",
    "sapo": "loss\n  ratio = exp(logp - logp_old)\n  t = where(A > 0, 1.0, 1.05)\n"
            "  minimize -mean(mean_tokens(sigmoid(t * (ratio - 1)) * 4 / t * A))",
    "vespo": "loss\n  is_log = clip(log(min(exp(logp_old - logp_sampler), c)), log(1e-8), 20)\n"
             "  log_w = clip(sum_tokens(clip(logp - logp_old, -20, 20)) + sum_tokens(is_log), log(1e-8), 20)\n"
             "  k = where(A >= 0, 2.0, 3.0)\n  lam = where(A >= 0, 3.0, 2.0)\n"
             "  phi = stopgrad(exp(lam + k * log_w - lam * exp(log_w)))\n"
             "  minimize -token_mean_all(phi * A * logp * min(exp(logp_old - logp_sampler), c))",
}
# vespo: TRL multiplies by the IS ratio inside phi only (its loss skips the final IS product)
GRPO_TRL = {"luspo": dict(importance_sampling_level="sequence"), "cispo": dict(epsilon_high=4.0),
            "dr_grpo": dict(max_completion_length=6)}


@pytest.mark.parametrize("name", list(GRPO))
def test_grpo_loss_types_as_specs(tmp_path, name):
    spec = tmp_path / "cookbook_grpo.align"
    body = GRPO[name]
    if name == "vespo":
        body = body.replace(" * min(exp(logp_old - logp_sampler), c))", ")")
    # two mini-batches per rollout: logp_old is the rollout's (TRL's old_per_token_logps), not stopgrad(logp)
    spec.write_text(GROUP_HEAD + body + "\ntrain\n  minibatches = 2\n")
    algo = alignspec.compile(spec)
    g = torch.Generator().manual_seed(len(name))
    G, n, T = 3, 4, 6
    lengths = torch.randint(1, T + 1, (G * n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(DT)
    b = {"mask": mask, "logp": -(2 * torch.rand(G * n, T, generator=g, dtype=DT) + 0.05) * mask,
         "reward": torch.randn(G * n, generator=g, dtype=DT), "logp_ref": torch.zeros(G * n, T, dtype=DT)}
    b["logp_old"] = b["logp"] + 0.3 * torch.randn(G * n, T, generator=g, dtype=DT) * mask
    b["logp_sampler"] = b["logp_old"] + 1.5 * (torch.rand(G * n, T, generator=g, dtype=DT) - 0.5) * mask
    b["length"] = mask.sum(1)
    rg = b["reward"].view(G, n)
    adv = ((rg - rg.mean(1, keepdim=True)) / (rg.std(1, keepdim=True) + 1e-4)).reshape(-1)
    is_ratio = torch.clamp(torch.exp(b["logp_old"] - b["logp_sampler"]), max=3.0) if name == "vespo" else None
    want, want_g = trl_grpo(b, adv, name, is_ratio=is_ratio, **GRPO_TRL.get(name, {}))
    inputs = {k: b[k] for k in algo.inputs}
    leaf = b["logp"].clone().requires_grad_(True)
    inputs["logp"] = leaf
    got = algo.loss(inputs).loss
    (got_g,) = torch.autograd.grad(got, leaf)
    rtol = 1e-6 if name == "sapo" else 1e-9  # TRL's sapo makes its temperatures a float32 tensor (torch.where)
    torch.testing.assert_close(got.detach(), want, rtol=rtol, atol=max(rtol * 1e-3, 1e-10))
    torch.testing.assert_close(got_g, want_g, rtol=rtol, atol=max(rtol * 1e-3, 1e-10))


def test_the_cookbook_in_the_docs_compiles(tmp_path):
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text()
    section = text[text.index("## Cookbook"):]
    blocks = re.findall(r"```\n(algorithm .*?)```", section, flags=re.S)
    assert len(blocks) == 3
    for i, block in enumerate(blocks):
        p = tmp_path / f"c{i}.align"
        p.write_text(block)
        algo = alignspec.compile(p)
        assert algo.terms
