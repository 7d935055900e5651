"""Reward functions with TRL's signature (runtime/scoring/reward_functions.py): keyword
arguments, data columns, async functions, None, weights, per-function metrics, conversations."""

from __future__ import annotations

import json
import os
import threading
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.errors import RunFailure  # noqa: E402
from alignspec.runtime.scoring import rewards  # noqa: E402
from alignspec.runtime.scoring.reward_functions import RewardFunctions  # noqa: E402

SETS = ["batch_size=2", "eval_every=0", "lr_schedule=constant"]

# a reward file as a TRL user writes it for GRPOTrainer(reward_funcs=[...])
TRL_REWARDS = '''
import json, os
SEEN = []

def accuracy(completions, answer, **kwargs):
    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

def short(prompts, completions, completion_ids, trainer_state, **kwargs):
    SEEN.append({"keys": sorted(kwargs), "step": trainer_state.global_step, "max": trainer_state.max_steps,
                 "n": len(completions), "ids_match": all(isinstance(i, list) for i in completion_ids),
                 "n_prompts": len(prompts)})
    return [None if len(c) > 2 else -float(len(ids)) for c, ids in zip(completions, completion_ids)]
'''


def _metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_a_trl_reward_file_runs_unchanged_with_weights_and_per_function_metrics(tmp_path, monkeypatch):
    (tmp_path / "trl_rewards_a.py").write_text(TRL_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    eng = build_engine("grpo", out=str(out), steps=2, sets=SETS + [
        "rewards=[trl_rewards_a:accuracy, trl_rewards_a:short]", "reward_weights=[1.0, 0.5]"])
    eng.train()
    import trl_rewards_a
    seen = trl_rewards_a.SEEN
    assert [s["step"] for s in seen] == [0, 1] and all(s["max"] == 2 for s in seen)
    assert all(s["ids_match"] and s["n_prompts"] == s["n"] for s in seen)
    assert "answer" in seen[0]["keys"] and "prompt" not in seen[0]["keys"]  # every column but the prompt
    steps = [m for m in _metrics(out) if "rewards/accuracy/mean" in m]
    assert len(steps) == 2
    for m in steps:
        assert {"rewards/accuracy/std", "rewards/short/mean", "rewards/short/std"} <= set(m)


def test_weights_none_and_the_weighted_sum(monkeypatch):
    monkeypatch.setitem(rewards.REGISTRY, "a", lambda completions, **kw: [1.0, None, 3.0, None])
    monkeypatch.setitem(rewards.REGISTRY, "b", lambda completions, **kw: [10.0, 20.0, None, None])
    fns = RewardFunctions(["a", "b"], [2.0, 0.5])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        total = fns(["p"] * 4, ["x", "y", "z", "w"], [{}] * 4)
    torch.testing.assert_close(total, torch.tensor([2.0 + 5.0, 10.0, 6.0, 0.0]))  # nansum; all-None row -> 0
    assert len(w) == 1 and "every reward function returned None for row 3" in str(w[0].message)
    m = fns.pop_metrics()
    assert m["rewards/a/mean"] == pytest.approx(2.0) and m["rewards/b/mean"] == pytest.approx(15.0)
    assert m["rewards/a/std"] == pytest.approx(torch.tensor([1.0, 3.0]).std().item())  # Bessel, as TRL's nanstd
    assert fns.pop_metrics() == {}
    with pytest.raises(Exception, match="reward_weights has 1 values for 2 rewards"):
        RewardFunctions(["a", "b"], [1.0])


def test_async_rewards_run_concurrently(monkeypatch):
    import asyncio
    both = {"a": None, "b": None}

    def make(me, other):
        async def fn(prompts, completions, **kw):
            both[me] = asyncio.get_running_loop()
            for _ in range(200):  # each waits until the other has started: sequential calls would never finish
                if both[other] is not None:
                    break
                await asyncio.sleep(0.005)
            else:
                raise TimeoutError(f"{me} ran alone")
            return [float(len(c)) for c in completions]
        return fn
    monkeypatch.setitem(rewards.REGISTRY, "slow_a", make("a", "b"))
    monkeypatch.setitem(rewards.REGISTRY, "slow_b", make("b", "a"))
    total = RewardFunctions(["slow_a", "slow_b"])(["p", "q"], ["x", "yy"], [{}, {}])
    torch.testing.assert_close(total, torch.tensor([2.0, 4.0]))
    assert threading.current_thread() is threading.main_thread()


def test_an_async_reward_that_raises_names_function_and_step(monkeypatch):
    async def boom(completions, **kw):
        raise ValueError("judge down")
    monkeypatch.setitem(rewards.REGISTRY, "boom", boom)
    fns = RewardFunctions(["boom"])
    fns.step = 7
    with pytest.raises(RunFailure, match="step 7: reward 'boom' raised ValueError: judge down"):
        fns(["p"], ["x"], [{}])


def test_conversational_prompts_get_message_completions(monkeypatch):
    seen = {}

    def spy(prompts, completions, completion_ids, **kw):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, kw=kw)
        return [1.0] * len(completions)
    monkeypatch.setitem(rewards.REGISTRY, "spy", spy)
    conv = [[{"role": "user", "content": "1+1="}], [{"role": "user", "content": "2+2="}]]
    RewardFunctions(["spy"])(conv, ["2", "4"], [{"prompt": conv[0], "answer": "2"}, {"prompt": conv[1], "answer": "4"}],
                             completion_ids=[[5, 1], [7, 1]])
    assert seen["prompts"] == conv
    assert seen["completions"] == [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "4"}]]
    assert seen["ids"] == [[5, 1], [7, 1]] and seen["kw"]["answer"] == ["2", "4"]
    # the built-in rewards read conversational completions too
    assert rewards.exact_answer(conv, seen["completions"], answer=["2", "5"]) == [1.0, 0.0]
    assert rewards.length_reward(conv, seen["completions"]) == [-0.01, -0.01]


def test_a_conversational_grpo_run_scores_message_completions(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from alignspec.runtime.models.tiny import build_tiny_model
    path = build_tiny_model(tmp_path / "chat", "llama", seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant {% endif %}")
    tok.save_pretrained(path)
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{a}+1="}], "answer": str(a + 1)})
                            + "\n" for a in range(4)))
    seen = []

    def spy(prompts, completions, answer, **kw):
        seen.append((prompts[0], completions[0], answer[0]))
        return [float(len(c[0]["content"])) for c in completions]
    monkeypatch.setitem(rewards.REGISTRY, "spy", spy)
    eng = build_engine("grpo", model=str(path), data=str(data), out=str(tmp_path / "o"), steps=1,
                       sets=SETS + ["rewards=[spy, exact_answer]", "max_new_tokens=3", "lr=1e-3"])
    eng.train()
    p, c, a = seen[0]
    assert isinstance(p, list) and p[0]["role"] == "user"
    assert isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
    assert a in {str(x + 1) for x in range(4)}


def test_none_for_every_row_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    (tmp_path / "none_reward_mod.py").write_text("def skip(prompts, completions, **kw):\n"
                                                 "    return [None] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rc = run_from_cli("grpo", out=str(tmp_path / "run"), steps=1,
                          sets=SETS + ["rewards=[none_reward_mod:skip, format]"])
    assert rc == 0
    assert not any("every reward function returned None" in str(x.message) for x in w)  # format scores each row
