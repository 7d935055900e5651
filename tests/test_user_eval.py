"""Evaluation on the user's own data (issue 11, runtime/family/evaluation.py): eval_data /
eval_fraction with eval_every, for a sampling spec (the mean reward), preference pairs (the
implicit-reward accuracy and the loss) and demonstrations (the loss)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402
from alignspec.runtime.models.tiny import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache", "restore_torch_threads")
SETS = ["batch_size=4", "max_new_tokens=4", "lr=1e-3", "lr_schedule=constant"]

REWARDS = '''
def chars(completions, answer, **kwargs):
    return [float(len(c)) + sum(ord(ch) % 5 for ch in c) / 10 for c in completions]

def exact(completions, answer, **kwargs):
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]
'''


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _evals(out: Path) -> list[dict]:
    return [m for m in _metrics(out) if "eval_score" in m]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def test_grpo_with_eval_fraction_logs_the_mean_reward_at_start_and_end(tmp_path, monkeypatch, model_dir):
    (tmp_path / "eval_rewards_a.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "id": i} for i in range(8)])
    out = tmp_path / "run"
    eng = build_engine("grpo", model=model_dir, data=str(data), out=str(out), steps=2, sets=SETS + [
        "eval_fraction=0.25", "rewards=[eval_rewards_a:chars, eval_rewards_a:exact]", "reward_weights=[1, 2]",
        "params.n=2"])
    ids_train, ids_eval = {r["id"] for r in eng.state.records}, {r["id"] for r in eng.state.eval_records}
    assert len(ids_eval) == 2 and not ids_train & ids_eval and ids_train | ids_eval == set(range(8))
    # the step-0 score by hand: greedy completions of the held-out prompts, scored 1 * chars + 2 * exact
    gen = eng.state.policy.generate
    texts = []
    for r in eng.state.eval_records:
        ids = torch.tensor([eng.state.prompt_format.ids(r["prompt"])])
        o = gen(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                eos_token_id=eng.state.tokenizer.eos_token_id, pad_token_id=eng.state.tokenizer.pad_token_id)
        texts.append(eng.state.tokenizer.decode(o[0, ids.shape[1]:], skip_special_tokens=True))
    import eval_rewards_a as R
    answers = [r["answer"] for r in eng.state.eval_records]
    by_hand = [d + 2 * e for d, e in zip(R.chars(texts, answers), R.exact(texts, answers))]
    eng.train()
    evals = _evals(out)
    assert [m["step"] for m in evals] == [0, 2]
    assert sum(by_hand) > 0  # (a score of 0 would not tell much)
    assert evals[0]["eval_score"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-6)
    for m in evals:
        assert m["eval_score"] == pytest.approx(m["eval/reward/mean"])
        assert {"eval/reward/std", "eval/length/mean", "eval/rewards/chars/mean", "eval/rewards/exact/mean"} <= set(m)
    # the training steps' reward metrics stay the training rows' own
    steps = [m for m in _metrics(out) if "loss" in m]
    assert len(steps) == 2 and all("eval/reward/mean" not in m and "rewards/chars/mean" in m for m in steps)


def _pairs(n, start=0):
    return [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x" * (1 + i % 3)} for i in range(start, start + n)]


def test_dpo_with_eval_data_logs_accuracy_and_loss(tmp_path, model_dir):
    data = _jsonl(tmp_path / "train.jsonl", _pairs(8))
    held = _jsonl(tmp_path / "held.jsonl", _pairs(4))
    out = tmp_path / "run"
    build_engine("dpo", model=model_dir, data=str(data), out=str(out), steps=6,
                 sets=SETS + [f"eval_data={held}", "eval_every=3"]).train()
    evals = _evals(out)
    assert [m["step"] for m in evals] == [0, 3, 6]
    first, last = evals[0], evals[-1]
    # step 0: the policy is the reference, every implicit reward is 0: no pair is ranked right, loss = ln 2
    assert first["eval/accuracy"] == 0.0 and first["eval_score"] == 0.0
    assert first["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert last["eval_score"] == last["eval/accuracy"] > 0.5 and last["eval/loss"] < math.log(2)
    assert last["eval/rewards/margins"] > 0


def test_sft_held_out_loss_at_step_0_equals_the_loss_by_hand(tmp_path, model_dir):
    rows = [{"prompt": f"{i}*2=", "response": str(2 * i)} for i in range(10)]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    eng = build_engine("sft", model=model_dir, data=str(data), out=str(out), steps=3,
                       sets=SETS + ["eval_fraction=0.3", "micro_batch_size=2"])
    assert len(eng.state.eval_records) == 3 and len(eng.state.records) == 7
    tok, model = eng.state.tokenizer, eng.state.policy
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in eng.state.eval_records:
            p = eng.state.prompt_format.ids(r["prompt"])
            c = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logits = model(torch.tensor([p + c])).logits[0].float().log_softmax(-1)
            nll -= sum(float(logits[len(p) - 1 + j, t]) for j, t in enumerate(c))
            n += len(c)
    eng.train()
    evals = _evals(out)
    assert [m["step"] for m in evals] == [0, 3]
    assert evals[0]["eval/loss"] == pytest.approx(nll / n, rel=1e-5)
    assert evals[0]["eval_score"] == evals[0]["eval/loss"] and evals[-1]["eval/loss"] < evals[0]["eval/loss"]


def test_eval_data_as_a_split_of_a_saved_dataset(tmp_path, model_dir):
    import datasets
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(_pairs(6)),
                               "test": datasets.Dataset.from_list(_pairs(3, start=20))})
    dd.save_to_disk(str(tmp_path / "ds"))
    eng = build_engine("dpo", model=model_dir, data=str(tmp_path / "ds"), out=str(tmp_path / "run"), steps=1,
                       sets=SETS + ["eval_data=test"])
    assert [r["prompt"] for r in eng.state.eval_records] == [f"{i}+1=" for i in range(20, 23)]
    assert len(eng.state.records) == 6
    with pytest.raises(RunError, match="no split 'valid'"):
        build_engine("dpo", model=model_dir, data=str(tmp_path / "ds"), out=str(tmp_path / "run2"), steps=1,
                     sets=SETS + ["eval_data=valid"])


@pytest.mark.parametrize("sets, message", [
    (["eval_data=x.jsonl", "eval_fraction=0.1"], "eval_data and eval_fraction are both set"),
    (["eval_fraction=1.5"], "strictly between 0 and 1"),
    (["eval_fraction=0"], "strictly between 0 and 1"),
    (["eval_fraction=0.05"], "the eval set is empty"),
    (["eval_data=EMPTY"], "has no rows"),
])
def test_eval_setting_errors(tmp_path, model_dir, capsys, sets, message):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}=", "response": str(i)} for i in range(6)])
    (tmp_path / "empty.jsonl").write_text("")
    sets = [s.replace("EMPTY", str(tmp_path / "empty.jsonl")) for s in sets]
    rc = run_from_cli("sft", model=model_dir, data=str(data), out=str(tmp_path / "o"), steps=1, sets=SETS + sets)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_eval_fraction_needs_user_data(tmp_path, capsys):
    rc = run_from_cli("sft", out=str(tmp_path / "o"), steps=1, sets=["eval_fraction=0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "eval_fraction evaluates on your data (--data)" in err, err


def test_resume_keeps_the_held_out_rows_and_refuses_another_eval_fraction(tmp_path, model_dir, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}*3=", "response": str(3 * i)} for i in range(10)])
    out = tmp_path / "run"
    sets = SETS + ["eval_fraction=0.2"]
    build_engine("sft", model=model_dir, data=str(data), out=str(out), steps=2, sets=sets).train()
    eng = build_engine("sft", model=model_dir, data=str(data), out=str(out), steps=4, sets=sets, resume=True)
    first = build_engine("sft", model=model_dir, data=str(data), out=str(tmp_path / "fresh"), steps=1, sets=sets)
    assert eng.state.eval_records == first.state.eval_records  # the same rows held out, run after run
    first.out_lock.release()
    eng.train()
    assert [m["step"] for m in _evals(out)] == [0, 2, 4]
    rc = run_from_cli("sft", model=model_dir, data=str(data), out=str(out), steps=6, resume=True,
                      config=str(_yaml(tmp_path, {"eval_fraction": 0.3, **_sets_dict(SETS)})))
    err = capsys.readouterr().err
    assert rc != 0 and "eval_fraction" in err, err


def _sets_dict(sets):
    import yaml
    return {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)}


def _yaml(tmp_path, d):
    import yaml
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("spec", ["ipo", "simpo", "orpo", "cpo", "kto", "spin", "aot", "reward_model", "rloo"])
def test_every_kind_of_spec_evaluates_on_held_out_rows(tmp_path, model_dir, monkeypatch, spec):
    import alignspec
    kind = alignspec.compile(spec).plan.data
    rows = {"pairs": _pairs(8),
            "demonstrations": [{"prompt": f"{i}*2=", "response": str(2 * i)} for i in range(8)],
            "unpaired": [{"prompt": f"{i}+1=", "completion": str(i + 1 if i % 2 else i), "label": bool(i % 2)}
                         for i in range(8)],
            "prompts": [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]}[kind]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "eval_rewards_b.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = ["rewards=[eval_rewards_b:chars]"] if kind == "prompts" else []
    out = tmp_path / "run"
    build_engine(spec, model=model_dir, data=str(data), out=str(out), steps=2,
                 sets=SETS + ["eval_fraction=0.5"] + extra).train()
    evals = _evals(out)
    assert [m["step"] for m in evals] == [0, 2]
    assert all(math.isfinite(m["eval_score"]) for m in evals)
    if kind == "pairs" and spec != "reward_model":
        assert all(m["eval_score"] == m["eval/accuracy"] and math.isfinite(m["eval/loss"]) for m in evals)
    elif kind in ("demonstrations", "unpaired"):
        assert all(m["eval_score"] == m["eval/loss"] for m in evals)
        assert evals[0]["eval/loss"] != evals[1]["eval/loss"]


AGENT = '''
class Answer:
    def reset(self, row):
        self.answer = str(row["answer"])
        return None

    def step(self, text):
        return None, float(len(text)), True
'''
EPISODES = """\
algorithm episodes_eval
params
  n: int = 2
sample
  responses = rollout(prompt, env = env, n = n, max_turns = 2)
score
  r = env_reward(response)
advantage
  A = r - group_mean(r)
loss
  minimize -token_mean_all(exp(logp - stopgrad(logp)) * A)
"""


def test_episodes_evaluate_with_the_environments_reward(tmp_path, model_dir, monkeypatch):
    (tmp_path / "eval_agent_c.py").write_text(AGENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = tmp_path / "episodes_eval.align"
    spec.write_text(EPISODES)
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)])
    out = tmp_path / "run"
    eng = build_engine(str(spec), model=model_dir, data=str(data), out=str(out), steps=2,
                       sets=SETS + ["eval_fraction=0.25", "env=eval_agent_c:Answer"])
    eng.train()
    evals = _evals(out)
    assert [m["step"] for m in evals] == [0, 2]
    # the environment's reward is the length of the text, so the score is positive when anything was said
    assert all(m["eval_score"] == m["eval/env_reward/mean"] for m in evals) and evals[0]["eval_score"] > 0


def test_a_hub_data_set_and_its_test_split_as_eval_data(tmp_path, model_dir, monkeypatch):
    """`--data owner/name --set eval_data=test`: the hub data set's test split, offline from the cache."""
    import datasets
    from data_fixtures import cache_hub_dataset
    hf = tmp_path / "hf"
    train = [{"prompt": f"{i}*2=", "completion": str(2 * i)} for i in range(6)]
    test = [{"prompt": f"{i}*2=", "completion": str(2 * i)} for i in range(20, 23)]
    cache_hub_dataset(hf, "someone/tiny-eval", {"train": train, "test": test}, config="default")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf / "datasets")
    out = tmp_path / "run"
    eng = build_engine("sft", model=model_dir, data="someone/tiny-eval", out=str(out), steps=1,
                       sets=SETS + ["data_config=default", "eval_data=test"])
    assert [r["prompt"] for r in eng.state.eval_records] == [r["prompt"] for r in test] and len(eng.state.records) == 6
    eng.train()
    assert [m["step"] for m in _evals(out)] == [0, 1]
