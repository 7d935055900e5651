"""TRL's data formats as records (runtime/data/formats.py), the sources they are read from
(runtime/data/sources.py) and the assistant-only mask of conversations (chat_masks.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data_fixtures import TEMPLATE, cache_hub_dataset, write_jsonl, write_parquet  # noqa: E402

from alignspec.runtime.data.chat_masks import assistant_tokens  # noqa: E402
from alignspec.runtime.data.formats import extract_prompt, to_record  # noqa: E402
from alignspec.runtime.data.prompts import PromptFormat  # noqa: E402
from alignspec.runtime.data.records import load_records  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402
from alignspec.runtime.models.tokenizer import build_char_tokenizer  # noqa: E402

SFT = ["prompt", "response"]
PAIRS = ["prompt", "chosen", "rejected"]


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


# -- rows -> records ----------------------------------------------------------------------------
def test_prompt_completion_is_a_demonstration():
    rec = to_record({"prompt": "1+1=", "completion": "2", "id": 7}, "demonstrations", {}, "f: row 0")
    assert rec["prompt"] == "1+1=" and rec["response"] == "2" and rec["id"] == 7
    assert "messages" not in rec                                    # text + EOS, as before
    # their field names, mapped
    rec = to_record({"q": "1+1=", "a": "2"}, "demonstrations", {"prompt": "q", "completion": "a"}, "f: row 0")
    assert (rec["prompt"], rec["response"]) == ("1+1=", "2")
    # a conversational completion after a conversational prompt: rendered like messages,
    # trained from the completion's first message on
    rec = to_record({"prompt": [_u("hi")], "completion": [_a("ok")]}, "demonstrations", {}, "f: row 0")
    assert rec["messages"] == [_u("hi"), _a("ok")] and rec["train_from"] == 1 and rec["response"] == "ok"


def test_messages_are_a_demonstration_and_a_prompt():
    msgs = [{"role": "system", "content": "s"}, _u("hi"), _a("ok"), _u("go"), _a("no")]
    rec = to_record({"messages": msgs}, "demonstrations", {}, "f: row 0")
    assert rec["messages"] == msgs and rec["train_from"] == 0
    assert rec["prompt"] == msgs[:4] and rec["response"] == "no"    # what a sampler continues
    rec = to_record({"messages": msgs[:2]}, "prompts", {}, "f: row 0")
    assert rec["prompt"] == msgs[:2] and "train_from" not in rec     # prompt-only conversation
    with pytest.raises(RunError, match=r"f: row 3's messages have no assistant message \(roles: user\)"):
        to_record({"messages": [_u("hi")]}, "demonstrations", {}, "f: row 3")
    with pytest.raises(RunError, match=r"f: row 2's messages: message 1 has no text 'content'"):
        to_record({"messages": [_u("hi"), {"role": "assistant"}]}, "demonstrations", {}, "f: row 2")


def test_a_row_with_neither_prompt_nor_messages_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}, {"question": "c"}])
    with pytest.raises(RunError) as e:
        load_records(path, None, SFT)
    msg = str(e.value)
    assert f"{path}: row 1 has no field 'prompt'" in msg and "question" in msg
    assert "prompt + completion (or response), messages, or text" in e.value.hint


def test_text_alone_is_language_modeling():
    rec = to_record({"text": "1+1=2"}, "demonstrations", {}, "f: row 0")
    assert rec["lm_text"] and rec["response"] == "1+1=2" and rec["prompt"] == ""
    with pytest.raises(RunError, match="f: row 1 has an empty text"):
        to_record({"text": " "}, "demonstrations", {}, "f: row 1")
    with pytest.raises(RunError, match="f: row 2 has no field 'prompt'"):
        to_record({"text": "1+1=2"}, "prompts", {}, "f: row 2")       # not a prompt


def test_implicit_prompt_is_extracted_as_trl_does():
    # TRL's extract_prompt: the shared message prefix ...
    chosen = [_u("sky?"), _a("blue")]
    rejected = [_u("sky?"), _a("green")]
    assert extract_prompt(chosen, rejected) == ([_u("sky?")], [_a("blue")], [_a("green")])
    # ... and for text the longest common prefix, a space before the split left to the completions
    assert extract_prompt("the sky is blue", "the sky is green") == ("the sky is", " blue", " green")
    rec = to_record({"chosen": chosen, "rejected": rejected}, "pairs", {}, "f: row 0")
    assert rec["prompt"] == [_u("sky?")] and (rec["chosen"], rec["rejected"]) == ("blue", "green")
    rec = to_record({"chosen": "1+1= 2", "rejected": "1+1= 3"}, "pairs", {}, "f: row 0")
    assert (rec["prompt"], rec["chosen"], rec["rejected"]) == ("1+1=", " 2", " 3")
    with pytest.raises(RunError, match=r"f: row 4 has no prompt field and its chosen and rejected share no"):
        to_record({"chosen": "yes", "rejected": "no"}, "pairs", {}, "f: row 4")
    with pytest.raises(RunError, match=r"f: row 1: chosen and rejected must both be text or both be messages"):
        to_record({"chosen": chosen, "rejected": "sky? green"}, "pairs", {}, "f: row 1")
    with pytest.raises(RunError, match=r"f: row 0: chosen and rejected are equal after their shared prompt"):
        to_record({"chosen": chosen, "rejected": chosen}, "pairs", {}, "f: row 0")


# -- the assistant-only mask ------------------------------------------------------------------------
def test_assistant_mask_of_a_multi_turn_conversation_by_hand():
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    fmt = PromptFormat(tok, "auto")
    msgs = [{"role": "system", "content": "s"}, _u("hi"), _a("ok"), _u("go"), _a("no")]
    ids, mask, k = assistant_tokens(fmt, msgs)
    # "<bos>" "system s\n" (1..9) "user hi\n" (10..17) "assistant " (18..27) "ok\n" (28..30)
    # "user go\n" (31..38) "assistant " (39..48) "no\n" (49..51)
    assert tok.decode(ids) == "<bos>system s\nuser hi\nassistant ok\nuser go\nassistant no\n"
    assert len(ids) == 52
    assert [i for i, m in enumerate(mask) if m] == [28, 29, 30, 49, 50, 51]
    assert k == 28
    # a prompt-completion conversation trains only on the completion's turns
    _, mask2, k2 = assistant_tokens(fmt, msgs, train_from=4)
    assert [i for i, m in enumerate(mask2) if m] == [49, 50, 51] and k2 == 49
    # the same mask without the fast tokenizer's offsets (tokenizing prefixes)
    slow = type("Slow", (), {"is_fast": False, "__call__": lambda self, *a, **kw: tok(*a, **kw),
                             "apply_chat_template": lambda self, *a, **kw: tok.apply_chat_template(*a, **kw),
                             "chat_template": TEMPLATE})()
    fmt_slow = PromptFormat.__new__(PromptFormat)
    fmt_slow.tokenizer, fmt_slow.kwargs, fmt_slow.source, fmt_slow.templated = slow, {}, "x", True
    assert assistant_tokens(fmt_slow, msgs)[1] == mask


def test_assistant_mask_with_chatml_special_tokens_by_hand():
    """A ChatML template (Qwen's layout, default system turn) with <|im_start|> / <|im_end|> as
    special tokens: the assistant's text and its <|im_end|> and newline are trained."""
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nyou help<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ids, mask, k = assistant_tokens(PromptFormat(tok, "auto"), [_u("hi"), _a("ok"), _u("go"), _a("no")])
    # system turn 0..17, "<|im_start|>user\nhi<|im_end|>\n" 18..27, "<|im_start|>assistant\n" 28..38,
    # "ok<|im_end|>\n" 39..42, user turn 43..52, "<|im_start|>assistant\n" 53..63, "no<|im_end|>\n" 64..67
    assert len(ids) == 68 and [i for i, m in enumerate(mask) if m] == [39, 40, 41, 42, 64, 65, 66, 67]
    assert "".join(tok.decode([t]) for t, m in zip(ids, mask) if m) == "ok<|im_end|>\nno<|im_end|>\n"
    assert k == 39


def test_messages_without_a_chat_template_are_a_clear_error():
    fmt = PromptFormat(build_char_tokenizer(), "auto")     # the built-in char tokenizer: no template
    with pytest.raises(RunError, match="a messages conversation needs a chat template, but the tokenizer"):
        assistant_tokens(fmt, [_u("hi"), _a("ok")])


def test_a_template_that_rewrites_earlier_turns_cannot_be_masked():
    tok = build_char_tokenizer()
    # renders the last assistant turn differently from earlier ones (as templates that drop
    # earlier reasoning do): prefixes do not extend
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}{{ m['content'] }}x\n{% else %}"
                         "{{ m['role'] }} {{ m['content'] }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant {% endif %}")
    fmt = PromptFormat(tok, "auto")
    with pytest.raises(RunError, match="renders the turns before assistant message 1 differently"):
        assistant_tokens(fmt, [_u("hi"), _a("ok"), _u("go")])


# -- sources --------------------------------------------------------------------------------------
ROWS = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(6)]


def test_glob_and_hub_folder_and_saved_dataset(tmp_path):
    import datasets
    for i in range(3):
        write_parquet(tmp_path / "hub" / "data" / f"train-0000{i}-of-00003.parquet", ROWS[2 * i:2 * i + 2])
    write_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", ROWS[:1])
    want = [r["prompt"] for r in ROWS]
    got = load_records(str(tmp_path / "hub" / "data" / "train-*.parquet"), None, SFT)
    assert [r["prompt"] for r in got] == want and got[0]["response"] == "1"
    assert [r["prompt"] for r in load_records(tmp_path / "hub", None, SFT)] == want       # split train
    assert [r["prompt"] for r in load_records(tmp_path / "hub", None, SFT, split="test")] == want[:1]
    with pytest.raises(RunError, match=r"has no split 'validation'; its splits: test, train"):
        load_records(tmp_path / "hub", None, SFT, split="validation")
    write_jsonl(tmp_path / "flat" / "train.jsonl", ROWS)
    assert len(load_records(tmp_path / "flat", None, SFT)) == 6
    for i in range(2):
        write_jsonl(tmp_path / "many" / f"part{i}.jsonl", ROWS[3 * i:3 * i + 3])
    assert [r["prompt"] for r in load_records(str(tmp_path / "many" / "*.jsonl"), None, SFT)] == want
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(tmp_path / "dd", None, SFT)) == 6
    assert len(load_records(tmp_path / "dd", None, SFT, split="test")) == 2
    with pytest.raises(RunError, match="no data files match"):
        load_records(str(tmp_path / "nothing" / "*.parquet"), None, SFT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="is a folder with no data files"):
        load_records(tmp_path / "empty", None, SFT)


def test_errors_in_a_glob_name_the_file_and_its_row(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "d" / "b.jsonl", [ROWS[0], {"prompt": "x"}])
    with pytest.raises(RunError, match=r"b\.jsonl: row 1 has no field 'response'"):
        load_records(str(tmp_path / "d" / "*.jsonl"), None, SFT)


def test_hub_dataset_name_with_config_and_split_offline(tmp_path, monkeypatch):
    import datasets
    hf = tmp_path / "hf"
    cache_hub_dataset(hf, "someone/tiny-sft", {"train": ROWS, "test": ROWS[:2]}, config="small")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf / "datasets")
    recs = load_records("someone/tiny-sft", None, SFT, config="small")
    assert [r["prompt"] for r in recs] == [r["prompt"] for r in ROWS]
    assert len(load_records("someone/tiny-sft", None, config="small", split="test", kind="demonstrations")) == 2
    with pytest.raises(RunError, match=r"could not load hub data set someone/not-there, split train "
                                       r"\(HF_HUB_OFFLINE=1 and it is not in the cache\)"):
        load_records("someone/not-there", None, SFT)


def test_a_missing_path_is_still_not_found(tmp_path):
    with pytest.raises(RunError, match="data file not found"):
        load_records(tmp_path / "nope.jsonl", None, SFT)
    with pytest.raises(RunError, match="data file not found"):
        load_records(str(tmp_path / "sub" / "nope"), None, SFT)


# ---------------------------------------------------------------- hostile rows (issue 23)
def test_a_lone_surrogate_is_a_clear_error_naming_file_and_row(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+1=", "completion": "2\\ud800"}\n')
    with pytest.raises(RunError, match=rf"{path}: row 1 \(line 2\): field 'completion' holds a lone surrogate"):
        load_records(str(path), None, SFT)
    path.write_text('{"prompt": [{"role": "user", "content": "a\\udfff"}], "completion": "2"}\n')
    with pytest.raises(RunError, match=rf"{path}: row 0 \(line 1\): field 'prompt' holds a lone surrogate"):
        load_records(str(path), None, SFT)


def test_a_jsonl_row_nested_too_deep_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(RunError, match=rf"{path}: row 1 \(line 2\) is nested too deep"):
        load_records(str(path), None, SFT)


@pytest.mark.parametrize("row, why", [
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "chosen and rejected are equal"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": ""}, "has an empty rejected"),
    ({"prompt": "1+1=", "chosen": " ", "rejected": "3"}, "has an empty chosen"),
    ({"prompt": [_u("1+1=")], "chosen": [_a("2")], "rejected": [_a("2")]}, "chosen and rejected are equal"),
])
def test_pairs_with_an_explicit_prompt_refuse_equal_or_empty_completions(tmp_path, row, why):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, row])
    with pytest.raises(RunError, match=rf"{path}: row 1 {why}" if "equal" not in why else rf"{path}: row 1: {why}"):
        load_records(path, None, ("prompt", "chosen", "rejected"))
