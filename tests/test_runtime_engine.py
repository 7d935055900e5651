"""The training engine: every spec kind end to end for a few steps on the tiny built-in model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import alignspec  # noqa: E402
from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.errors import RunError, RunFailure  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "alignspec-cache"
    monkeypatch.setenv("ALIGNSPEC_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(Path(path) / "model.safetensors"))


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
    assert eng.reference is None and eng.builds["reference"] == 0
    eng.train()
    eng2 = build_engine("grpo", out=str(tmp_path / "g2"), steps=1, sets=["batch_size=2"])
    assert eng2.builds["reference"] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dpo_user_model_and_pairs(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignspec.runtime.tiny import build_tiny_model
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
    assert eng.algo.params["beta"] == 0.0 and eng.algo.params["n"] == 4
    assert eng.reference is None


# -- two processes == one process ---------------------------------------------------------

TOKEN_MEAN_SPEC = """\
algorithm tm
data demonstrations
loss
  minimize -token_mean_all(logp)
"""
SEQ_MEAN_SPEC = """\
algorithm sm
data demonstrations
loss
  minimize -mean(mean_tokens(logp))
"""

_DDP_SCRIPT = r"""
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
from alignspec.runtime.engine import build_engine
spec_text, out, data, model = sys.argv[1:5]
spec_text = open(spec_text).read()
eng = build_engine(spec_text, model=model, data=data, out=out, steps=1,
                   sets=["batch_size=4", "micro_batch_size=1", "lr=1e-2", "eval_every=0"])
eng.train()
"""


def _launch(nproc, script, args, env):
    port = str(29500 + (os.getpid() % 1000) + nproc)
    # torchrun sets RANK/WORLD_SIZE; accelerate's state then runs gloo (MULTI_CPU) on CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", port, script, *args]
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("spec_text", [TOKEN_MEAN_SPEC, SEQ_MEAN_SPEC], ids=["token_mean", "seq_mean"])
def test_two_processes_match_one(spec_text, tmp_path):
    from alignspec.runtime.tiny import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "m", "llama", seed=2)
    data = tmp_path / "demos.jsonl"
    # responses of different lengths, so token-mean and sequence-mean weightings differ
    answers = ["1", "22", "333", "4444"]
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "response": a}) + "\n"
                            for i, a in enumerate(answers)))
    spec_file = tmp_path / "spec.align"
    spec_file.write_text(spec_text)
    script = tmp_path / "run.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    _launch(1, str(script), [str(spec_file), str(tmp_path / "one"), str(data), model_dir], env)
    _launch(2, str(script), [str(spec_file), str(tmp_path / "two"), str(data), model_dir], env)
    assert json.loads((tmp_path / "two" / "checkpoint" / "state.json").read_text())["world"] == 2
    w1, w2, w0 = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model"), _weights(model_dir)
    assert any(not torch.equal(w0[k], w1[k]) for k in w1)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), k


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
    assert eng.builds.get("reference", 0) == 0 and eng.lora
    first = next(r for r in _metrics(tmp_path / "lora") if "loss" in r)
    assert abs(first["loss"] - math.log(2)) < 1e-5
