"""The flow-policy engine: `alignspec run` on a spec that samples with flow_sde(...)."""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import alignspec  # noqa: E402
from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.family.flow_io import load_flow_model  # noqa: E402
from helpers import QUIET, read_metrics, read_weights  # noqa: E402

# conftest: a shared model cache, offline; torch's thread count put back (the engine sets one
# intra-op thread for the built-in model)
pytestmark = pytest.mark.usefixtures("alignspec_cache", "restore_torch_threads")


def test_default_run_learns(tmp_path):
    out = tmp_path / "fg"
    t0 = time.perf_counter()
    assert run_from_cli("flow_grpo", out=str(out)) == 0
    wall = time.perf_counter() - t0
    recs = read_metrics(out)
    evals = [r for r in recs if "eval_score" in r]
    steps = [r for r in recs if "loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == steps[-1]["step"] == 60
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in steps] == list(range(1, 61))
    for r in steps:
        assert r["loss"] == r["loss"]
        for k in ("reward/mean", "ratio/mean", "loss/policy", "loss/kl_penalty", "grad_norm", "lr", "groups",
                  "step_time", "time/generation", "time/scoring", "time/ref_old_forward",
                  "time/policy_fwd_bwd", "time/optimizer"):
            assert k in r, k
    start, end = evals[0]["eval_score"], evals[-1]["eval_score"]
    print(f"flow_grpo built-in default: eval_score {start:.3f} -> {end:.3f}, {wall:.1f}s wall")
    assert 0.2 < start < 0.4                 # the pretrained model covers all 3 blobs of each class
    assert end > start + 0.4, (start, end)   # measured: 0.290 -> 0.959
    assert steps[-1]["reward/mean"] > steps[0]["reward/mean"] + 0.3
    assert (out / "curves.png").is_file() and (out / "checkpoint" / "state.json").is_file()
    # the final model is a loadable flow model that scores what the last eval line says
    model, cfg = load_flow_model(out / "model")
    assert cfg["family"] == "flow" and cfg["spec"] == "flow_grpo"
    from alignspec.runtime.models.flow import FlowTask
    assert FlowTask(**cfg["task"]).evaluate(model) == pytest.approx(end, abs=1e-6)
    # ... and a later run can start from it
    eng = build_engine("flow_grpo", model=str(out / "model"), out=str(tmp_path / "again"), steps=1, sets=QUIET)
    assert eng.family.evaluate(eng) == pytest.approx(end, abs=1e-6)


def test_beta_zero_builds_no_reference(tmp_path):
    algo = alignspec.compile("flow_grpo", beta=0.0)
    assert "reference" not in algo.requires and "mu_sqdist_ref" not in algo.inputs
    eng = build_engine(algo, out=str(tmp_path / "b0"), steps=1, sets=QUIET)
    assert eng.family.name == "flow"  # the flow policy family in the one loop
    assert eng.state.reference is None and eng.state.builds == {"policy": 1, "reference": 0}
    eng.train()
    rec = [r for r in read_metrics(tmp_path / "b0") if "loss" in r][0]
    assert rec.get("loss/kl_penalty", 0.0) == 0.0 and "kl/mean" not in rec
    eng2 = build_engine("flow_grpo", out=str(tmp_path / "b1"), steps=1, sets=["beta=0.04", *QUIET])
    assert eng2.state.reference is not None and eng2.state.builds["reference"] == 1
    # --set beta=0 reaches the spec the same way
    eng3 = build_engine("flow_grpo", out=str(tmp_path / "b2"), steps=1, sets=["beta=0", *QUIET])
    assert eng3.state.reference is None


def test_resume_matches_uninterrupted(tmp_path):
    sets = ["batch_size=4", "n=6", "save_every=2", *QUIET]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_from_cli("flow_grpo", out=str(a), steps=6, sets=sets) == 0

    eng = build_engine("flow_grpo", out=str(b), steps=6, sets=sets)
    real = eng._train_step

    def crash_after_step_3():
        if eng.state.step == 3:   # step 3 is done but its checkpoint (every 2) is not: resume redoes it
            raise KeyboardInterrupt
        return real()
    eng._train_step = crash_after_step_3
    with pytest.raises(KeyboardInterrupt):
        eng.train()
    assert json.loads((b / "checkpoint" / "state.json").read_text())["step"] == 2
    assert run_from_cli("flow_grpo", out=str(b), steps=6, sets=sets, resume=True) == 0

    wa, wb = read_weights(a / "model"), read_weights(b / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    def same(r):
        return {k: v for k, v in r.items() if not k.startswith("time/") and k not in ("step_time", "step_cpu_time")}
    ma, mb = read_metrics(a), read_metrics(b)
    assert [same(r) for r in ma] == [same(r) for r in mb]
    assert [r["step"] for r in mb if "loss" in r] == [1, 2, 3, 4, 5, 6]


def _derived(tmp_path, name, train):
    p = tmp_path / f"{name}.align"
    p.write_text(f"algorithm {name} extends flow_grpo\n\ntrain\n{textwrap.indent(train, '  ')}\n")
    return str(p)


def test_epochs_two_computes_logp_old(tmp_path):
    spec = _derived(tmp_path, "flow_e2", "epochs = 2")
    algo = alignspec.compile(spec)
    assert algo.train["epochs"] == 2 and "old_logp" in algo.requires
    eng = build_engine(algo, out=str(tmp_path / "e2"), steps=2, sets=["batch_size=4", "n=6", *QUIET])
    assert eng.family.name == "flow"  # the flow policy family in the one loop
    eng.train()
    assert eng.state.counts["logp_old"] == 2      # one no-grad forward per rollout
    steps = [r for r in read_metrics(tmp_path / "e2") if "loss" in r]
    assert all(r["ratio/mean"] != 1.0 for r in steps)  # the second epoch sees the updated policy


def test_single_update_uses_stopgrad_logp(tmp_path):
    spec = _derived(tmp_path, "flow_once", "minibatches = 1")
    algo = alignspec.compile(spec)
    assert "old_logp" not in algo.requires and "logp_old" not in algo.inputs
    eng = build_engine(algo, out=str(tmp_path / "o"), steps=2, sets=["batch_size=4", "n=6", *QUIET])
    eng.train()
    assert eng.state.counts["logp_old"] == 0 and eng.state.counts["rollouts"] == 2
    steps = [r for r in read_metrics(tmp_path / "o") if "loss" in r]
    assert all(r["ratio/mean"] == 1.0 and r["pg/clip_fraction"] == 0.0 for r in steps)


def test_nonfinite_loss_names_step_and_term(tmp_path, capsys):
    p = tmp_path / "bad.align"
    p.write_text("algorithm flow_bad extends flow_grpo\n\nloss\n  minimize bad = mean(mean_tokens(logp * 1e30 * 1e30))\n")
    rc = run_from_cli(str(p), out=str(tmp_path / "x"), steps=2, sets=["batch_size=2", "n=4", *QUIET])
    err = capsys.readouterr().err
    assert rc == 1
    assert "step 1" in err and "'bad'" in err


def test_user_reward_function(tmp_path, monkeypatch):
    mod = tmp_path / "flow_user_reward.py"
    mod.write_text("import torch\n"
                   "def right(samples, classes):\n"
                   "    return torch.sigmoid(4 * samples[:, 0])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "u"
    rc = run_from_cli("flow_grpo", out=str(out), steps=2,
                      sets=["batch_size=2", "n=4", "rewards=[flow_user_reward:right]", *QUIET])
    assert rc == 0
    assert all("reward/mean" in r for r in read_metrics(out) if "loss" in r)
    # a text reward makes no sense for a flow policy: bad input, exit 2
    assert run_from_cli("flow_grpo", out=str(tmp_path / "v"), steps=1, sets=["rewards=[exact_answer]"]) == 2
