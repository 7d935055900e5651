"""Short training runs on TRL's data formats: SFT on prompt-completion and on messages (the
loss only on assistant tokens), DPO on implicit-prompt pairs, streamed data with an exact
--resume, max_prompt_length, and a hub data set name."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data_fixtures import cache_hub_dataset, chat_model, write_jsonl, write_parquet  # noqa: E402
from helpers import quiet, read_metrics  # noqa: E402

from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache")
QUIET = ["eval_every=0", "batch_size=2", "lr=1e-2"]


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return chat_model(tmp_path_factory.mktemp("data-models"))


def _model_state(eng):
    return {k: v.detach().clone() for k, v in eng.state.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_on_prompt_completion(chat, tmp_path):
    rows = [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(4)]
    rows.append({"prompt": [_u("2+2=")], "completion": [_a("4")]})    # conversational prompt-completion
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    eng = quiet(build_engine("sft", model=chat, data=data, out=str(tmp_path / "o"), steps=2, sets=QUIET))
    tok = eng.state.tokenizer
    (row,), = eng.sample([eng.state.records[0]], 0)
    assert tok.decode(row["p"]) == "<bos>user 0+1=\nassistant " and row["c"] == tok("1", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id] and "m" not in row          # the completion, with EOS, is trained
    (conv,), = eng.sample([eng.state.records[4]], 0)
    assert tok.decode(conv["p"]) == "<bos>user 2+2=\nassistant " and tok.decode(conv["c"]) == "4\n"
    assert conv["m"] == [1, 1]                                           # the completion's turn, end of turn included
    assert eng.train()["steps"] == 2
    assert all(m["loss"] == m["loss"] for m in read_metrics(tmp_path / "o") if "loss" in m)


def test_sft_on_text_trains_every_token(chat, tmp_path):
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": f"{a}+1={a + 1}"} for a in range(4)])
    eng = quiet(build_engine("sft", model=chat, data=data, out=str(tmp_path / "o"), steps=2, sets=QUIET))
    tok = eng.state.tokenizer
    (row,), = eng.sample([eng.state.records[0]], 0)
    assert row["p"] == [tok.bos_token_id] and tok.decode(row["c"]) == "0+1=1<eos>" and "m" not in row
    assert eng.train()["steps"] == 2


def _conversations(n=4):
    return [{"messages": [{"role": "system", "content": "add"}, _u(f"{a}+1="), _a(str(a + 1)),
                          _u("and two more"), _a(str(a + 3))]} for a in range(n)]


def test_sft_on_messages_trains_only_assistant_tokens(chat, tmp_path):
    data = write_jsonl(tmp_path / "msgs.jsonl", _conversations())
    out = tmp_path / "m"
    assert run_from_cli("sft", model=chat, data=data, out=str(out), steps=2, sets=QUIET) == 0
    assert (out / "model" / "config.json").is_file()
    eng = quiet(build_engine("sft", model=chat, data=data, out=str(tmp_path / "g"), steps=1, sets=QUIET))
    tok = eng.state.tokenizer
    rows = eng.family.rows(eng.sample(eng.state.records[:2], 0))
    r = rows[0]
    assert tok.decode(r["p"]) == "<bos>system add\nuser 0+1=\nassistant "
    assert tok.decode(r["c"]) == "1\nuser and two more\nassistant 3\n"
    trained = "".join(tok.decode([t]) for t, m in zip(r["c"], r["m"]) if m)
    assert trained == "1\n3\n"
    # the gradient of the SFT loss reaches exactly the assistant tokens' log-probs
    batch = eng.family.batch_of(eng, rows)
    eng._start_iteration(0, replace=False)
    fw = eng.family.forward(eng, batch, slice(0, 2), torch.arange(2))
    from alignspec.runtime.parallel.ddp import global_totals
    totals, _ = global_totals(eng, float(batch["mask"].sum()), 2, 2, 1)
    out_loss = eng.state.algo.step_loss({**batch, **fw}, totals).loss
    (g,) = torch.autograd.grad(out_loss, fw["logp"])
    assert ((g != 0) == (batch["mask"] > 0)).all()
    want = torch.zeros_like(batch["mask"])
    for i, row in enumerate(rows):
        want[i, :len(row["m"])] = torch.tensor(row["m"], dtype=want.dtype)
    assert torch.equal(batch["mask"], want) and int(want.sum()) == 8


def test_dpo_on_implicit_prompt_pairs(chat, tmp_path):
    conv = [{"chosen": [_u(f"{a}+1="), _a(str(a + 1))], "rejected": [_u(f"{a}+1="), _a(str(a))]} for a in range(3)]
    text = [{"chosen": f"{a}+2= {a + 2}", "rejected": f"{a}+2= {a}"} for a in range(3)]
    for name, rows in (("conv", conv), ("text", text)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / name
        assert run_from_cli("dpo", model=chat, data=data, out=str(out), steps=2, sets=QUIET) == 0
        assert (out / "model" / "config.json").is_file()
    eng = quiet(build_engine("dpo", model=chat, data=str(tmp_path / "conv.jsonl"), out=str(tmp_path / "c2"),
                             steps=1, sets=QUIET))
    rec = eng.state.records[0]
    assert rec["prompt"] == [_u("0+1=")] and (rec["chosen"], rec["rejected"]) == ("1", "0")
    chosen, rejected = eng.sample([rec], 0)[0]
    assert chosen["p"] == rejected["p"] and eng.state.tokenizer.decode(chosen["p"]) == "<bos>user 0+1=\nassistant "


def test_streamed_data_resumes_exactly(chat, tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(3) for b in range(3)]  # 9 rows
    data = str(tmp_path / "d" / "train-*.parquet")
    write_parquet(tmp_path / "d" / "train-0.parquet", rows[:5])
    write_parquet(tmp_path / "d" / "train-1.parquet", rows[5:])
    sets = QUIET + ["streaming=true", "shuffle_buffer=4", "batch_size=3"]
    whole = quiet(build_engine("sft", model=chat, data=data, out=str(tmp_path / "a"), steps=4, sets=sets))
    assert not isinstance(whole.records, list)
    whole.train()
    assert whole.records.position() == {"epoch": 1, "offset": 3}            # 12 rows: one epoch and 3
    first = quiet(build_engine("sft", model=chat, data=data, out=str(tmp_path / "b"), steps=2, sets=sets))
    first.train()
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["stream"] == {"epoch": 0, "offset": 6}
    again = quiet(build_engine("sft", model=chat, data=data, out=str(tmp_path / "b"), steps=4, resume=True,
                               sets=sets))
    again.train()
    assert again.step == 4 and _same(_model_state(whole), _model_state(again))
    # the order matters: file order (no shuffle) trains to other weights
    plain = quiet(build_engine("sft", model=chat, data=data, out=str(tmp_path / "c"), steps=4,
                               sets=QUIET + ["streaming=true", "shuffle_buffer=0", "batch_size=3"]))
    plain.train()
    assert not _same(_model_state(whole), _model_state(plain))


def test_max_prompt_length_truncates_from_the_left(chat, tmp_path, capsys):
    rows = [{"prompt": "one two three four five six+1=", "completion": "7"}, {"prompt": "1+1=", "completion": "2"}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    eng = build_engine("sft", model=chat, data=data, out=str(tmp_path / "o"), steps=1,
                       sets=QUIET + ["max_prompt_length=24"])
    said = " ".join(capsys.readouterr().out.split())
    assert "prompts: 1 of 2 longer than max_prompt_length 24 tokens; they are truncated from the left" in said
    (long,), = eng.sample([eng.state.records[0]], 0)
    (short,), = eng.sample([eng.state.records[1]], 0)
    full = "<bos>user one two three four five six+1=\nassistant "
    assert len(long["p"]) == 24 and eng.state.tokenizer.decode(long["p"]) == full[-24:]      # the left is cut
    assert eng.state.tokenizer.decode(short["p"]) == "<bos>user 1+1=\nassistant "           # 21 tokens: kept
    eng.train()
    recs = [m for m in read_metrics(tmp_path / "o") if "loss" in m]
    assert recs and recs[-1]["data/truncated_prompts"] == 1
    # sampled prompts (GRPO's generate) are cut the same way
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in rows])
    grpo = quiet(build_engine("grpo", model=chat, data=data, out=str(tmp_path / "g"), steps=1,
                              sets=QUIET + ["max_prompt_length=24", "rewards=[length]", "max_new_tokens=2"]))
    grpo._start_iteration(0, replace=False)
    group = grpo.sample([grpo.state.records[0]], 0)[0]
    assert group and all(grpo.state.tokenizer.decode(r["p"]) == full[-24:] for r in group)


def test_hub_dataset_name_trains_offline(chat, tmp_path, monkeypatch):
    import datasets
    hf = tmp_path / "hf"
    rows = [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(4)]
    cache_hub_dataset(hf, "someone/tiny-sft", {"train": rows}, config="plus")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf / "datasets")
    out = tmp_path / "h"
    assert run_from_cli("sft", model=chat, data="someone/tiny-sft", out=str(out), steps=1,
                        sets=QUIET + ["data_config=plus"]) == 0
    assert run_from_cli("sft", model=chat, data="someone/tiny-sft", out=str(tmp_path / "s"), steps=1,
                        sets=QUIET + ["data_config=plus", "streaming=true"]) == 0


def test_without_max_prompt_length_an_over_long_prompt_stays_an_error(chat, tmp_path):
    """TRL cuts only when max_prompt_length is set; unset, a prompt that leaves no room for
    max_new_tokens in the model's context (256 positions here) is still a RunError."""
    long = "one two three " * 20                                   # 280 characters: past the context
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": long + "1+1=", "completion": "2"}])
    rc = run_from_cli("sft", model=chat, data=data, out=str(tmp_path / "a"), steps=1, sets=QUIET)
    assert rc == 2
    assert run_from_cli("sft", model=chat, data=data, out=str(tmp_path / "b"), steps=1,
                        sets=QUIET + ["max_prompt_length=64"]) == 0


def test_streaming_refuses_what_reads_the_whole_data(chat, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 2)
    rc = run_from_cli("dpo", model=chat, data=data, out=str(tmp_path / "o"), steps=1,
                      sets=QUIET + ["streaming=true", "precompute_reference=true"])
    assert rc == 2
    assert "streaming: true cannot be used with precompute_reference" in capsys.readouterr().err


def test_messages_on_the_built_in_char_tokenizer_are_a_clear_error(tmp_path, capsys):
    """The built-in model's char tokenizer has no chat template: a messages row cannot be
    rendered, and the run says so before training (naming the file and the row)."""
    data = write_jsonl(tmp_path / "msgs.jsonl", _conversations(2))
    rc = run_from_cli("sft", data=data, out=str(tmp_path / "o"), steps=1, sets=QUIET)
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{data}: row 0's prompt is a list of messages, but the tokenizer in" in err
    assert "has no chat template" in err
