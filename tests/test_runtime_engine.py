"""The training engine: every spec kind end to end for a few steps on the tiny built-in model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import alignspec  # noqa: E402
from alignspec.runtime.engine import PHASES, build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.models.loaders import unwrap_causal_lm  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402
from helpers import read_metrics as _metrics, read_weights as _weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache")  # conftest: a shared model cache, offline


@pytest.mark.parametrize("spec", ["sft", "dpo", "grpo", "ppo"])
def test_specs_run_on_builtin_default(spec, tmp_path):
    out = tmp_path / spec
    rc = run_from_cli(spec, out=str(out), steps=2, sets=["batch_size=4", "eval_every=0"])
    assert rc == 0
    recs = _metrics(out)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["loss"] == r["loss"]
        for k in ("step_time", "time/generation", "time/scoring", "time/ref_old_forward",
                  "time/policy_fwd_bwd", "time/optimizer"):
            assert k in r
    assert any("eval_score" in r for r in recs)
    assert (out / "model" / "config.json").is_file()
    assert (out / "checkpoint" / "state.json").is_file()
    assert (out / "curves.png").is_file()


def test_beta_zero_builds_no_reference(tmp_path):
    algo = alignspec.compile("grpo", beta=0.0)
    assert "reference" not in algo.requires
    eng = build_engine(algo, out=str(tmp_path / "g"), steps=1, sets=["batch_size=2", "eval_every=0"])
    assert eng.state.reference is None and eng.state.builds["reference"] == 0
    eng.train()
    eng2 = build_engine("grpo", out=str(tmp_path / "g2"), steps=1, sets=["batch_size=2"])
    assert eng2.state.builds["reference"] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dpo_user_model_and_pairs(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignspec.runtime.models.tiny import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "m", arch, seed=1)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a)}) + "\n"
                            for a in range(6)))
    out = tmp_path / "out"
    rc = run_from_cli("dpo", model=model_dir, data=str(data), out=str(out), steps=2,
                      sets=["batch_size=2", "fields.prompt=question", "lr=1e-3"])
    assert rc == 0
    m = AutoModelForCausalLM.from_pretrained(out / "model")
    before = _weights(model_dir)
    after = _weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert m.config.model_type == arch


def test_resume_matches_uninterrupted(tmp_path):
    # "killed" is played by a shorter run, which matches only under a schedule that does not
    # depend on the number of steps (the built-in preset for grpo decays the LR linearly)
    sets = ["batch_size=4", "eval_every=0", "lr_schedule=constant"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_from_cli("grpo", out=str(a), steps=4, sets=sets) == 0
    assert run_from_cli("grpo", out=str(b), steps=2, sets=sets) == 0       # "killed" after step 2
    assert run_from_cli("grpo", out=str(b), steps=4, sets=sets, resume=True) == 0
    wa, wb = _weights(a / "model"), _weights(b / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    assert [r["step"] for r in _metrics(b) if "loss" in r] == [1, 2, 3, 4]


def test_nonfinite_loss_names_step_and_term(tmp_path, capsys):
    spec = textwrap.dedent("""\
        algorithm broken
        data demonstrations
        loss
          minimize bad = -token_mean_all(logp * 1e30 * 1e30)
        """)
    rc = run_from_cli(spec, out=str(tmp_path / "x"), steps=2, sets=["batch_size=2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "step 1" in err and "'bad'" in err


def test_missing_field_names_file_and_row(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n"
                    + json.dumps({"prompt": "1+2=", "chosen": "3"}) + "\n")
    rc = run_from_cli("dpo", data=str(data), out=str(tmp_path / "x"), steps=1)
    err = capsys.readouterr().err
    assert rc == 2
    assert str(data) in err and "row 1" in err and "rejected" in err


def test_bad_config_value_is_actionable(tmp_path, capsys):
    rc = run_from_cli("sft", out=str(tmp_path / "x"), sets=["lr=-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "lr" in err and "-1" in err


def test_spec_param_override_via_set(tmp_path):
    eng = build_engine("grpo", out=str(tmp_path / "g"), steps=1, sets=["beta=0.0", "n=4"])
    assert eng.state.algo.params["beta"] == 0.0 and eng.state.algo.params["n"] == 4
    assert eng.state.reference is None


def test_kill_9_then_resume_reproduces_uninterrupted_weights(tmp_path):
    """A real SIGKILL mid-run (checkpoints every step), then --resume: same final weights."""
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = ["--steps", "40", "--save-every", "1", "--set", "batch_size=4", "--set", "eval_every=0"]
    a, b = tmp_path / "a", tmp_path / "b"
    cmd = [sys.executable, "-m", "alignspec", "run", "grpo"]
    subprocess.run(cmd + ["--out", str(a)] + args, env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd + ["--out", str(b)] + args, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = b / "checkpoint" / "state.json"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= 5:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = step
            break
        time.sleep(0.01)
    assert killed_at is not None and killed_at < 40, "the run finished before it could be killed"
    assert not (b / "model").exists()
    subprocess.run(cmd + ["--out", str(b), "--resume"] + args, env=env, check=True, capture_output=True,
                   timeout=600)
    wa, wb = _weights(a / "model"), _weights(b / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


def test_lora_reference_is_the_adapter_free_model(tmp_path):
    """With LoRA the reference is the same model with adapters disabled (no second copy): at the
    first step the policy equals it, so DPO's loss is exactly log 2."""
    import math
    eng = build_engine("dpo", out=str(tmp_path / "lora"), steps=1, sets=["lora_r=4", "batch_size=4",
                                                                          "eval_every=0"])
    eng.train()
    assert eng.state.builds.get("reference", 0) == 0 and eng.state.lora
    first = next(r for r in _metrics(tmp_path / "lora") if "loss" in r)
    assert abs(first["loss"] - math.log(2)) < 1e-5


def test_logprob_temperature_follows_the_spec(tmp_path):
    """ppo says logprob_temperature = "sampling" (TRL/verl): its sampler's 0.7; grpo: 1; a spec
    that asks for the sampling temperature without a sampler is a clear error."""
    ppo = build_engine("ppo", out=str(tmp_path / "p"), steps=1, sets=["batch_size=2"])
    assert ppo.state.logprob_temperature == 0.7 and ppo.state.train_forward.temperature == 0.7
    grpo = build_engine("grpo", out=str(tmp_path / "g"), steps=1, sets=["batch_size=2"])
    assert grpo.state.logprob_temperature == 1.0
    spec = tmp_path / "t.align"
    spec.write_text("algorithm t\ndata demonstrations\nloss\n  minimize -token_mean_all(logp)\n"
                    "train\n  logprob_temperature = \"sampling\"\n")
    with pytest.raises(alignspec.SpecError, match="one sampling temperature") as err:  # the compiler says it
        build_engine(str(spec), out=str(tmp_path / "t"), steps=1)
    assert err.value.span.line == 6  # the train line


def test_iterations_with_a_critic_read_logp_old_from_the_iterate_and_value_old_from_the_critic(tmp_path):
    """With self-play iterations pi_t sampled, so logp_old is pi_t's; the value head lives on
    the current model, so value_old is the current critic's (two different models)."""
    spec = tmp_path / "it_ppo.align"
    spec.write_text(textwrap.dedent("""\
        algorithm it_ppo extends ppo
        train
          epochs = 1
          iterations = 2
          logprob_temperature = 1
        """))
    eng = build_engine(str(spec), out=str(tmp_path / "o"), steps=4, sets=["batch_size=2", "eval_every=0"])
    eng.train()  # iteration 1 ends with the policy trained past the frozen pi_t
    assert eng.state.iterate is not None and eng.state.iterate is not unwrap_causal_lm(eng.state.model)
    rows = [{"p": [1, 5, 6], "c": [7, 8, 2], "text": "", "rec": {}}, {"p": [1, 9], "c": [4, 2], "text": "", "rec": {}}]
    batch = eng.family.batch_of(eng, rows)
    eng._no_grad_forwards(batch, {k: 0.0 for k in PHASES})
    sl = slice(0, 2)
    want_logp = eng.family.forward_rows(eng, eng.state.iterate, batch, sl, grad=False)["logp"]
    now = eng.family.forward_rows(eng, eng.state.model, batch, sl, grad=False, value=True)
    assert torch.equal(batch["logp_old"], want_logp)
    assert not torch.allclose(batch["logp_old"], now["logp"])  # the policy moved on from pi_t
    assert torch.equal(batch["value_old"], now["value"])
