"""The fast paths of the runtime give the same results as the plain ones: prompt sharing,
vocabulary tiles, the lean sampler, the reference log-prob cache, chosen + rejected in one
forward, and the switches that turn each off (bench/vs_trl.py measures what each saves)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from alignspec.runtime.rollout.generation import generate_groups
from alignspec.runtime.models.logprobs import completion_logprobs, full_logits_logprobs, linear_logprobs
from alignspec.runtime.models.loaders import load_policy
from helpers import bias_towards_eos
from alignspec.runtime.rollout.sampling import _top_p_filter, sample_groups, supported
from alignspec.runtime.models.tiny import build_tiny_model

ARCHS = ["llama", "gpt2"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {a: build_tiny_model(tmp_path_factory.mktemp(a), arch=a, seed=0) for a in ARCHS}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ALIGNSPEC_CACHE", str(tmp_path_factory.getbasetemp() / "alignspec-cache"))


def _grouped_batch(vocab, G=3, groups=2, P=6, T=5, seed=0):
    """``groups`` prompts (the first left-padded) x ``G`` completions of uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    B = G * groups
    prompts = torch.randint(4, vocab, (groups, P), generator=g).repeat_interleave(G, 0)
    pm = torch.ones(B, P, dtype=torch.long)
    pm[:G, :2] = 0
    prompts[pm == 0] = 0
    comp = torch.randint(4, vocab, (B, T), generator=g)
    cm = torch.ones(B, T, dtype=torch.long)
    cm[1, 3:] = 0
    cm[4, 1:] = 0
    comp[cm == 0] = 0
    return torch.cat([prompts, comp], 1), torch.cat([pm, cm], 1), cm


def _logp_and_grads(model, fn, B, T):
    model.zero_grad(set_to_none=True)
    out = fn()
    w = torch.linspace(0.5, 1.5, B * T, dtype=out["logp"].dtype).reshape(B, T)
    loss = (out["logp"] * w).sum() + (out["entropy"] * w.flip(0)).sum() if "entropy" in out else (out["logp"] * w).sum()
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_matches_per_row(tiny_dirs, arch):
    model, _ = load_policy(tiny_dirs[arch], dtype=torch.float64)
    ids, att, cm = _grouped_batch(model.config.vocab_size)
    B, T = cm.shape
    kw = dict(chunk_size=4, with_entropy=True, return_hidden=True)
    a, ga = _logp_and_grads(model, lambda: completion_logprobs(model, ids, att, cm, share_prompt=False, **kw), B, T)
    b, gb = _logp_and_grads(model, lambda: completion_logprobs(model, ids, att, cm, share_prompt=True, **kw), B, T)
    for k in ("logp", "entropy", "hidden"):
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10)
    assert ga.keys() == gb.keys()
    _assert_grads_close(ga, gb)


def test_shared_prompt_rows_in_any_order(tiny_dirs):
    """Rows sharing a prompt need not be adjacent (or equally many per prompt)."""
    model, _ = load_policy(tiny_dirs["llama"], dtype=torch.float64)
    ids, att, cm = _grouped_batch(model.config.vocab_size)
    perm = torch.tensor([3, 0, 5, 1, 4])  # drops row 2: groups of 2 and 3, interleaved
    ids, att, cm = ids[perm], att[perm], cm[perm]
    B, T = cm.shape
    a, ga = _logp_and_grads(model, lambda: completion_logprobs(model, ids, att, cm, share_prompt=False), B, T)
    b, gb = _logp_and_grads(model, lambda: completion_logprobs(model, ids, att, cm, share_prompt=True), B, T)
    torch.testing.assert_close(b["logp"], a["logp"], rtol=0, atol=1e-10)
    _assert_grads_close(ga, gb)


def test_full_logits_path_matches_tiled(tiny_dirs):
    model, _ = load_policy(tiny_dirs["llama"], dtype=torch.float64)
    ids, att, cm = _grouped_batch(model.config.vocab_size)
    B, T = cm.shape
    a, ga = _logp_and_grads(model, lambda: completion_logprobs(model, ids, att, cm, with_entropy=True), B, T)
    b, gb = _logp_and_grads(model, lambda: full_logits_logprobs(model, ids, att, cm, with_entropy=True), B, T)
    torch.testing.assert_close(b["logp"], a["logp"], rtol=0, atol=1e-10)
    torch.testing.assert_close(b["entropy"], a["entropy"], rtol=0, atol=1e-10)
    _assert_grads_close(ga, gb)


def _assert_grads_close(ga, gb):
    """transformers computes the rotary tables in float32 even for float64 models, so gradients
    through differently batched prompt passes agree to float32 rounding (1e-7 relative)."""
    assert ga.keys() == gb.keys()
    for n in ga:
        scale = ga[n].abs().max().item()
        assert (gb[n] - ga[n]).abs().max().item() <= 1e-6 * scale, n


@pytest.mark.parametrize("vocab_chunk", [None, 1, 3, 4, 11])  # None: the default tiling
def test_vocabulary_tiles_are_exact(vocab_chunk):
    """Row and vocabulary tiles, a bias and a logit scale: value and gradient (gradcheck)."""
    torch.manual_seed(0)
    N, H, V = 13, 6, 11
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    assert torch.autograd.gradcheck(
        lambda h, W, b: linear_logprobs(h, W, b, t, chunk_size=4, scale=0.7, with_entropy=True,
                                        vocab_chunk=vocab_chunk), (h, W, b))
    assert torch.autograd.gradcheck(
        lambda h, W, b: linear_logprobs(h, W, b, t, chunk_size=5, vocab_chunk=vocab_chunk)[0], (h, W, b))
    lp, ent = linear_logprobs(h, W, b, t, chunk_size=5, scale=0.7, with_entropy=True, vocab_chunk=vocab_chunk)
    logq = ((h @ W.T + b) * 0.7).log_softmax(-1)
    torch.testing.assert_close(lp, logq.gather(-1, t[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(logq.exp() * logq).sum(-1))


# ---------------------------------------------------------------- sampler

def test_top_p_filter_matches_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper
    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        ours = _top_p_filter(logits.softmax(-1), p) > 0
        theirs = torch.isfinite(TopPLogitsWarper(p)(None, logits.clone()))
        assert torch.equal(ours, theirs), p


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_sampler_greedy_equals_generate(tiny_dirs, arch):
    model, tok = load_policy(tiny_dirs[arch])
    assert supported(model)
    prompts = ["1+2=?", "(12*3)-4=?", "7*8=?"]
    fast = generate_groups(model, tok, prompts, 2, max_new_tokens=6, temperature=0)
    slow = generate_groups(model, tok, prompts, 2, max_new_tokens=6, temperature=0, fast=False)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask)
    assert fast.texts == slow.texts


def test_lean_sampler_draws_the_model_distribution(tiny_dirs):
    """The first sampled token's frequencies over 6000 rows match softmax(logits / T)."""
    model, tok = load_policy(tiny_dirs["llama"])
    model.eval()
    enc = tok(["12+3=?"], return_tensors="pt")
    with torch.no_grad():
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=pos).logits[0, -1]
    for temp in (1.0, 0.7):
        g = torch.Generator().manual_seed(3)
        ids = sample_groups(model, enc["input_ids"], enc["attention_mask"], 6000, max_new_tokens=1, eos_ids=[],
                            pad_id=tok.pad_token_id, temperature=temp, generator=g)
        counts = torch.bincount(ids[:, 0], minlength=logits.shape[0]).double()
        expected = (logits.double() / temp).softmax(-1) * ids.shape[0]
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        dof = logits.shape[0] - 1  # chi-square mean dof, sd sqrt(2 dof); 2 dof is far in the tail
        assert chi2 < 2 * dof, (temp, chi2)


def test_lean_sampler_min_new_tokens_and_eos(tiny_dirs):
    """An output bias makes EOS likely; min_new_tokens in the generation config holds it back."""
    model, tok = load_policy(tiny_dirs["llama"])
    bias_towards_eos(model, tok.eos_token_id, 3.0)
    r = generate_groups(model, tok, ["1+2=?"], 8, max_new_tokens=10, generator_seed=0)
    assert (r.completion_mask.sum(1) < 10).any()  # EOS does end rows early
    model.generation_config.min_new_tokens = 10
    r = generate_groups(model, tok, ["1+2=?"], 8, max_new_tokens=10, generator_seed=0)
    assert r.completion_ids.shape[1] == 10 and (r.completion_mask.sum(1) == 10).all()
    assert not (r.completion_ids == tok.eos_token_id).any()


def test_unsupported_generation_config_falls_back(tiny_dirs):
    model, _ = load_policy(tiny_dirs["llama"])
    model.generation_config.repetition_penalty = 1.3
    assert not supported(model)


# ---------------------------------------------------------------- engine switches

def _pairs(tmp_path, n=4):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)}) + "\n"
                         for a in range(n)))
    return str(p)


def _final(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "model" / "model.safetensors"))


def _assert_same_weights(a, b, atol=2e-5):  # float32 rounding through a few Adam steps
    wa, wb = _final(a), _final(b)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= atol, (k, (wa[k] - wb[k]).abs().max().item())


def test_reference_cache_reuses_rows_and_changes_nothing(tiny_dirs, tmp_path):
    from alignspec.runtime.engine import build_engine
    data = _pairs(tmp_path)
    base = ["batch_size=2", "lr=1e-3", "eval_every=0"]
    runs = {}
    for name, extra in (("cached", []), ("plain", ["reference_cache=false"]),
                        ("pre", ["precompute_reference=true"]), ("two", ["pair_forwards=2"])):
        eng = build_engine("dpo", model=tiny_dirs["llama"], data=data, out=str(tmp_path / name), steps=4,
                           sets=base + extra)
        eng.train()
        runs[name] = eng
    # 4 pairs, 2 per step, 4 steps: epoch 2 finds all 8 rows in the cache
    assert runs["cached"].ref_cache.hits == 8 and runs["cached"].ref_cache.misses == 8
    assert runs["plain"].ref_cache.hits == 0 and not runs["plain"].ref_cache.enabled
    assert runs["pre"].ref_cache.hits == 16 and runs["pre"].ref_cache.misses == 0
    for name in ("plain", "pre", "two"):
        _assert_same_weights(tmp_path / "cached", tmp_path / name)


def test_reference_cache_is_off_for_sampled_rollouts(tmp_path):
    from alignspec.runtime.engine import build_engine
    eng = build_engine("grpo", out=str(tmp_path / "g"), steps=1, sets=["batch_size=2", "eval_every=0"])
    assert not eng.state.ref_cache.enabled


def test_forced_slow_paths_change_nothing(tmp_path):
    """force_reference / force_old_forward run extra forwards whose results nothing reads;
    full_logits, no prompt sharing and model.generate give the same training run."""
    from alignspec.runtime.engine import build_engine
    # lr 2e-4, not the preset's 1e-3: Adam's first steps scale a float-noise difference of two
    # summation orders (full_logits, no prompt sharing) up towards lr; at 1e-3 one weight
    # differed by 1.2e-5 after 2 steps on an AVX2-only processor
    base = ["batch_size=2", "eval_every=0", "beta=0", "lr=2e-4"]
    outs = {}
    for name, extra in (("fast", []), ("ref", ["force_reference=true"]), ("old", ["force_old_forward=true"]),
                        ("full", ["logprobs_path=full_logits", "share_prompt=false"])):
        eng = build_engine("grpo", out=str(tmp_path / name), steps=2, sets=base + extra)
        if name == "ref":
            assert eng.state.reference is not None and eng.state.builds["reference"] == 1
        eng.train()
        outs[name] = tmp_path / name
    for name in ("ref", "old", "full"):
        _assert_same_weights(outs["fast"], outs[name], atol=1e-5)
