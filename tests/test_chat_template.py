"""Prompts through the tokenizer's chat template (runtime/prompts.py, ``chat_template``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.scoring import rewards  # noqa: E402
from alignspec.runtime.data.records import load_records  # noqa: E402
from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402
from alignspec.runtime.data.prompts import PromptFormat  # noqa: E402
from alignspec.runtime.models.tiny import build_tiny_model  # noqa: E402
from alignspec.runtime.models.tokenizer import build_char_tokenizer  # noqa: E402

# only characters of the char tokenizer's alphabet (and its <bos>), so no <unk> hides a mistake
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}")
QUIET = ["eval_every=0", "batch_size=2", "lr=1e-3"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ALIGNSPEC_CACHE", str(tmp_path_factory.getbasetemp() / "alignspec-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(directory with a chat template, directory without one): the same tiny Llama."""
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("chat-models")
    plain = build_tiny_model(root / "plain", "llama", seed=3)
    chat = build_tiny_model(root / "chat", "llama", seed=3)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(chat)
    return chat, plain


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pairs(tmp_path, conversational=False, n=4):
    rows = []
    for a in range(n):
        prompt = f"{a}+1="
        if conversational:
            rows.append({"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": str(a + 1)}],
                         "rejected": [{"role": "assistant", "content": str(a)}]})
        else:
            rows.append({"prompt": prompt, "chosen": str(a + 1), "rejected": str(a)})
    return _write(tmp_path / ("conv.jsonl" if conversational else "pairs.jsonl"), rows)


def _template_ids(tok, messages):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_prompt_format_modes():
    tok = build_char_tokenizer()
    assert not PromptFormat(tok, "auto").templated          # the built-in tokenizer has none
    assert PromptFormat(tok, "auto").ids("1+2=") == list(tok("1+2=")["input_ids"])
    with pytest.raises(RunError, match=r"chat_template: on, but the tokenizer in /some/dir has no chat template"):
        PromptFormat(tok, "on", source="/some/dir")
    with pytest.raises(RunError, match="list of messages"):
        PromptFormat(tok, "auto").ids([{"role": "user", "content": "1+2="}])
    tok.chat_template = TEMPLATE
    fmt = PromptFormat(tok, "auto")
    assert fmt.templated and fmt.text("1+2=") == "<bos>user 1+2=\nassistant "
    ids = fmt.ids("1+2=")
    assert ids == _template_ids(tok, [{"role": "user", "content": "1+2="}])
    assert ids.count(tok.bos_token_id) == 1 and tok.unk_token_id not in ids   # BOS from the template only
    assert PromptFormat(tok, "off").ids("1+2=") == list(tok("1+2=")["input_ids"])
    enc = fmt.encode(["1+2=", [{"role": "user", "content": "10+20="}]])     # left-padded batch
    assert enc["input_ids"][0, -len(ids):].tolist() == ids and enc["attention_mask"][0, 0] == 0


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_engine_trains_on_templated_prompt_ids(models, tmp_path, mode):
    chat, _ = models
    eng = build_engine("dpo", model=chat, data=_pairs(tmp_path), out=str(tmp_path / "o"), steps=1,
                       sets=QUIET + [f"chat_template={mode}"])
    tok = eng.state.tokenizer
    rec = eng.state.records[0]
    want = (_template_ids(tok, [{"role": "user", "content": rec["prompt"]}]) if mode == "auto"
            else list(tok(rec["prompt"])["input_ids"]))
    chosen, rejected = eng.sample([rec], 0)[0]
    assert chosen["p"] == want and rejected["p"] == want
    assert chosen["c"] == list(tok(rec["chosen"], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    assert eng.train()["steps"] == 1


def test_sampled_prompts_are_templated_and_rewards_get_the_data_prompt(models, tmp_path, monkeypatch):
    chat, _ = models
    seen = []

    def spy(prompts, completions, **kwargs):
        seen.extend(prompts)
        return [0.0] * len(completions)
    monkeypatch.setitem(rewards.REGISTRY, "spy", spy)
    data = _write(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+2="} for a in range(4)])
    eng = build_engine("grpo", model=chat, data=data, out=str(tmp_path / "g"), steps=1,
                       sets=QUIET + ["rewards=[spy]", "max_new_tokens=3"])
    rec = eng.state.records[0]
    eng._start_iteration(0, replace=False)
    groups = eng.sample([rec], 0)
    want = _template_ids(eng.state.tokenizer, [{"role": "user", "content": rec["prompt"]}])
    assert groups[0] and all(row["p"] == want for row in groups[0])
    eng.train()
    assert seen and set(seen) <= {r["prompt"] for r in eng.state.records}        # as written, not templated


def test_chat_template_on_without_one_is_a_clear_error(models, tmp_path, capsys):
    _, plain = models
    rc = run_from_cli("dpo", model=plain, data=_pairs(tmp_path), out=str(tmp_path / "o"), steps=1,
                      sets=QUIET + ["chat_template=on"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"chat_template: on, but the tokenizer in {plain} has no chat template" in err


def test_conversational_pairs_train_with_dpo(models, tmp_path):
    chat, _ = models
    data = _pairs(tmp_path, conversational=True)
    out = tmp_path / "dpo"
    assert run_from_cli("dpo", model=chat, data=data, out=str(out), steps=1, sets=QUIET) == 0
    assert (out / "model" / "config.json").is_file()
    eng = build_engine("dpo", model=chat, data=data, out=str(tmp_path / "o2"), steps=1, sets=QUIET)
    rec = eng.state.records[0]
    assert rec["chosen"] == "1" and rec["rejected"] == "0"                 # one assistant message -> text
    chosen, _ = eng.sample([rec], 0)[0]
    assert chosen["p"] == _template_ids(eng.state.tokenizer, rec["prompt"])
    assert "system add\nuser 0+1=\nassistant " in eng.state.tokenizer.decode(chosen["p"])


def test_conversational_prompts_need_a_template(models, tmp_path, capsys):
    chat, plain = models
    data = _pairs(tmp_path, conversational=True)
    for model, sets in ((plain, []), (chat, ["chat_template=off"])):
        rc = run_from_cli("dpo", model=model, data=data, out=str(tmp_path / "o"), steps=1, sets=QUIET + sets)
        assert rc == 2
        err = capsys.readouterr().err
        assert f"{data}: row 0's prompt is a list of messages" in err
        assert ("chat_template is off" if sets else f"the tokenizer in {plain} has no chat template") in err


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user"}], r"row 1's prompt: message 0 has no text 'content'"),
    (["hi"], r"row 1's prompt: message 0 is a str, not a mapping"),
])
def test_malformed_messages_name_file_and_row(tmp_path, prompt, message):
    good = {"prompt": [{"role": "user", "content": "1+1="}], "chosen": "2", "rejected": "3"}
    path = tmp_path / "bad.json"   # a JSON list: rows of different shapes in one file
    path.write_text(json.dumps([good, {**good, "prompt": prompt}]))
    with pytest.raises(RunError, match=message) as e:
        load_records(path, required=["prompt", "chosen", "rejected"])
    assert str(path) in str(e.value)


def test_conversational_completion_must_be_one_assistant_message(tmp_path):
    rows = [{"prompt": "1+1=", "chosen": [{"role": "user", "content": "2"}], "rejected": "3"}]
    with pytest.raises(RunError, match=r"row 0's chosen is a list of 1 message\(s\) \(user\)"):
        load_records(_write(tmp_path / "c.jsonl", rows), required=["prompt", "chosen", "rejected"])


def test_reward_model_scores_as_trained(models, tmp_path):
    """A reward model trained on templated conversational prompts is scored downstream with
    the same template (rewards.SequenceScorer reads alignspec_chat_template from its config)."""
    from alignspec.runtime.models.reward_head import score_texts
    chat, _ = models
    data = _pairs(tmp_path, conversational=True)
    out = tmp_path / "rm"
    assert run_from_cli("reward_model", model=chat, data=data, out=str(out), steps=1, sets=QUIET) == 0
    scorer = rewards.SequenceScorer(str(out / "model"))
    assert scorer.model.config.alignspec_chat_template is True
    recs = load_records(data, required=["prompt", "chosen", "rejected"])
    prompts, comps = [r["prompt"] for r in recs], [r["chosen"] for r in recs]
    got = scorer(prompts, comps, recs)
    want = score_texts(scorer.model, scorer.tok, prompts, comps, prompt_format=PromptFormat(scorer.tok, "on"))
    torch.testing.assert_close(got, want)


def test_tree_search_roots_are_templated(models, tmp_path, monkeypatch):
    chat, _ = models
    seen = []

    def spy(prompts, completions, **kwargs):
        seen.extend(prompts)
        return [float(len(c) % 2) for c in completions]
    monkeypatch.setitem(rewards.REGISTRY, "spy", spy)
    data = _write(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+3="} for a in range(4)])
    eng = build_engine("mcts", model=chat, data=data, out=str(tmp_path / "m"), steps=1,
                       sets=QUIET + ["rewards=[spy]", "max_new_tokens=4", "simulations=4", "branching=2",
                                     "depth=2"])
    rec = eng.state.records[0]
    root = _template_ids(eng.state.tokenizer, [{"role": "user", "content": rec["prompt"]}])
    roots = eng.state.tree_sampler.search(eng.state.policy, [rec], simulations=4, branching=2, depth=2, c_puct=1.5)
    assert roots[0].prefix == eng.state.prompt_format.text(rec["prompt"])
    row = eng.state.tree_sampler._row(roots[0].prefix + "1\n", "2", True, rec)
    assert row["p"][:len(root)] == root and row["prompt"] == rec["prompt"] + "1\n"
    assert seen and set(seen) <= {r["prompt"] for r in eng.state.records}


def test_classifier_scores_conversations_with_its_own_template(tmp_path):
    """A third-party sequence classifier: prompt messages + the completion as an assistant
    message, through the classifier's chat template; without one, a clear error."""
    from transformers import AutoModelForSequenceClassification

    from alignspec.runtime.models.tiny import tiny_config
    tok = build_char_tokenizer()
    cfg = tiny_config("llama", num_labels=1)
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    for name, template in (("chat", TEMPLATE), ("plain", None)):
        tok.chat_template = template
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    prompts = [[{"role": "user", "content": "1+1="}], [{"role": "user", "content": "2+2="}]]
    scorer = rewards.SequenceScorer(str(tmp_path / "chat"))
    got = scorer(prompts, ["2", "5"], [{}, {}])
    for i, (p, c) in enumerate(zip(prompts, ["2", "5"])):
        text = scorer.tok.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
        ids = torch.tensor([scorer.tok(text, add_special_tokens=False)["input_ids"]])
        torch.testing.assert_close(got[i], scorer.model(input_ids=ids).logits[0, 0].float())
    with pytest.raises(RunError, match="has no chat template"):
        rewards.SequenceScorer(str(tmp_path / "plain"))(prompts, ["2", "5"], [{}, {}])


def test_a_template_that_renders_without_bound_is_stopped():
    """A model's own template with nested loops: its output is capped (it ran until memory ran out)."""
    import time

    from alignspec.runtime.data import prompts
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for a in range(3000) %}{% for b in range(3000) %}xx{% endfor %}{% endfor %}"
                         "{{ messages[0]['content'] }}")
    fmt = PromptFormat(tok, "auto", source="m")
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"chat template of the tokenizer in m .*output passed 4,194,304 characters"):
        fmt.text("hi")
    assert time.monotonic() - t0 < 20
    tok2 = build_char_tokenizer()
    tok2.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    assert PromptFormat(tok2, "auto").text("hi") == "<hi>" and prompts.MAX_RENDER_CHARS == 4 << 20
