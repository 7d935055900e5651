"""The LM-family seed algorithms beyond SFT/DPO/GRPO/PPO: each mechanism against an
independent reference, and a short run of each through the CLI entry.

- reward model (``rm_score``): the score is the head's logit at the last valid token, as
  ``AutoModelForSequenceClassification`` computes it; pairwise accuracy; the saved model
  loads with ``AutoModelForSequenceClassification`` and scores the same;
- self-play iterations: at each boundary the reference (SPIN, SPPO) is the policy of the
  end of the previous iteration; SPPO samples from that iterate; RSPO keeps the initial
  model as its reference and reads ``logp_old`` under the frozen iterate pi_t;
- per-group carried values (SPPO's ``P[chosen]``) cut along micro-batches: one update is
  the same with 1 or 8 groups per micro-batch;
- the rlhf pipeline: the RM stage starts from the SFT stage's weights, the PPO stage
  starts from and is anchored to the SFT model and scores with the RM stage's model; a
  finished stage is not run again on --resume;
- embeddings: ``[B, D]``, the policy's mean last hidden state over the response;
- tree search: the lockstep search equals ``tree_search.search`` per prompt; the sampler's
  steps end at a newline or EOS and its rows are the sibling pairs.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import alignspec  # noqa: E402
from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.models.loaders import unwrap_causal_lm  # noqa: E402
from helpers import QUIET, quiet, read_metrics, read_weights, silent_console  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache")  # conftest: a shared model cache, offline


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in unwrap_causal_lm(model).state_dict().items()}


def _same(a: dict, b: dict, keys=None) -> bool:
    keys = keys if keys is not None else a.keys()
    return all(torch.equal(a[k], b[k]) for k in keys)


# -- a short run of each algorithm through the CLI entry ---------------------------------

@pytest.mark.parametrize("spec,sets", [
    ("reward_model", ["batch_size=4"]),
    ("spin", ["batch_size=4"]),
    ("sppo", ["batch_size=4", "k=3"]),
    ("rspo", ["batch_size=4", "k=3"]),
    ("ampo", ["batch_size=4", "n=6", "k=2"]),
    ("mcts", ["batch_size=4", "simulations=6", "branching=2"]),
])
def test_short_run_through_cli(spec, sets, tmp_path):
    out = tmp_path / spec
    assert run_from_cli(spec, out=str(out), steps=3, sets=sets + QUIET) == 0
    recs = read_metrics(out)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] for r in steps)
    evals = [r["eval_score"] for r in recs if "eval_score" in r]
    assert len(evals) == 2 and all(0.0 <= e <= 1.0 for e in evals)
    assert (out / "model" / "config.json").is_file()


def test_short_rlhf_pipeline_through_cli(tmp_path):
    out = tmp_path / "rlhf"
    assert run_from_cli("rlhf", out=str(out), steps=2, sets=["batch_size=4"] + QUIET) == 0
    summary = json.loads((out / "pipeline.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["sft", "rm", "policy"]
    assert summary["eval_score"] == summary["stages"][-1]["eval_score"]
    for s in ("sft", "rm", "policy"):
        assert (out / s / "model" / "config.json").is_file() and (out / s / "stage_done.json").is_file()
    # a fresh run into the finished pipeline's folder is refused, and forgets no finished stage
    assert run_from_cli("rlhf", out=str(out), steps=2, sets=["batch_size=4"] + QUIET) == 2
    assert all((out / s / "stage_done.json").is_file() for s in ("sft", "rm", "policy"))


# -- reward model --------------------------------------------------------------------------

def test_rm_score_is_the_classifier_logit_at_the_last_valid_token():
    from alignspec.runtime.models.reward_head import encode, left_pad, load_reward_model, sequence_scores
    from alignspec.runtime.tasks.tasks import builtin_model_dir
    torch.manual_seed(0)
    model, tok = load_reward_model(builtin_model_dir(warm=False)[0])
    seqs = [encode(tok, "3+4=", "7"), encode(tok, "12+5=", "17"), encode(tok, "1+1=", "2")]
    ids, att = left_pad(seqs, tok.pad_token_id)
    ours = sequence_scores(model, ids, att)
    with torch.no_grad():
        ref = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])  # no padding at all
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-5)
    # padding in the middle (prompt left-padded, response right-padded) changes nothing
    p = [tok("3+4=")["input_ids"], tok("12+5=")["input_ids"]]
    c = [tok("7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
         tok("17", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    P, T = max(map(len, p)), max(map(len, c))
    mid = torch.full((2, P + T), tok.pad_token_id)
    matt = torch.zeros((2, P + T), dtype=torch.long)
    for i in range(2):
        mid[i, P - len(p[i]):P] = torch.tensor(p[i])
        matt[i, P - len(p[i]):P] = 1
        mid[i, P:P + len(c[i])] = torch.tensor(c[i])
        matt[i, P:P + len(c[i])] = 1
    torch.testing.assert_close(sequence_scores(model, mid, matt).detach(), ref[:2], rtol=1e-5, atol=1e-5)


def test_pairwise_accuracy_counts_ties_half():
    from alignspec.runtime.models.reward_head import pairwise_accuracy
    c = torch.tensor([1.0, 0.0, 2.0, -1.0])
    r = torch.tensor([0.0, 0.0, 3.0, -2.0])
    assert pairwise_accuracy(c, r) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_reward_model_eval_is_heldout_pairwise_accuracy_and_saved_model_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignspec.runtime.models.reward_head import builtin_heldout_pairs
    from alignspec.runtime.scoring.rewards import SequenceScorer
    from alignspec.runtime.tasks.tasks import ArithmeticTask
    out = tmp_path / "rm"
    eng = quiet(build_engine("reward_model", out=str(out), steps=3, sets=["batch_size=8"] + QUIET))
    summary = eng.train()
    pairs = builtin_heldout_pairs(ArithmeticTask())
    train_prompts = {r["prompt"] for r in eng.state.records}
    assert pairs and not {p["prompt"] for p in pairs} & train_prompts       # held out
    # independent: the saved model, loaded by transformers, one unpadded sequence at a time
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.num_labels == 1

    def score(prompt, resp):
        ids = tok(prompt)["input_ids"] + tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    wins = [score(p["prompt"], p["chosen"]) - score(p["prompt"], p["rejected"]) for p in pairs]
    acc = sum(1.0 if w > 0 else 0.5 if w == 0 else 0.0 for w in wins) / len(wins)
    assert summary["eval_score"] == pytest.approx(acc, abs=1e-6)
    # a downstream reward_model(response) scores exactly so
    scorer = SequenceScorer(str(out / "model"))
    s = scorer([p["prompt"] for p in pairs[:4]], [p["chosen"] for p in pairs[:4]], pairs[:4])
    torch.testing.assert_close(s, torch.tensor([score(p["prompt"], p["chosen"]) for p in pairs[:4]]),
                               rtol=1e-5, atol=1e-5)


# -- self-play iterations ---------------------------------------------------------------

def _track_iterations(engine):
    """Record the policy's weights at the end of every iteration and the reference / iterate
    weights right after each boundary."""
    log = {"end": {}, "ref_after": {}, "iterate_after": {}, "sampler": []}
    start = engine._start_iteration

    def start_iteration(it, replace=True):
        if it > 0:
            log["end"][it - 1] = _state(engine.state.model)
        start(it, replace)
        if engine.state.reference is not None:
            log["ref_after"][it] = _state(engine.state.reference)
        if engine.state.iterate is not None:
            log["iterate_after"][it] = _state(engine.state.iterate)
    engine._start_iteration = start_iteration
    return log


@pytest.mark.parametrize("spec", ["spin", "sppo"])
def test_iterate_reference_is_replaced_by_the_policy_at_each_boundary(spec, tmp_path, monkeypatch):
    import alignspec.runtime.rollout.generation as generation
    eng = quiet(build_engine(spec, out=str(tmp_path / spec), steps=3,
                              sets=["batch_size=4"] + QUIET + (["k=3"] if spec == "sppo" else [])))
    assert eng.iterations > 1 and eng.state.algo.train["reference"] == "iterate"
    eng.steps_per_iter = 1  # three iterations of one step each
    initial = _state(eng.state.model)
    log = _track_iterations(eng)
    used = []
    real = generation.generate_groups

    def spy(model, *a, **kw):
        used.append(model)
        return real(model, *a, **kw)
    monkeypatch.setattr(generation, "generate_groups", spy)
    eng.train()
    assert _same(log["ref_after"][0], initial)
    for it in (1, 2):
        assert _same(log["ref_after"][it], log["end"][it - 1])      # the previous iterate
        assert not _same(log["end"][it - 1], initial)               # and it did move
    assert eng.state.iterate is eng.state.reference                            # pi_t is the reference
    # every sample came from the iterate (the reference); the policy generated only for the
    # two evaluations (start and end)
    assert sum(m is eng.state.reference for m in used) == 3
    assert sum(m is eng.state.policy for m in used) == 2 and len(used) == 5


def test_rspo_keeps_the_initial_reference_and_reads_logp_old_under_the_iterate(tmp_path):
    from alignspec.runtime.models.logprobs import completion_logprobs
    eng = quiet(build_engine("rspo", out=str(tmp_path / "rspo"), steps=4, sets=["batch_size=4", "k=3"] + QUIET))
    eng.steps_per_iter = 2  # iterations 0, 0, 1, 1: the second step of each is after an update
    initial = _state(eng.state.model)
    log = _track_iterations(eng)
    assert eng.state.iterate is not None and eng.state.iterate is not eng.state.reference
    checked = []
    forwards = eng._no_grad_forwards

    def check(batch, times):
        forwards(batch, times)
        pi_t = copy.deepcopy(unwrap_causal_lm(eng.state.model))          # reference: rebuilt from the log
        pi_t.load_state_dict(log["end"].get(eng._iter - 1, initial))
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        with torch.no_grad():
            want = completion_logprobs(pi_t, ids, att, batch["completion_mask"])["logp"]
            mu = copy.deepcopy(pi_t)
            mu.load_state_dict(initial)
            want_ref = completion_logprobs(mu, ids, att, batch["completion_mask"])["logp"]
        torch.testing.assert_close(batch["logp_old"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch["logp_ref"], want_ref, rtol=1e-5, atol=1e-5)
        if eng.state.step % 2 == 1:  # the policy has moved since pi_t: logp_old is not the current policy's
            with torch.no_grad():
                now = completion_logprobs(eng.state.model, ids, att, batch["completion_mask"])["logp"]
            assert not torch.allclose(now, want, atol=1e-4)
        checked.append(eng._iter)
    eng._no_grad_forwards = check
    eng.train()
    assert checked == [0, 0, 1, 1]
    assert _same(_state(eng.state.reference), initial)                   # mu never moves
    assert _same(log["iterate_after"][0], initial)
    assert _same(log["iterate_after"][1], log["end"][0]) and not _same(log["end"][0], initial)


def test_iterate_is_checkpointed_and_restored(tmp_path):
    out = tmp_path / "rspo"
    eng = quiet(build_engine("rspo", out=str(out), steps=2, sets=["batch_size=4", "k=3"] + QUIET))
    eng.steps_per_iter = 1
    eng.train()
    assert (out / "checkpoint" / "iterate.safetensors").is_file()
    it = _state(eng.state.iterate)
    again = quiet(build_engine("rspo", out=str(out), steps=2, resume=True, sets=["batch_size=4", "k=3"] + QUIET))
    assert again.load_checkpoint()
    assert _same(_state(again.iterate), it)


def test_a_param_set_for_the_run_replaces_its_schedule(tmp_path):
    eng = quiet(build_engine("spin", out=str(tmp_path / "a"), steps=4, sets=["batch_size=4", "beta=0.7"] + QUIET))
    assert [eng.algo_for(i).params["beta"] for i in range(4)] == [0.7] * 4
    from alignspec.runtime.models.iterations import iteration_params
    spin = alignspec.compile("spin")
    assert [iteration_params(spin, i)["beta"] for i in range(4)] == [0.1, 0.1, 0.1, 5.0]


def test_group_level_values_follow_micro_batches(tmp_path):
    """SPPO's P[chosen] / P[rejected] are one value per group: 1 or 8 groups per micro-batch
    give the same update."""
    finals = []
    for mb in (1, 8):
        eng = quiet(build_engine("sppo", out=str(tmp_path / f"m{mb}"), steps=1,
                                  sets=["batch_size=4", "k=3", f"micro_batch_size={mb}"] + QUIET))
        eng.train()
        finals.append(_state(eng.state.model))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-6)


# -- the rlhf pipeline ---------------------------------------------------------------------

def test_rlhf_stage_hand_offs_and_resume(tmp_path):
    from alignspec.runtime.pipeline import run_pipeline
    out = tmp_path / "rlhf"
    seen = {}

    def on_engine(stage, engine):
        quiet(engine)
        seen[stage] = {"engine": engine, "model": copy.deepcopy(engine.state.model.state_dict())}
    run_pipeline("rlhf", out=str(out), steps=2, sets=["batch_size=4"] + QUIET, on_engine=on_engine,
                 console=silent_console())
    sft = read_weights(out / "sft" / "model")
    # the RM stage's body starts from the SFT stage's final weights (new score head)
    rm0 = seen["rm"]["model"]
    body = {k: v for k, v in sft.items() if k.startswith("model.")}
    assert body and all(torch.equal(rm0[k], v) for k, v in body.items())
    assert "score.weight" in rm0
    # the PPO stage: starts from the SFT model, which is also its frozen reference
    ppo = seen["policy"]["engine"]
    start = {k[len("model."):]: v for k, v in seen["policy"]["model"].items() if k.startswith("model.")}
    assert all(torch.equal(start[k], v) for k, v in sft.items())
    ref = ppo.state.reference.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in sft.items())
    # ... and its reward_model(response) is the RM stage's output
    assert Path(ppo.state.scorers["reward_model"].path) == (out / "rm" / "model")
    rm_saved = read_weights(out / "rm" / "model")
    scorer_w = ppo.state.scorers["reward_model"].model.state_dict()
    assert all(torch.equal(scorer_w[k], v) for k, v in rm_saved.items())
    # --resume: finished stages are not run again
    seen.clear()
    s = run_pipeline("rlhf", out=str(out), steps=2, sets=["batch_size=4"] + QUIET, resume=True,
                     on_engine=on_engine, console=silent_console())
    assert seen == {} and all(st["skipped"] for st in s["stages"])
    # an unfinished stage (no marker) is the only one that runs
    (out / "policy" / "stage_done.json").unlink()
    s = run_pipeline("rlhf", out=str(out), steps=2, sets=["batch_size=4"] + QUIET, resume=True,
                     on_engine=on_engine, console=silent_console())
    assert list(seen) == ["policy"] and [st["skipped"] for st in s["stages"]] == [True, True, False]


def test_pipeline_routes_settings_to_stages(tmp_path):
    from alignspec.runtime.errors import RunError
    from alignspec.runtime.pipeline import _route_sets, _split_sets
    common, per = _split_sets(["lr=1e-4", "kl_coef=0.3", "rm.steps=7"], ["sft", "rm", "policy"])
    assert per == {"sft": [], "rm": ["steps=7"], "policy": []}
    routed = _route_sets(common, {"sft": "sft", "rm": "reward_model", "policy": "ppo"})
    assert routed == {"sft": ["lr=1e-4"], "rm": ["lr=1e-4"], "policy": ["lr=1e-4", "kl_coef=0.3"]}
    with pytest.raises(RunError):
        _route_sets(["no_such_param=1"], {"sft": "sft"})


# -- embeddings ------------------------------------------------------------------------------

def test_embedding_is_the_policys_mean_hidden_state_over_the_response(tmp_path):
    from alignspec.runtime.scoring.embedding import Embeddings
    eng = quiet(build_engine("ampo", out=str(tmp_path / "a"), steps=1, sets=["batch_size=2", "n=4", "k=2"] + QUIET))
    eng._start_iteration(0, replace=False)
    captured = {}
    score = eng.current.score

    def spy(batch):
        captured.update(batch)
        return score(batch)
    eng.current.score = spy
    eng._rollout({k: 0.0 for k in ("time/generation", "time/scoring")})
    emb = captured["embedding"]
    B, H = captured["mask"].shape[0], eng.state.policy.config.hidden_size
    assert emb.shape == (B, H) == (2 * 4, H)
    # independent: full forward with hidden states; the states that predict each response token
    P = captured["prompt_ids"].shape[1]
    ids = torch.cat([captured["prompt_ids"], captured["completion_ids"]], 1)
    att = torch.cat([captured["prompt_mask"], captured["completion_mask"]], 1)
    with torch.no_grad():
        hs = eng.state.policy(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp_min(0),
                        output_hidden_states=True).hidden_states[-1]
    h = hs[:, P - 1:-1]
    m = captured["completion_mask"].float().unsqueeze(-1)
    want = (h * m).sum(1) / m.sum(1)
    torch.testing.assert_close(emb, want, rtol=1e-4, atol=1e-5)
    assert Embeddings(eng.state.policy)(captured, [""] * B).shape == (B, H)


# -- tree search ---------------------------------------------------------------------------

def test_lockstep_search_equals_tree_search_per_prompt():
    from alignspec.runtime.rollout.mcts_sampler import search_many
    from alignspec.runtime.rollout.tree_search import StepTask, iter_nodes, search
    task = StepTask(terms=3)
    prompts = [r["prompt"] for r in task.records(5, seed=3)]

    def value(prefix, terminal):  # deterministic but not the oracle: 0.3 on track, 1 when correct
        return 1.0 if task.is_correct(prefix) else (0.3 if task.on_track(prefix) and not terminal else 0.0)

    roots = search_many(prompts, lambda prefixes, k: [task.propose(p, k) for p in prefixes],
                        lambda items: [value(p, t) for _, p, t in items],
                        simulations=12, branching=3, depth=3, c_puct=1.5)
    for prompt, root in zip(prompts, roots):
        ref = search(prompt, task.propose, value, simulations=12, branching=3, depth=3, c_puct=1.5)
        ours = [(n.prefix, n.visits, round(n.value_sum, 9), n.prior, n.terminal) for n in iter_nodes(root)]
        theirs = [(n.prefix, n.visits, round(n.value_sum, 9), n.prior, n.terminal) for n in iter_nodes(ref)]
        assert ours == theirs


def test_tree_sampler_steps_and_pairs(tmp_path):
    from alignspec.runtime.rollout.tree_search import sibling_pairs
    eng = quiet(build_engine("mcts", out=str(tmp_path / "m"), steps=1, sets=["batch_size=2"] + QUIET))
    ts = eng.state.tree_sampler
    recs = eng.state.records[:3]
    props = ts._propose_many(eng.state.policy, 1.0, iter(range(100, 200)).__next__)([r["prompt"] for r in recs], 3)
    assert len(props) == 3 and all(len(p) == 3 for p in props)
    for p in props:
        for text, prior, terminal in p:
            assert 0.0 < prior <= 1.0
            assert terminal or (text.endswith("\n") and text.count("\n") == 1)
    roots = ts.search(eng.state.policy, recs, simulations=8, branching=3, depth=3, c_puct=1.5, seed=5)
    pairs = [(root, pr) for root in roots for pr in sibling_pairs(root)]
    ts.buffer = []
    groups = ts.groups(eng.state.policy, recs, simulations=8, branching=3, depth=3, c_puct=1.5, seed=5)
    assert len(groups) == min(len(recs), len(pairs))
    tok = eng.state.tokenizer
    for (root, pr), (ch, rj) in zip(pairs, groups):
        assert ch["p"] == tok(pr.prefix)["input_ids"] and ch["text"] == pr.chosen and rj["text"] == pr.rejected
        assert pr.prefix.startswith(root.prefix) and pr.q_chosen > pr.q_rejected
        for row, term in ((ch, pr.chosen_terminal), (rj, pr.rejected_terminal)):
            assert (row["c"][-1] == tok.eos_token_id) == term


def test_mcts_resume_reproduces_the_uninterrupted_run(tmp_path):
    """The sampler's buffer of pairs not yet trained on is part of the checkpoint, so a run
    stopped after the first step that leaves a pair in the buffer and resumed ends with the
    weights of an uninterrupted run."""
    # one prompt a step: a tree yields more pairs than the step trains on, so the buffer
    # fills early. Where exactly depends on the processor's float rounding, so the whole run
    # says at which steps the buffer held pairs, and the other run stops at the first of them.
    sets = ["batch_size=1", "simulations=12", "branching=3", "save_every=1"] + QUIET
    whole = quiet(build_engine("mcts", out=str(tmp_path / "a"), steps=6, sets=sets))
    buffered, whole_step = [], whole._train_step

    def note_buffer():
        if whole.tree_sampler.buffer:
            buffered.append(whole.step)
        return whole_step()
    whole._train_step = note_buffer
    whole.train()
    stop_at = next((s for s in buffered if s >= 1), None)
    assert stop_at is not None, "no step of the run left a pair in the buffer: the test checks nothing"
    part = quiet(build_engine("mcts", out=str(tmp_path / "b"), steps=6, sets=sets))
    step = part._train_step

    def stop_when_buffered():
        if part.step == stop_at:
            assert part.tree_sampler.buffer
            raise KeyboardInterrupt
        return step()
    part._train_step = stop_when_buffered
    with pytest.raises(KeyboardInterrupt):
        part.train()
    assert part.step < 6
    assert len(json.loads((tmp_path / "b" / "checkpoint" / "process_0.json").read_text())["tree_buffer"]) > 0
    again = quiet(build_engine("mcts", out=str(tmp_path / "b"), steps=6, resume=True, sets=sets))
    again.train()
    assert again.step == 6
    assert _same(_state(whole.model), _state(again.model))


GROUP_SCORE_SPEC = """algorithm g extends sppo

score
  s = preference(response)
  P = winrate(s)
  spread = group_max(s) - group_min(s)

filter
  keep groups where spread > 0

loss
  a = sum_tokens(logp - logp_ref)
  minimize 0.5 * mean(spread * (a[chosen] - eta * (P[chosen] - 0.5)) ** 2)
"""


def test_group_level_score_values_survive_refills_and_micro_batches(tmp_path):
    """A per-group value from the score stage (``spread``, one per kept group), carried over
    refill rounds, then cut along micro-batches: the batch holds one value per training group,
    and 1 or 8 groups per micro-batch give the same update."""
    finals, seen = [], []
    for mb in (1, 8):
        eng = quiet(build_engine(GROUP_SCORE_SPEC, out=str(tmp_path / f"g{mb}"), steps=2,
                                  sets=["batch_size=8", "k=3", f"micro_batch_size={mb}"] + QUIET))
        eng._start_iteration(0, replace=False)
        adv = eng.current.advantage

        def spy(batch, adv=adv):
            seen.append((batch["spread"].shape[0], batch["mask"].shape[0] // 2, bool((batch["spread"] > 0).all())))
            return adv(batch)
        eng.algo_for = lambda it, eng=eng, spy=spy: _with_advantage(eng, it, spy)
        eng.train()
        finals.append(_state(eng.state.model))
        assert any("refill/rounds" in r for r in read_metrics(tmp_path / f"g{mb}"))
    assert seen and all(g == n and pos for g, n, pos in seen)
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-5)


def _with_advantage(eng, it, spy):
    algo = type(eng).algo_for(eng, it)
    algo.advantage = spy
    return algo
