"""Generation options (issue 11): top_k, min_p, repetition_penalty, stop strings through the plan
and both samplers (the lean one and model.generate), chat_template files and kwargs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.models.loaders import load_policy  # noqa: E402
from alignspec.runtime.models.tiny import build_tiny_model  # noqa: E402
from alignspec.runtime.rollout.generation import generate_groups, stop_at  # noqa: E402
from alignspec.runtime.rollout.sampling import process_logits  # noqa: E402

PROMPTS = ["1+2=?", "(12*3)-4=?", "7*8=?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gen") / "llama", "llama", seed=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ALIGNSPEC_CACHE", str(tmp_path_factory.getbasetemp() / "alignspec-cache"))


def _hf_processors(rp, t, k, p, mp, pad_lengths):
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    procs = [RepetitionPenaltyLogitsProcessor(rp, prompt_ignore_length=pad_lengths), TemperatureLogitsWarper(t)]
    if k:
        procs.append(TopKLogitsWarper(k))
    if p < 1:
        procs.append(TopPLogitsWarper(p))
    if mp:
        procs.append(MinPLogitsWarper(mp))
    return LogitsProcessorList(procs)


@pytest.mark.parametrize("rp,t,k,p,mp", [(1.3, 0.7, 5, 1.0, 0.0), (1.0, 1.0, 0, 0.9, 0.1), (0.8, 1.2, 8, 0.95, 0.05)])
def test_process_logits_matches_transformers_processors(rp, t, k, p, mp):
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: not penalized
    logits = torch.randn(4, 40) * 3
    seen = torch.zeros(4, 40, dtype=torch.bool)
    for r in range(4):
        seen[r, ids[r][mask[r].bool()]] = True
    ours = process_logits(logits, seen, temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=rp)
    theirs = _hf_processors(rp, t, k, p, mp, (mask == 0).sum(1))(ids, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    torch.testing.assert_close(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_greedy_with_repetition_penalty_agrees_on_both_paths(tiny):
    model, tok = load_policy(tiny)
    fast = generate_groups(model, tok, PROMPTS, 2, max_new_tokens=8, temperature=0, repetition_penalty=1.5,
                           sampler_logprobs=True)
    slow = generate_groups(model, tok, PROMPTS, 2, max_new_tokens=8, temperature=0, repetition_penalty=1.5,
                           fast=False, sampler_logprobs=True)
    plain = generate_groups(model, tok, PROMPTS, 2, max_new_tokens=8, temperature=0)
    assert torch.equal(fast.completion_ids, slow.completion_ids) and fast.texts == slow.texts
    assert not torch.equal(fast.completion_ids, plain.completion_ids)  # the penalty does change the output
    torch.testing.assert_close(fast.sampler_logprobs, slow.sampler_logprobs, atol=1e-5, rtol=1e-5)


def test_sampled_logprobs_are_those_of_the_processed_distribution_on_both_paths(tiny):
    """Each drawn token's log-prob equals log_softmax of transformers' processors applied to the
    model's logits on the same prefix (teacher-forced), for the lean sampler and generate."""
    model, tok = load_policy(tiny)
    opts = dict(temperature=0.8, top_k=6, top_p=0.95, min_p=0.05, repetition_penalty=1.2)
    for fast in (True, False):
        r = generate_groups(model, tok, PROMPTS[:2], 3, max_new_tokens=5, generator_seed=1, fast=fast,
                            sampler_logprobs=True, **opts)
        ids = r.input_ids
        with torch.no_grad():
            att = r.attention_mask.clone()
            att[:, r.prompt_ids.shape[1]:] = 1
            pos = (att.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits.float()
        P = r.prompt_ids.shape[1]
        procs = _hf_processors(1.2, 0.8, 6, 0.95, 0.05, (r.prompt_mask == 0).sum(1))
        for t in range(r.completion_ids.shape[1]):
            live = r.completion_mask[:, t].bool()
            sc = procs(ids[:, :P + t], logits[:, P + t - 1].clone())
            want = torch.log_softmax(sc, -1).gather(-1, r.completion_ids[:, t:t + 1]).squeeze(-1)
            torch.testing.assert_close(r.sampler_logprobs[live, t], want[live], atol=2e-4, rtol=2e-4)


def test_stop_strings_end_completions_alike_on_both_paths(tiny):
    model, tok = load_policy(tiny)
    free = generate_groups(model, tok, PROMPTS, 2, max_new_tokens=10, temperature=0)
    stop = free.texts[0][2:4]
    assert len(stop) == 2
    for fast in (True, False):
        r = generate_groups(model, tok, PROMPTS, 2, max_new_tokens=10, temperature=0, stop=[stop], fast=fast)
        assert r.texts[0] == free.texts[0][:4]  # ends with the stop string, which is kept
        for full, cut in zip(free.texts, r.texts):
            assert cut == (full[:full.find(stop) + len(stop)] if stop in full else full)
    ids = torch.tensor([tok("abcabc", add_special_tokens=False)["input_ids"]])
    m = stop_at(ids, torch.ones_like(ids), tok, ["ca"])
    assert tok.decode(ids[0][m[0].bool()].tolist()) == "abca"


def test_stop_strings_end_sampling_early(tiny):
    """Sampling stops drawing a row's tokens once its text holds a stop string: when every row
    stops early the returned width is short of max_new_tokens, on both paths, and the texts
    are those of a run without early stopping cut by stop_at."""
    model, tok = load_policy(tiny)
    free = generate_groups(model, tok, PROMPTS, 2, max_new_tokens=40, temperature=0)
    stops = sorted({t[:2] for t in free.texts if len(t) >= 2})
    assert stops and all(len(t) >= 2 for t in free.texts)
    for fast in (True, False):
        r = generate_groups(model, tok, PROMPTS, 2, max_new_tokens=40, temperature=0, stop=stops, fast=fast)
        assert r.completion_ids.shape[1] < 40
        want = stop_at(free.completion_ids, free.completion_mask, tok, stops)
        assert r.texts == [tok.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                           for row, m in zip(free.completion_ids, want)]


def test_spec_options_reach_the_sampler(tiny, tmp_path, monkeypatch):
    from alignspec.runtime.rollout import generation
    seen = {}
    real = generation.generate_groups

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    monkeypatch.setattr(generation, "generate_groups", spy)
    spec = (tmp_path / "g.align")
    import alignspec
    src = alignspec.compile("grpo").spec.source
    import re
    src2 = re.sub(r"generate\(prompt, ", "generate(prompt, top_k = 7, min_p = 0.05, repetition_penalty = 1.1, ",
                  src, count=1)
    assert src2 != src
    spec.write_text(src2)
    eng = build_engine(str(spec), out=str(tmp_path / "o"), steps=1,
                       sets=["batch_size=2", "eval_every=0", "stop=[\"9\"]"])
    eng.train()
    assert (seen["top_k"], seen["min_p"], seen["repetition_penalty"], seen["stop"]) == (7, 0.05, 1.1, ("9",))


def test_a_chat_template_file_and_its_kwargs(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}{% if enable_thinking %}think {% endif %}assistant {% endif %}")
    path = tmp_path / "t.jinja"
    path.write_text(template)
    import json
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+2=", "answer": str(a + 2)}) + "\n" for a in range(4)))
    model = build_tiny_model(tmp_path / "m", "llama", seed=1)
    eng = build_engine("grpo", model=str(model), data=str(data), out=str(tmp_path / "o"), steps=1,
                       sets=["batch_size=2", "eval_every=0", "max_new_tokens=2", "rewards=[exact_answer]",
                             f"chat_template={path}", "chat_template_kwargs={enable_thinking: true}"])
    assert eng.state.prompt_format.text("1+2=").endswith("user 1+2=\nthink assistant ")
    eng.train()
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "o" / "model").chat_template == template  # saved with it


def test_a_missing_template_file_is_a_clear_error(tmp_path, capsys):
    rc = run_from_cli("grpo", out=str(tmp_path / "o"), steps=1, sets=["chat_template=nothing/here.jinja"])
    err = capsys.readouterr().err
    assert rc == 2 and "chat_template" in err and "Jinja chat template file" in err
