"""Nothing is lost on a kill, a full disk, a signal or a second run, and bad settings are refused
before anything loads (issue 14). Each checkpoint window is tested by fault injection: the
save is cut at that exact point by an exception nothing catches (as a kill would), then
`--resume` must reproduce the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.io import checkpoint as loop_mod  # noqa: E402  (checkpoints: io/checkpoint.py)
from alignspec.runtime.engine import run_from_cli  # noqa: E402
from helpers import read_metrics, read_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache")
SETS = ["batch_size=2", "eval_every=0", "lr_schedule=constant", "save_every=1"]


class Kill(BaseException):
    """Stands for SIGKILL: nothing in the run catches it."""


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = read_weights(a / "model"), read_weights(b / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert run_from_cli("sft", out=str(out), steps=4, sets=SETS) == 0
    return out


def _cut(monkeypatch, window: str, at_save: int = 3):
    """Make the `at_save`-th checkpoint save die at `window`."""
    saves = {"n": 0}
    real_write, real_replace, real_rmtree = loop_mod.CheckpointMixin._write_checkpoint, os.replace, loop_mod.shutil.rmtree

    def write(self, tmp, states):
        saves["n"] += 1
        if window == "while-writing" and saves["n"] == at_save:
            self.family.save_weights(self, tmp)  # half a checkpoint: weights, no state.json
            raise Kill
        return real_write(self, tmp, states)

    def replace(src, dst):
        cut = saves["n"] == at_save and Path(str(src)).name == "checkpoint"  # dest → .checkpoint.old
        real_replace(src, dst)
        if cut and window == "between-renames":
            raise Kill

    def rmtree(path, *a, **k):
        if window == "before-old-removed" and saves["n"] == at_save and Path(str(path)).name == ".checkpoint.old":
            raise Kill
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(loop_mod.CheckpointMixin, "_write_checkpoint", write)
    monkeypatch.setattr(loop_mod.os, "replace", replace)
    monkeypatch.setattr(loop_mod.shutil, "rmtree", rmtree)


@pytest.mark.parametrize("window", ["while-writing", "between-renames", "before-old-removed"])
def test_a_kill_in_any_checkpoint_window_resumes_exactly(tmp_path, monkeypatch, uninterrupted, window):
    out = tmp_path / "run"
    _cut(monkeypatch, window)
    with pytest.raises(Kill):
        run_from_cli("sft", out=str(out), steps=4, sets=SETS)
    monkeypatch.undo()
    left = sorted(p.name for p in out.iterdir())
    if window == "between-renames":
        assert "checkpoint" not in left and ".checkpoint.old" in left  # the state the issue found
    assert run_from_cli("sft", out=str(out), steps=4, sets=SETS, resume=True) == 0
    _same_weights(uninterrupted, out)
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert not [p for p in out.iterdir() if p.name.startswith((".checkpoint.", ".model."))]


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = loop_mod.CheckpointMixin._write_checkpoint

    def write(self, tmp, states):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, tmp, states)
    monkeypatch.setattr(loop_mod.CheckpointMixin, "_write_checkpoint", write)
    assert run_from_cli("sft", out=str(out), steps=4, sets=SETS) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "previous one is kept" in err
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert not list(out.glob(".checkpoint.*"))


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignspec", "run", "sft", "--out", str(out), "--steps", "400",
           "--set", "batch_size=2", "--set", "eval_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert 1 <= state["step"] < 400
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-1] == state["step"]


def test_a_second_run_on_the_same_out_stops_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from types import SimpleNamespace as N; "
        "from alignspec.runtime.io.outdir import claim_out; "
        f"claim_out(N(out={str(out)!r}), resume=False); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_from_cli("sft", out=str(out), steps=1, sets=SETS) == 2
        assert f"another run (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_foreign_or_overlapping_out_folders_are_refused(tmp_path, monkeypatch, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert run_from_cli("sft", out=str(user), steps=1, sets=SETS) == 2
    assert "not empty" in capsys.readouterr().err
    assert run_from_cli("sft", out=str(user), steps=1, sets=SETS + ["overwrite=true"]) == 0
    assert (user / "notes.txt").read_text() == "keep me" and (user / "model").is_dir()

    model = tmp_path / "proj" / "model"
    assert run_from_cli("sft", out=str(model.parent / "first"), steps=1, sets=SETS) == 0
    (model.parent / "first" / "model").rename(model)
    monkeypatch.chdir(model.parent)
    before = {p: p.stat().st_mtime_ns for p in model.iterdir()}
    assert run_from_cli("sft", model="./model", out=".", steps=1, sets=SETS + ["overwrite=true"]) == 2
    assert "overlaps the run's model" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in model.iterdir()} == before

    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad in (afile, Path("/dev/null")):
        assert run_from_cli("sft", out=str(bad), steps=1, sets=SETS) == 2
        assert "is not a folder" in capsys.readouterr().err


def test_a_failing_fresh_run_keeps_the_earlier_metrics(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(8)))
    assert run_from_cli("sft", data=str(data), out=str(out), steps=2, sets=SETS) == 0
    before = (out / "metrics.jsonl").read_text()
    again = SETS + ["overwrite=true"]  # a fresh run on a finished one's folder (else refused)
    assert run_from_cli("sft", out=str(out), steps=2, sets=again, data=str(tmp_path / "typo.jsonl")) == 2
    broken = "algorithm broken\ndata demonstrations\nloss\n  minimize bad = -token_mean_all(logp * 1e30 * 1e30)\n"
    assert run_from_cli(broken, data=str(data), out=str(out), steps=2, sets=again) == 1  # dies at step 1
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_refuses_changed_settings_unless_set_on_purpose(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_from_cli("sft", out=str(out), steps=2, sets=SETS) == 0
    assert run_from_cli("sft", out=str(out), steps=3, sets=SETS, seed=5, resume=True) == 2
    err = capsys.readouterr().err
    assert "settings differ" in err and "seed: 0 -> 5" in err
    bf16 = tmp_path / "bf16.yaml"  # a setting of runtime/parallel/ that changes the numbers (RESUME_FIXED)
    bf16.write_text("mixed_precision: bf16\n")
    assert run_from_cli("sft", out=str(out), steps=3, sets=SETS, config=str(bf16), resume=True) == 2
    assert "mixed_precision: 'no' -> 'bf16'" in capsys.readouterr().err
    assert run_from_cli("sft", out=str(out), steps=3, sets=SETS + ["lr=0.002"], resume=True) == 0
    assert "changed setting (--set): lr" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["state.json", "optimizer.pt", "model/model.safetensors", "missing weights"])
def test_damaged_checkpoints_give_clear_errors(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert run_from_cli("sft", out=str(out), steps=1, sets=SETS) == 0
    f = out / "checkpoint" / damage.replace("missing weights", "model/model.safetensors")
    if damage == "missing weights":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    assert run_from_cli("sft", out=str(out), steps=2, sets=SETS, resume=True) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and str(out / "checkpoint") in err


@pytest.mark.parametrize("setting,words", [
    ("max_grad_norm=-1", "greater than or equal to 0"),
    ("seed=-1", "greater than or equal to 0"),
    (f"seed={2**40}", "less than or equal to"),
    ("lora_alpha=-4", "greater than 0"),
    ("lr=nan", "finite number"),
    ("n=100000000", "n must be at most 4,096"),
])
def test_out_of_range_settings_are_refused_before_loading(tmp_path, capsys, setting, words):
    spec = "grpo" if setting.startswith("n=") else "sft"
    assert run_from_cli(spec, out=str(tmp_path / "run"), steps=1, sets=SETS + [setting]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(b"batch_size: 2\nlr: 1e-3  # caf\xe9\n")
    assert run_from_cli("sft", config=str(cfg), out=str(tmp_path / "run"), steps=1) == 2
    assert f"{cfg}:2: byte 0xe9" in capsys.readouterr().err


@pytest.mark.parametrize("content,words", [
    (b'{"prompt": 12, "response": "x"}\n', "row 0's prompt is a int"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": {"x": 1}, "response": "b"}\n', "row 1's prompt is a dict"),
    (b'{"prompt": "a", "response": true}\n', "row 0's response is a bool"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n', "row 1 (line 2): byte 0xe9"),
    (b'[1, 2]\n', "row 0 (line 1) is a JSON list"),
    (b"", "has no rows"),
    (b"\n\n", "has no rows"),
])
def test_bad_data_rows_are_named(tmp_path, capsys, content, words):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    assert run_from_cli("sft", data=str(data), out=str(tmp_path / "run"), steps=1, sets=SETS) == 2
    err = capsys.readouterr().err
    assert words in err and str(data) in err and "Traceback" not in err


def test_a_10mb_prompt_line_is_read_without_blowing_up(tmp_path):
    import resource

    from alignspec.runtime.data.records import load_records
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "x" * (10 << 20), "response": "y"}) + "\n"
                    + json.dumps({"prompt": "short", "response": "y"}) + "\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    recs = load_records(data, required=["prompt", "response"])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(recs) == 2 and len(recs[0]["prompt"]) == 10 << 20
    assert grown_mb < 400


@pytest.mark.parametrize("body,words", [
    ("raise ValueError('boom')", "raised ValueError: boom"),
    ("return None", "returned NoneType None instead of a list"),
    ("return 1.0", "returned float 1.0 instead of a list"),
    ("return ['a'] * len(completions)", "returned 'a' (str) for row 0"),
    ("return [[1.0]] * len(completions)", "returned [1.0] (list) for row 0"),
    ("return [1j] * len(completions)", "(complex) for row 0"),
    ("return [float('nan')] * len(completions)", "returned nan for row 0"),
    ("return [float('inf')] + [0.0] * (len(completions) - 1)", "returned inf for row 0"),
    ("return [1.0]", "returned 1 values for"),
])
def test_bad_rewards_name_the_function_step_and_row(tmp_path, capsys, monkeypatch, body, words):
    module = f"bad_reward_{abs(hash(body))}"  # one module per case: imports are cached
    (tmp_path / f"{module}.py").write_text(f"def bad(prompts, completions, **kwargs):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = run_from_cli("grpo", out=str(tmp_path / "run"), steps=2, sets=SETS + [f"rewards={module}:bad"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"step 1: reward '{module}:bad'" in err and words in err, err


def test_a_prompt_longer_than_the_context_is_an_error(tmp_path, capsys):
    from alignspec.runtime.models.tiny import tiny_config
    context = tiny_config().max_position_embeddings
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+" * context + "1=", "response": "2"}) + "\n")
    assert run_from_cli("sft", data=str(data), out=str(tmp_path / "run"), steps=1, sets=SETS) == 2
    assert f"in the model's context of {context:,} positions" in capsys.readouterr().err


def test_another_process_of_the_launch_accepts_the_main_ones_fresh_lock(tmp_path):
    """Under torchrun every process checks --out while the main one claims it: a folder that holds
    only the main process's `.lock` (its mark not written yet) is not someone else's folder."""
    from types import SimpleNamespace

    from alignspec.runtime.errors import RunError
    from alignspec.runtime.io.outdir import claim_out
    out = tmp_path / "o"
    out.mkdir()
    (out / ".lock").write_text("123")
    assert claim_out(SimpleNamespace(out=str(out)), resume=False, main=False) is None
    (out / "stranger.txt").write_text("x")
    with pytest.raises(RunError, match="holds no alignspec run"):
        claim_out(SimpleNamespace(out=str(out)), resume=False, main=False)


def test_a_spec_that_never_generates_ignores_max_new_tokens(tmp_path, capsys):
    """dpo on a model with a 64-position context trains: max_new_tokens (64 by default) limits
    what a spec samples, and dpo samples nothing (issue 23)."""
    from alignspec.runtime.models.tiny import build_tiny_model
    model = build_tiny_model(tmp_path / "m", max_positions=64)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)}) + "\n"
                            for i in range(4)))
    rc = run_from_cli("dpo", model=model, data=str(data), out=str(tmp_path / "run"), steps=1, sets=SETS)
    assert rc == 0, capsys.readouterr().err
    too_long = tmp_path / "long.jsonl"  # a prompt that fills the context alone is still refused
    too_long.write_text(json.dumps({"prompt": "1+" * 40, "chosen": "2", "rejected": "3"}) + "\n")
    assert run_from_cli("dpo", model=model, data=str(too_long), out=str(tmp_path / "run2"), steps=1, sets=SETS) == 2
    assert "in the model's context of 64 positions" in capsys.readouterr().err
