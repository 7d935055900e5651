"""Tests of alignspec.runtime: tokenizer, tiny models, loading, chunked log-probs,
generation and data loading. Everything is local (HF_HUB_OFFLINE)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignspec.runtime.data.records import load_records
from alignspec.runtime.errors import RunError
from alignspec.runtime.rollout.generation import Rollout, completion_mask_from_ids, generate_groups
from alignspec.runtime.models.logprobs import completion_logprobs, linear_logprobs
from alignspec.runtime.models.loaders import add_value_head, load_frozen_copy, load_policy
from alignspec.runtime.models.tiny import build_tiny_model
from alignspec.runtime.models.tokenizer import ALPHABET, build_char_tokenizer
from helpers import bias_towards_eos

ARCHS = ["llama", "gpt2"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {a: build_tiny_model(tmp_path_factory.mktemp(a), arch=a, seed=0) for a in ARCHS}


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip(tmp_path):
    tok = build_char_tokenizer()
    assert tok.padding_side == "left"
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    text = "(12+3)*4 = ?\nanswer x"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.padding_side == "left"
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id
    assert tok2(text)["input_ids"] == ids
    assert tok2.decode(ids, skip_special_tokens=True) == text
    batch = tok2(["1+1=?", "10*10=?"], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2 and batch["attention_mask"][0][:2] == [0, 0]
    assert all(tok.convert_tokens_to_ids(c) != tok.unk_token_id for c in ALPHABET)
    assert tok("A")["input_ids"][1] == tok.unk_token_id


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_saves_and_loads(tiny_dirs, arch):
    d = tiny_dirs[arch]
    assert os.path.isfile(os.path.join(d, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(d)
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 300_000
    tok = build_char_tokenizer()
    assert model.config.vocab_size == len(tok)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    policy, tok2 = load_policy(d, dtype="float64")
    assert policy.dtype == torch.float64 and tok2.padding_side == "left"
    ref = load_frozen_copy(d)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    # same seed, same weights
    again = build_tiny_model(os.path.join(d, "again"), arch=arch, seed=0)
    m2 = AutoModelForCausalLM.from_pretrained(again)
    for (_, a), (_, b) in zip(model.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b)


def test_load_policy_errors(tmp_path, tiny_dirs):
    with pytest.raises(RunError, match="not found") as e:
        load_policy(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(RunError, match="config.json is missing"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RunError, match="no model weights") as e:
        load_policy(tmp_path)
    assert e.value.hint


def test_pad_token_falls_back_to_eos(tmp_path, tiny_dirs):
    d = build_tiny_model(tmp_path / "m", "llama")
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok = load_policy(d)
    assert tok.pad_token is not None and tok.padding_side == "left"


# ---------------------------------------------------------------- log-probs

def _batch(vocab, dtype, seed=0):
    """Left-padded prompts (P=5) + right-padded completions (T=7) with uneven masks."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = 4, 5, 7
    ids = torch.randint(4, vocab, (B, P + T), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_mask[1, :1] = 0
    comp_mask = torch.ones(B, T, dtype=torch.long)
    comp_mask[0, 4:] = 0
    comp_mask[2, 1:] = 0
    comp_mask[3, 6:] = 0
    ids[:, :P][prompt_mask == 0] = 0
    ids[:, P:][comp_mask == 0] = 0
    attn = torch.cat([prompt_mask, comp_mask], 1)
    w = torch.randn(B, T, generator=g, dtype=dtype)
    we = torch.randn(B, T, generator=g, dtype=dtype)
    return ids, attn, comp_mask, w, we


def _naive(model, ids, attn, comp_mask, temperature=1.0):
    """Reference: full logits (divided by the sampling temperature, as TRL does), log_softmax, gather."""
    T = comp_mask.shape[1]
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -T - 1:-1]
    logits = logits / temperature
    logq = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    logp = logq.gather(-1, ids[:, -T:, None]).squeeze(-1) * comp_mask
    ent = -(logq.exp() * logq).sum(-1) * comp_mask
    return logp, ent


def _value_and_grads(model, fn, w, we):
    model.zero_grad(set_to_none=True)
    logp, ent = fn()
    ((logp * w).sum() + (ent * we).sum()).backward()
    return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
def test_chunked_logprobs_match_naive(tiny_dirs, arch, dtype, tol):
    model, _ = load_policy(tiny_dirs[arch], dtype=dtype)
    ids, attn, cm, w, we = _batch(model.config.vocab_size, dtype)

    def chunked():
        r = completion_logprobs(model, ids, attn, cm, chunk_size=3, with_entropy=True)
        return r["logp"], r["entropy"]

    lp_n, ent_n, g_n = _value_and_grads(model, lambda: _naive(model, ids, attn, cm), w, we)
    lp_c, ent_c, g_c = _value_and_grads(model, chunked, w, we)
    assert lp_c.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lp_c, lp_n, atol=tol, rtol=0)
    torch.testing.assert_close(ent_c, ent_n, atol=tol, rtol=0)
    assert (lp_c[cm == 0] == 0).all() and (lp_c[cm == 1] < 0).all()
    if arch == "gpt2":  # tied output layer: the shared weight gets both gradients
        assert model.lm_head.weight is model.transformer.wte.weight
    for name in g_n:
        torch.testing.assert_close(g_c[name], g_n[name], atol=tol, rtol=0, msg=name)


def test_logprobs_ignore_left_padding(tiny_dirs):
    """A row's log-probs do not depend on how much left padding the batch gave it."""
    model, tok = load_policy(tiny_dirs["llama"])
    prompts, completion = ["1+2=?", "(12*34)-5=?"], "15 x"
    enc = tok(prompts, padding=True, return_tensors="pt")
    comp = torch.tensor([tok(completion, add_special_tokens=False)["input_ids"]] * 2)
    ids = torch.cat([enc["input_ids"], comp], 1)
    attn = torch.cat([enc["attention_mask"], torch.ones_like(comp)], 1)
    batched = completion_logprobs(model, ids, attn, torch.ones_like(comp))["logp"]
    single = tok(prompts[0], return_tensors="pt")["input_ids"]
    alone = completion_logprobs(model, torch.cat([single, comp[:1]], 1),
                                torch.ones(1, single.shape[1] + comp.shape[1], dtype=torch.long),
                                torch.ones_like(comp[:1]))["logp"]
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)


def _max_saved_numel(fn, skip=()):
    """Run fn under saved_tensors_hooks; largest numel saved for backward (skipping params)."""
    sizes = []
    skip_ids = {id(t) for t in skip}

    def pack(t):
        if id(t) not in skip_ids:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return max(sizes), out


def test_chunked_path_saves_no_rows_by_vocab_tensor():
    torch.manual_seed(0)
    N, H, V = 300, 16, 257
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    t = torch.randint(0, V, (N,))
    big, (lp, ent) = _max_saved_numel(
        lambda: linear_logprobs(h, W, None, t, chunk_size=64, with_entropy=True), skip=[W])
    assert big < N * V and big <= N * H
    (lp.sum() + ent.sum()).backward()
    naive_big, _ = _max_saved_numel(
        lambda: (h @ W.T).log_softmax(-1).gather(-1, t[:, None]), skip=[W])
    assert naive_big >= N * V  # the check would catch a materialized [N, V] tensor


def test_completion_logprobs_saves_no_vocab_sized_tensor(tmp_path):
    vocab = 4099  # much larger than any activation of this tiny model
    d = build_tiny_model(tmp_path / "wide", "llama", vocab_size=vocab, hidden=16, layers=1,
                         heads=2, intermediate=32)
    model, _ = load_policy(d)
    ids, attn, cm, _, _ = _batch(model.config.vocab_size, torch.float32)
    big, r = _max_saved_numel(
        lambda: completion_logprobs(model, ids, attn, cm, chunk_size=4),
        skip=list(model.parameters()))
    assert big < int(cm.sum()) * vocab
    r["logp"].sum().backward()
    naive_big, _ = _max_saved_numel(lambda: _naive(model, ids, attn, cm)[0],
                                    skip=list(model.parameters()))
    assert naive_big >= int(cm.sum()) * vocab


def test_value_head_uses_returned_hidden(tiny_dirs):
    model, tok = load_policy(tiny_dirs["gpt2"])
    wrapped = add_value_head(model)
    assert wrapped.value_head.in_features == model.config.hidden_size
    ids, attn, cm, _, _ = _batch(model.config.vocab_size, torch.float32)
    r = completion_logprobs(wrapped, ids, attn, cm, return_hidden=True)
    assert r["hidden"].shape == (*cm.shape, model.config.hidden_size)
    values = wrapped.values_from_hidden(r["hidden"])
    assert values.shape == cm.shape and values.dtype == torch.float32
    (values * cm).sum().backward()
    assert wrapped.value_head.weight.grad is not None
    full = wrapped(ids, attn, position_ids=(attn.cumsum(-1) - 1).clamp_min(0))
    assert full.shape == ids.shape


# ---------------------------------------------------------------- generation

def test_completion_mask_from_ids():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 2, 2, 2, 2], [7, 8, 9, 2, 2]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    assert torch.equal(completion_mask_from_ids(ids, eos), want)
    assert torch.equal(completion_mask_from_ids(ids, [9, 2])[3], torch.tensor([1, 1, 1, 0, 0]))


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_groups_shapes_and_seeds(tiny_dirs, arch):
    model, tok = load_policy(tiny_dirs[arch])
    model.train()
    prompts = ["1+2=?", "(12*3)-4=?"]
    r = generate_groups(model, tok, prompts, 3, max_new_tokens=6, generator_seed=1)
    assert isinstance(r, Rollout) and model.training
    B = 6
    assert r.prompt_ids.shape[0] == B and r.prompt_mask.shape == r.prompt_ids.shape
    assert r.completion_ids.shape == r.completion_mask.shape and r.completion_ids.shape[0] == B
    assert r.completion_ids.shape[1] <= 6 and len(r.texts) == B
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(B):  # each prompt repeated n times, left padded
        assert torch.equal(r.prompt_ids[i], r.prompt_ids[(i // 3) * 3])
    assert (r.prompt_mask[:, -1] == 1).all() and r.prompt_mask[0, 0] == 0
    assert r.input_ids.shape == (B, r.prompt_ids.shape[1] + r.completion_ids.shape[1])
    assert torch.equal(r.attention_mask, torch.cat([r.prompt_mask, r.completion_mask], 1))
    again = generate_groups(model, tok, prompts, 3, max_new_tokens=6, generator_seed=1)
    assert torch.equal(again.completion_ids, r.completion_ids)
    greedy = generate_groups(model, tok, prompts, 2, max_new_tokens=6, temperature=0)
    assert torch.equal(greedy.completion_ids[0], greedy.completion_ids[1])
    assert torch.equal(greedy.completion_ids[2], greedy.completion_ids[3])
    # the rollout feeds the log-prob path directly
    lp = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask)["logp"]
    assert lp.shape == r.completion_mask.shape


def test_generate_groups_masks_after_eos(tiny_dirs):
    """An output bias makes EOS likely, so rows end at different positions."""
    model, tok = load_policy(tiny_dirs["llama"])
    bias_towards_eos(model, tok.eos_token_id, 2.5)
    r = generate_groups(model, tok, ["1+2=?", "7*8=?"], 8, max_new_tokens=10, generator_seed=0)
    eos = tok.eos_token_id
    assert torch.equal(r.completion_mask, completion_mask_from_ids(r.completion_ids, eos))
    n_eos_rows = 0
    for ids, m, text in zip(r.completion_ids, r.completion_mask, r.texts):
        hits = (ids == eos).nonzero().flatten()
        if len(hits):
            n_eos_rows += 1
            first = hits[0].item()
            assert m[: first + 1].all() and not m[first + 1:].any()
            assert (ids[first + 1:] == tok.pad_token_id).all()
        else:
            assert m.all()
        assert text == tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
        assert "<eos>" not in text
    assert n_eos_rows >= 4 and len(set(r.completion_mask.sum(1).tolist())) > 1
    # completion-side attention mask is 0 after EOS
    assert (r.attention_mask[:, r.prompt_ids.shape[1]:] == r.completion_mask).all()


# ---------------------------------------------------------------- data

ROWS = [{"question": "1+2=?", "answer": "3"}, {"question": "2*3=?", "answer": "6"}]


def _write_all(tmp_path, rows):
    import datasets

    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    paths["parquet"] = tmp_path / "d.parquet"
    ds.to_parquet(str(paths["parquet"]))
    paths["csv"] = tmp_path / "d.csv"
    ds.to_csv(str(paths["csv"]), index=False)
    paths["dir"] = tmp_path / "saved"
    ds.save_to_disk(str(paths["dir"]))
    return paths


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "dir"])
def test_load_records_formats(tmp_path, fmt):
    path = _write_all(tmp_path, ROWS)[fmt]
    recs = load_records(path, {"prompt": "question"}, ["prompt", "answer"])
    assert [r["prompt"] for r in recs] == ["1+2=?", "2*3=?"]
    assert [str(r["answer"]) for r in recs] == ["3", "6"]


def test_load_records_dataset_dict_dir(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(tmp_path / "dd", {"prompt": "question"}, ["prompt"])) == 2


def test_load_records_errors(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(RunError, match="not found") as e:
        load_records(missing, None, ["prompt"])
    assert str(missing) in str(e.value)

    odd = tmp_path / "d.txt"
    odd.write_text("hello")
    with pytest.raises(RunError, match="unknown data format") as e:
        load_records(odd, None, ["prompt"])
    assert str(odd) in str(e.value)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{not json\n')
    with pytest.raises(RunError, match="could not read") as e:
        load_records(broken, None, ["prompt"])
    assert str(broken) in str(e.value) and "row 1 (line 2)" in str(e.value)

    rotten = tmp_path / "rotten.parquet"
    rotten.write_text("not parquet")
    with pytest.raises(RunError, match="could not read") as e:
        load_records(rotten, None, ["prompt"])
    assert str(rotten) in str(e.value)

    rows = [{"prompt": "1+1=?", "answer": "2"}, {"prompt": "2+2=?", "answer": "4"},
            {"prompt": "3+3=?"}]
    path = tmp_path / "noanswer.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RunError) as e:
        load_records(path, None, ["prompt", "answer"])
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and "'answer'" in msg and "prompt" in msg

    path = _write_all(tmp_path, ROWS)["jsonl"]
    with pytest.raises(RunError) as e:
        load_records(path, None, ["prompt"])  # their field is called "question"
    msg = str(e.value)
    assert str(path) in msg and "row 0" in msg and "answer, question" in msg

    empty = tmp_path / "empty_prompt.jsonl"
    empty.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(RunError, match="row 1 has an empty prompt") as e:
        load_records(empty, None, ["prompt"])
    assert str(empty) in str(e.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside peft/transformers
@pytest.mark.parametrize("path", ["linear", "module", "full_logits"])
def test_logprobs_at_a_sampling_temperature(tiny_dirs, path):
    """temperature t gives log_softmax(logits / t), value and gradient, on every path."""
    from alignspec.runtime.models.logprobs import full_logits_logprobs
    model, _ = load_policy(tiny_dirs["llama"], dtype=torch.float64)
    if path == "module":  # a LoRA-wrapped output layer takes the per-module path
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"],
                                                           init_lora_weights=False))
    ids, attn, cm, w, we = _batch(model.config.vocab_size, torch.float64, seed=4)

    def ours():
        if path == "full_logits":
            r = full_logits_logprobs(model, ids, attn, cm, with_entropy=True, temperature=0.7)
        else:
            r = completion_logprobs(model, ids, attn, cm, chunk_size=3, with_entropy=True, temperature=0.7)
        return r["logp"], r["entropy"]

    lp_n, ent_n, g_n = _value_and_grads(model, lambda: _naive(model, ids, attn, cm, 0.7), w, we)
    lp_c, ent_c, g_c = _value_and_grads(model, ours, w, we)
    torch.testing.assert_close(lp_c, lp_n, atol=1e-9, rtol=0)
    torch.testing.assert_close(ent_c, ent_n, atol=1e-9, rtol=0)
    for name in g_n:
        torch.testing.assert_close(g_c[name], g_n[name], atol=1e-9, rtol=0, msg=name)
    lp_1 = completion_logprobs(model, ids, attn, cm)["logp"].detach()
    assert not torch.allclose(lp_1, lp_c)  # the temperature changes the numbers


def test_lora_wrapped_head_uses_fallback_path(tiny_dirs):
    """A PEFT model whose lm_head is LoRA-wrapped (not a plain Linear) still matches naive."""
    peft = pytest.importorskip("peft")
    model, _ = load_policy(tiny_dirs["llama"], dtype=torch.float64)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    ids, attn, cm, w, we = _batch(model.config.vocab_size, torch.float64)

    def chunked():
        r = completion_logprobs(pm, ids, attn, cm, chunk_size=3, with_entropy=True)
        return r["logp"], r["entropy"]

    lp_n, ent_n, g_n = _value_and_grads(pm, lambda: _naive(pm, ids, attn, cm), w, we)
    lp_c, ent_c, g_c = _value_and_grads(pm, chunked, w, we)
    torch.testing.assert_close(lp_c, lp_n, atol=1e-9, rtol=0)
    torch.testing.assert_close(ent_c, ent_n, atol=1e-9, rtol=0)
    assert any("lora" in n for n in g_c)
    for name in g_n:
        torch.testing.assert_close(g_c[name], g_n[name], atol=1e-9, rtol=0, msg=name)


def test_bfloat16_logprobs_close_to_float32(tiny_dirs):
    model, _ = load_policy(tiny_dirs["llama"], dtype="bfloat16")
    ids, attn, cm, _, _ = _batch(model.config.vocab_size, torch.float32)
    r = completion_logprobs(model, ids, attn, cm, chunk_size=5)
    assert r["logp"].dtype == torch.float32
    r["logp"].sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16
    ref, _ = _naive(model, ids, attn, cm)
    torch.testing.assert_close(r["logp"].detach(), ref.detach(), atol=2e-2, rtol=0)
