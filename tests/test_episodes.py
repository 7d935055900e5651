"""Multi-turn episodes: the ``rollout`` sampler (runtime/rollout/episodes.py), its
environments and tools (envs.py, tools.py), and the action mask it hands the loss."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import QUIET, quiet, read_metrics, read_weights  # noqa: E402

import alignspec  # noqa: E402
from alignspec.runtime.data.token_rows import tensors  # noqa: E402
from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402
from alignspec.runtime.rollout import episodes  # noqa: E402
from alignspec.runtime.rollout.tools import ToolBox, parse_args  # noqa: E402

DT = torch.float64

SPEC = """\
algorithm agentic
params
  n: int = 2
sample
  responses = rollout(prompt, env = env, n = n, max_turns = 3)
score
  r = reward(response) + env_reward(response)
advantage
  A = r - group_mean(r)
loss
  minimize pg = -token_mean_all(exp(logp - stopgrad(logp)) * A)
  minimize per_row = -0.5 * mean(mean_tokens(logp) * A)
"""


def _spec(tmp_path) -> str:
    p = tmp_path / "agentic.align"
    p.write_text(SPEC)
    return str(p)


# ---------------------------------------------------------------- masks
def test_rows_with_an_action_mask_make_mask_and_length():
    rows = [{"p": [5, 6], "c": [7, 8, 9, 10, 11], "m": [1, 1, 0, 0, 1], "text": "", "rec": {}},
            {"p": [5], "c": [7, 2], "m": [1, 1], "text": "", "rec": {}}]
    b = tensors(rows, 0, "cpu")
    assert b["completion_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]  # attention: every token
    assert b["mask"].tolist() == [[1, 1, 0, 0, 1], [1, 1, 0, 0, 0]]              # actions only
    assert b["length"].tolist() == [3.0, 2.0]
    plain = tensors([{k: v for k, v in r.items() if k != "m"} for r in rows], 0, "cpu")
    assert plain["mask"].tolist() == plain["completion_mask"].float().tolist()


def test_compiled_loss_gives_environment_tokens_no_gradient_and_no_count(tmp_path):
    """The compiled loss on a hand-built batch with known masks against a reference written
    with loops over each row's action tokens only."""
    algo = alignspec.compile(_spec(tmp_path))
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    act = torch.tensor([[1, 1, 0, 0, 0, 1], [1, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=DT)
    logp = (-torch.rand(B, T, generator=g, dtype=DT)).requires_grad_(True)
    batch = {"mask": act, "logp": logp, "reward": torch.randn(B, generator=g, dtype=DT),
             "env_reward": torch.randn(B, generator=g, dtype=DT)}
    out = algo.loss(dict(batch))
    r = (batch["reward"] + batch["env_reward"]).detach()
    A = [r[i] - r[(i // 2) * 2:(i // 2) * 2 + 2].mean() for i in range(B)]
    lp = logp.detach().clone().requires_grad_(True)
    n_act = sum(int(act[i, t]) for i in range(B) for t in range(T))
    pg = -sum(A[i] for i in range(B) for t in range(T) if act[i, t]) / n_act  # ratio 1 at logp_old = logp
    per_row = sum(-0.5 * A[i] * sum(lp[i, t] for t in range(T) if act[i, t]) / act[i].sum() for i in range(B)) / B
    want = pg + per_row
    torch.testing.assert_close(out.loss, want.to(out.loss.dtype) if torch.is_tensor(want) else torch.tensor(want))
    out.loss.backward()
    want_grad = torch.autograd.grad(per_row + sum(-A[i] * lp[i, t] / n_act for i in range(B) for t in range(T)
                                                  if act[i, t]), lp)[0]
    torch.testing.assert_close(logp.grad, want_grad)
    assert torch.all(logp.grad[act == 0] == 0) and torch.all(logp.grad[act == 1] != 0)
    # environment tokens' log-probs do not matter at all
    other = logp.detach().clone()
    other[act == 0] = -50.0
    torch.testing.assert_close(algo.loss({**batch, "logp": other}).loss, out.loss.detach())


# ---------------------------------------------------------------- tools
def _box(**kw) -> ToolBox:
    return ToolBox(["agentic_tools:add", "agentic_tools:boom", "agentic_tools:slow", "agentic_tools:huge"],
                   **{"timeout": 0.5, "max_chars": 50, **kw})


def test_tool_schemas_come_from_transformers():
    box = _box()
    add = box.schemas[0]["function"]
    assert add["name"] == "add" and add["parameters"]["required"] == ["a", "b"]
    assert add["parameters"]["properties"]["a"]["type"] == "integer"


def test_tool_calls_parse_in_both_formats():
    box = _box()
    assert box.parse('x <call>add(1, b=2)</call> y <tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}'
                     '</tool_call>') == [("add", [1], {"b": 2}), ("add", [], {"a": 3, "b": 4})]
    assert parse_args("123 456") == ([123, 456], {})
    assert parse_args("'a', 2.5") == (["a", 2.5], {})
    assert box.observe("no call here") is None
    assert box.observe("<call>add(2, 3)</call>") == "<result>5</result>"


def test_a_tool_that_raises_hangs_or_floods_gives_an_observation():
    box = _box()
    assert box.observe("<call>boom(1)</call>") == "<result>error: ValueError: no luck</result>"
    assert box.observe("<call>slow(1)</call>") == "<result>error: timed out after 0.5s</result>"
    big = box.observe("<call>huge(1)</call>")
    assert big == "<result>" + "9" * 50 + "... [truncated, 10000 chars]</result>"
    assert "unknown tool 'nope'" in box.observe("<call>nope()</call>")
    assert "not JSON" in box.observe("<tool_call>{oops}</tool_call>")
    assert box.counts == {"calls": 5, "errors": 4, "timeouts": 1, "truncated": 1}


def test_bad_tool_and_env_names_are_clear_errors(tmp_path):
    with pytest.raises(RunError, match="could not import module 'no_such_mod'"):
        ToolBox(["no_such_mod:f"])
    with pytest.raises(RunError, match="expected module:function"):
        ToolBox(["add"])
    data = tmp_path / "d.jsonl"  # (on the built-in data, the built-in agentic task brings its own tool)
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": "4"}\n')
    eng = quiet(build_engine(_spec(tmp_path), out=str(tmp_path / "o"), steps=1, data=str(data),
                             model=_tiny_model(tmp_path), sets=["batch_size=2", "rewards=[exact_answer]"] + QUIET))
    with pytest.raises(RunError, match="names no environment"):
        eng.train()


def _tiny_model(tmp_path) -> str:
    from alignspec.runtime.models.tiny import build_tiny_model
    return build_tiny_model(tmp_path / "tiny")


# ---------------------------------------------------------------- episodes in a run
TAGS = ["tool_call_tags=['call ', '=']", "tool_result_tags=['?', '?']"]  # the char tokenizer has no < > ,


def _scripted(monkeypatch, seen):
    """Replace the policy's turns: a prompt with an even first digit answers at once (turn 1);
    the others call boom, then slow, then answer (turn 3). Records each turn's batch size."""
    def turn(self, contexts):
        seen.append(len(contexts))
        tok = self.tok
        out = []
        for c in contexts:
            text = tok.decode(c, skip_special_tokens=True)
            k = text.count("call ")
            if int(text.strip()[0]) % 2 == 0 or k == 2:
                say = "7"
            else:
                say = ["call boom(1)=", "call slow(2)="][k]
            ids = list(tok(say, add_special_tokens=False)["input_ids"]) + ([tok.eos_token_id] if say == "7" else [])
            out.append((ids, None))
        return out
    monkeypatch.setattr(episodes.Turns, "__call__", turn)


def test_a_run_with_a_raising_and_a_hanging_tool_completes_and_batches_uneven_episodes(tmp_path, monkeypatch):
    seen = []
    _scripted(monkeypatch, seen)
    out = tmp_path / "o"
    eng = quiet(build_engine(_spec(tmp_path), out=str(out), steps=2,
                             sets=["batch_size=4", "tools=[agentic_tools:boom, agentic_tools:slow]",
                                   "tool_timeout=0.3", *TAGS] + QUIET))
    eng.train()
    rows, tok = eng.batch_rows, eng.state.tokenizer
    odd = [r for r in rows if int(r["rec"]["prompt"].strip()[0]) % 2]
    even = [r for r in rows if not int(r["rec"]["prompt"].strip()[0]) % 2]
    assert odd and even  # episodes of one batch end at different turns
    for r in even:
        assert r["turns"] == 1 and r["tool_calls"] == 0 and r["m"] == [1] * len(r["c"])
    for r in odd:
        assert r["turns"] == 3 and r["tool_calls"] == 2
        text = tok.decode(r["c"], skip_special_tokens=True)
        assert text.startswith("call boom(1)=?") and "call slow(2)=?" in text and text.endswith("?7")
        # the observations' tokens (between the ? marks) are exactly the mask's zeros
        policy = [t for t, m in zip(r["c"], r["m"]) if m]
        assert tok.decode(policy, skip_special_tokens=True) == "call boom(1)=call slow(2)=7"
        obs = [t for t, m in zip(r["c"], r["m"]) if not m]
        # (the char tokenizer has no capitals, colon or dot: <unk>, dropped in the text)
        assert tok.decode(obs, skip_special_tokens=True) == "?error aluerror no luck??error timed out after 03s?"
    # all unfinished episodes generated together: turn 1 every episode, turns 2-3 the odd ones
    per_step = len(rows)
    assert seen[:3] == [per_step, len(odd), len(odd)] or seen[3:6] == [per_step, len(odd), len(odd)]
    b = eng.family.batch_of(eng, rows)
    assert b["length"].tolist() == [float(sum(r["m"])) for r in rows]
    m = [r for r in read_metrics(out) if "loss" in r]
    assert len(m) == 2 and all(x["episodes/tool_errors"] >= 1 and x["episodes/tool_timeouts"] >= 1 for x in m)
    assert all(1 <= x["episodes/turns_mean"] <= 3 and "episodes/tool_calls_mean" in x for x in m)


def test_resume_between_rollouts_matches_an_uninterrupted_run(tmp_path, capsys):
    """Checkpoints are taken between rollouts: a resumed run replays the same episodes."""
    sets = ["batch_size=2", "lr_schedule=constant", "env=agentic_tools:Count", "max_new_tokens=4"] + QUIET
    a, b = tmp_path / "a", tmp_path / "b"
    spec = _spec(tmp_path)
    assert run_from_cli(spec, out=str(a), steps=4, sets=sets) == 0
    assert run_from_cli(spec, out=str(b), steps=2, sets=sets) == 0
    cfg = tmp_path / "other.yaml"  # another environment, not asked for with --set: refused
    cfg.write_text("env: agentic_tools:Other\n")
    assert run_from_cli(spec, out=str(b), steps=4, config=str(cfg), resume=True,
                        sets=[x for x in sets if not x.startswith("env=")]) == 2
    assert "agentic_tools:Other" in capsys.readouterr().err
    assert run_from_cli(spec, out=str(b), steps=4, sets=sets, resume=True) == 0
    wa, wb = read_weights(a / "model"), read_weights(b / "model")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    ma = [r for r in read_metrics(a) if "loss" in r]
    mb = [r for r in read_metrics(b) if "loss" in r]
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    assert [r["env_reward/mean"] for r in ma] == [r["env_reward/mean"] for r in mb]
    assert all(r["episodes/turns_mean"] == 2 for r in ma)  # every episode: a turn, "ok", a turn (Count)


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's tool function and environment class, as written there, in a short run."""
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    sec = readme[readme.index("### Agentic episodes"):]
    code = re.search(r"```python\n# my_agent.py\n(.*?)```", sec, re.S).group(1)
    (tmp_path / "my_agent.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "o"
    eng = quiet(build_engine(_spec(tmp_path), out=str(out), steps=2,
                             sets=["batch_size=2", "env=my_agent:Answer", "tools=[my_agent:calculator]"] + QUIET))
    eng.train()
    rows = eng.batch_rows
    want = [float(r["text"].strip() == str(r["rec"]["answer"])) for r in rows]
    assert [r["env_reward"] for r in rows] == want and all(r["turns"] == 1 for r in rows)
    assert eng._samplers and next(iter(eng._samplers.values())).toolbox.schemas[0]["function"]["name"] == "calculator"
    assert len([r for r in read_metrics(out) if "loss" in r]) == 2


def test_tool_schemas_go_to_the_chat_template():
    """With a templated tokenizer, the prompt is rendered with the tools' schemas."""
    from types import SimpleNamespace

    from alignspec.compiler.plan import SamplerPlan
    from alignspec.runtime.config import RunConfig
    from alignspec.runtime.data.prompts import PromptFormat
    from alignspec.runtime.models.tokenizer import build_char_tokenizer
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for t in tools %}tool {{ t['function']['name'] }}\n{% endfor %}"
                         "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = RunConfig(tools=["agentic_tools:add"])
    run = SimpleNamespace(cfg=cfg, tokenizer=tok, prompt_format=PromptFormat(tok, "auto"),
                          algo=SimpleNamespace(name="t"))
    s = episodes.Rollout(SamplerPlan("rollout", 1, (("n", 1),)), run)
    assert tok.decode(s._prompt_ids("1+2=")) == "tool add\n1+2="


# ---------------------------------------------------------------- the built-in agentic task
def test_the_calculator_is_safe_and_the_final_answer_is_after_the_last_result():
    from alignspec.runtime.tasks.tool_task import BuiltinToolTask, answer_of, calc
    assert calc("123+456+789") == 1368 and calc("2*(3-5)") == -4 and calc(" 7 ") == 7
    for bad in ("__import__('os')", "2**99999", "1/2", "x+1", "9" * 201, "1+"):
        with pytest.raises(ValueError):
            calc(bad)
    assert answer_of("call calc(1+2+3)=?6?6") == "6" and answer_of(" 6") == "6"
    task = BuiltinToolTask()
    assert task.final_answer(["1+2+3="] * 3, ["call calc(1+2+3)=?6?6", "6", "call calc(1+2+3)=?6?5"],
                             answer=["6", "6", "6"]) == [1.0, 1.0, 0.0]
    assert not set(task.train_problems) & set(task.eval_problems)
    demo = task.records("demonstrations")[0]
    assert [t for t, trained in demo["segments"] if not trained] == [f"?{demo['answer']}?"]  # the observation
    box = task.toolbox()
    assert box.observe("call calc(100+200+300)=") == "?600?" and "error" in box.observe("call calc(1+x)=")
    assert box.counts["errors"] == 1


@pytest.mark.usefixtures("alignspec_cache")
def test_grpo_tools_learns_to_call_the_calculator(tmp_path):
    """`alignspec run grpo_tools` on the built-in agentic task, shortened: the warm model
    seldom calls the tool and greedy episodes answer wrongly; GRPO on episodes makes calling
    the rule. Seed 0 reaches 0.98 by step 25 of the demo (runtime/presets.py); a learner that
    does not learn stays near 0."""
    out = tmp_path / "o"
    eng = quiet(build_engine("grpo_tools", out=str(out), steps=30, seed=0, eval_every=0))
    assert eng.state.task.name == "builtin:tool_addition" and eng.state.cfg.tool_call_tags == ("call ", "=")
    eng.train()
    m = read_metrics(out)
    ev = [r["eval_score"] for r in m if "eval_score" in r]
    steps = [r for r in m if "loss" in r]
    assert len(steps) == 30
    assert ev[0] < 0.3 and ev[-1] > 0.6, ev
    calls = [r["episodes/tool_calls_mean"] for r in steps]
    assert sum(calls[:3]) / 3 < 0.3 and sum(calls[-3:]) / 3 > 0.8, calls
    assert all(1 <= r["episodes/turns_mean"] <= 4 and r["episodes/tool_errors"] >= 0 for r in steps)
    assert "reward/mean" in steps[-1] and steps[-1]["reward/mean"] > 0.5


def _tools_spec(tmp_path, name: str, body: str) -> str:
    p = tmp_path / f"{name}.align"
    p.write_text(f"algorithm {name} extends grpo_tools\n\n{body}")
    return str(p)


@pytest.mark.usefixtures("alignspec_cache")
def test_episodes_record_the_samplers_logprobs_on_the_policys_tokens(tmp_path):
    """logp_sampler of an episode: the sampler's log-prob of each policy token (here temperature
    1: the policy's own), 0 on the observation's tokens."""
    spec = _tools_spec(tmp_path, "tools_tis", "advantage\n  A = (r - group_mean(r)) / (group_std(r) + 1e-4)\n"
                       "  w = min(exp(logp_old - logp_sampler), 3.0)\n\nloss\n  ratio = exp(logp - logp_old)\n"
                       "  minimize -mean(mean_tokens(w * clip(ratio, 1 - eps, 1 + eps) * A))\n")
    eng = quiet(build_engine(spec, out=str(tmp_path / "o"), steps=1, sets=["batch_size=16"] + QUIET))
    eng.train()  # one step, with the sampler's log-probs in the batch
    rows = [r for g in eng.sample(eng.state.records[:4], seed=5) for r in g]
    assert any(0 in r["m"] for r in rows)  # some episodes called the tool
    for r in rows:
        assert len(r["ls"]) == len(r["c"]) == len(r["m"])
        assert all(lp == 0.0 for lp, m in zip(r["ls"], r["m"]) if not m)
        assert all(lp < 0.0 for lp, m in zip(r["ls"], r["m"]) if m)
    b = eng.family.batch_of(eng, rows)
    assert "logp_sampler" in b
    fw = eng.family.forward_rows(eng, eng.state.model, b, slice(0, len(rows)), grad=False)
    on = b["mask"] != 0
    torch.testing.assert_close(b["logp_sampler"][on], fw["logp"][on].float(), atol=2e-4, rtol=0)


@pytest.mark.usefixtures("alignspec_cache")
def test_rollout_with_model_reference_samples_from_the_reference(tmp_path):
    """rollout(..., model = reference): episodes come from the frozen reference, not the policy."""
    from alignspec.runtime.models.loaders import unwrap_causal_lm
    from alignspec.runtime.rollout.envs import Episode
    from alignspec.runtime.rollout.episodes import Turns, play
    spec = _tools_spec(tmp_path, "tools_ref", "sample\n  responses = rollout(prompt, env = env, n = n, "
                       "max_turns = max_turns, temperature = 0, model = reference)\n")
    eng = quiet(build_engine(spec, out=str(tmp_path / "o"), steps=1, sets=["batch_size=8", "params.n=2"] + QUIET))
    assert eng.state.reference is not None
    with torch.no_grad():  # the policy now differs from the reference
        for p in unwrap_causal_lm(eng.state.policy).parameters():
            p.add_(0.5 * torch.randn_like(p))
    recs = eng.state.records[:3]
    rows = [r for g in eng.sample(recs, seed=1) for r in g]

    def greedy(model):
        box = eng.state.task.toolbox()
        out = play(Turns(unwrap_causal_lm(model), eng.state.tokenizer, temperature=0.0, top_p=1.0,
                         max_tokens=eng.state.max_new_tokens, seed=0, stops=box.stops),
                   [eng.tok_prompt(r["prompt"]) for r in recs for _ in range(2)],
                   [Episode(None, box, "t") for _ in range(6)], max_turns=4)
        return [o["c"] for o in out]

    assert [r["c"] for r in rows] == greedy(eng.state.reference) != greedy(eng.state.policy)


# ---------------------------------------------------------------- hostile tools and environments (issue 23)
def test_a_result_or_error_text_that_cannot_be_made_is_a_tool_error():
    """An int over 4,300 digits, a result nested 100k deep, a raising __repr__, an exception
    whose text raises: each an observation counted as a tool error, never a crashed run."""
    box = ToolBox([f"agentic_tools:{n}" for n in ("factorial", "deep", "unprintable", "bad_error")],
                  timeout=5, max_chars=80)
    for call in ("factorial(2000)", "deep(100000)", "unprintable(1)", "bad_error(5000)"):
        obs = box.observe(f"<call>{call}</call>")
        assert obs.startswith("<result>error: ") and len(obs) < 200, (call, obs)
    assert "could not be converted" in box.observe("<call>unprintable(1)</call>")
    assert box.counts["calls"] == 5 and box.counts["errors"] == 5


def test_timed_out_tool_threads_are_capped():
    import threading
    box = ToolBox(["agentic_tools:stuck"], timeout=0.05, max_stuck=2)
    before = threading.active_count()
    obs = [box.observe("<call>stuck(1)</call>") for _ in range(5)]
    assert obs[:2] == ["<result>error: timed out after 0.05s</result>"] * 2
    assert all("still running" in o for o in obs[2:]), obs
    assert threading.active_count() - before <= 2
    assert box.counts["errors"] == 5 and box.counts["timeouts"] == 2


def test_a_non_finite_environment_reward_names_the_environment():
    from alignspec.runtime.errors import RunFailure
    from alignspec.runtime.rollout.envs import Episode, resolve_env_class
    ep = Episode(resolve_env_class("agentic_tools:NanReward"), None, "agentic_tools:NanReward")
    ep.reset({})
    with pytest.raises(RunFailure, match=r"env agentic_tools:NanReward: step\(text\) returned the reward nan"):
        ep.step("1")


def test_environment_observations_are_bounded_and_stop_at_the_context(tmp_path):
    out = tmp_path / "o"
    eng = quiet(build_engine(_spec(tmp_path), out=str(out), steps=1, model=_tiny_model(tmp_path),
                             sets=["batch_size=2", "env=agentic_tools:Flood", "max_new_tokens=8",
                                   "env_max_chars=300"] + QUIET))
    eng.train()
    from alignspec.runtime.models.loaders import unwrap_causal_lm
    context = unwrap_causal_lm(eng.state.policy).config.max_position_embeddings
    for r in eng.batch_rows:
        assert len(r["p"]) + len(r["c"]) <= context and r["turns"] >= 1
        obs = [t for t, m in zip(r["c"], r["m"]) if not m]
        assert 0 < len(obs) <= 2 * 300 + 40
    m = [x for x in read_metrics(out) if "loss" in x]
    assert m[0]["episodes/env_truncated"] >= 1


def test_a_reset_observation_past_the_context_is_an_error(tmp_path, capsys):
    rc = run_from_cli(_spec(tmp_path), out=str(tmp_path / "o"), steps=1, model=_tiny_model(tmp_path),
                      sets=["batch_size=2", "env=agentic_tools:LongReset", "env_max_chars=100000"] + QUIET)
    assert rc == 2
    err = capsys.readouterr().err
    assert "agentic_tools:LongReset" in err and "leave no room for a turn" in err
