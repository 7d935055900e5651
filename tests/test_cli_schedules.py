"""Command line, LR schedules, checkpoints (issue 11): run --help from the run configuration,
one --set parser, shell completion, transformers.get_scheduler, weights stored once,
save_total_limit, the final model's card."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typer.testing import CliRunner  # noqa: E402

from alignspec.cli import _parse_sets, app  # noqa: E402
from alignspec.runtime.config import LR_SCHEDULES, RunConfig, load_config  # noqa: E402
from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.sets import parse_value  # noqa: E402

SETS = ["batch_size=2", "eval_every=0"]


def test_run_help_shows_every_setting_with_type_default_and_description():
    res = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for name, f in RunConfig.model_fields.items():
        assert f.description, f"{name} has no description"
        default = f.get_default(call_default_factory=True)
        assert f"{name}: " in text and f"= {default!r}" in text, name
        assert " ".join(f.description.split())[:40] in text, name
    assert "lr_schedule: constant|linear|cosine|" in text and "save_total_limit: int | None = 1" in text


@pytest.mark.parametrize("text,value", [("3", 3), ("1e-4", 1e-4), ("-2.5", -2.5), (".5", 0.5), ("true", True),
                                        ("null", None), ("[a, b]", ["a", "b"]), ("[1, 0.5]", [1, 0.5]),
                                        ("{k: 1}", {"k": 1}), ("abc", "abc"), ("a: b: c", "a: b: c"), ("", "")])
def test_one_set_parser_for_every_command(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)
    assert _parse_sets([f"beta={text}"]) == {"beta": value}                          # compile --set
    if isinstance(value, (int, float, str)):  # what a spec param may hold
        cfg = load_config(sets=[f"beta={text}"], spec_params={"beta": 0.1})
        assert cfg.params["beta"] == value and type(cfg.params["beta"]) is type(value)  # run --set


def test_compile_and_run_read_1e_minus_4_alike(tmp_path):
    res = CliRunner().invoke(app, ["compile", "grpo", "--set", "beta=1e-4"])
    assert res.exit_code == 0, res.output
    assert "0.0001" in res.output
    assert load_config(sets=["lr=1e-4", "reward_weights=[1, 0.5]"]).reward_weights == [1.0, 0.5]


def test_shell_completion_script_and_completions():
    from pathlib import Path
    exe = Path(sys.executable).parent / "alignspec"  # the console script, as a shell calls it
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    res = subprocess.run([str(exe), "--show-completion", "bash"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert "_alignspec_completion" in res.stdout and "complete -o default -F _alignspec_completion alignspec" \
        in res.stdout
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                         env={**env, "_ALIGNSPEC_COMPLETE": "complete_bash", "COMP_WORDS": "alignspec ru",
                              "COMP_CWORD": "1"})
    assert res.stdout.split() == ["run"], (res.stdout, res.stderr)


def test_the_schedules_are_transformers_own():
    from transformers.trainer_utils import SchedulerType
    assert set(LR_SCHEDULES) == {s.value for s in SchedulerType} - {"reduce_lr_on_plateau", "greedy"}


def _lrs(eng) -> list[float]:
    """The LR of every optimizer update of the run (steps the engine's scheduler; the engine is
    not used afterwards)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(eng.state.steps * eng.state.updates_per_step):
            out.append(eng.state.scheduler.get_last_lr()[0])
            eng.state.scheduler.step()
    return out


@pytest.mark.parametrize("sets,want", [
    # HF's linear warmup: lr * i / warmup at update i (0 at the first update), then linear decay
    (["lr_schedule=linear", "warmup_steps=2"], lambda i, n: i / 2 if i < 2 else (n - i) / (n - 2)),
    # the old "constant" with warmup is HF's constant_with_warmup
    (["lr_schedule=constant", "warmup_steps=3"], lambda i, n: i / 3 if i < 3 else 1.0),
    (["lr_schedule=cosine"], lambda i, n: 0.5 * (1 + math.cos(math.pi * i / n))),
    # warmup_ratio 0.25 of 8 updates = 2; cosine down to min_lr_rate 0.1
    (["lr_schedule=cosine_with_min_lr", "warmup_ratio=0.25", "min_lr_rate=0.1"],
     lambda i, n: i / 2 if i < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 2) / (n - 2)))),
])
def test_lr_schedules_follow_get_scheduler_exactly(tmp_path, sets, want):
    from transformers import get_scheduler
    eng = build_engine("sft", out=str(tmp_path / "o"), steps=8, sets=SETS + ["lr=0.01"] + sets)
    n = eng.state.steps * eng.state.updates_per_step
    assert n == 8
    got = _lrs(eng)
    assert got == pytest.approx([0.01 * want(i, n) for i in range(n)], rel=1e-9, abs=1e-12)
    cfg = eng.state.cfg  # and the very same numbers as get_scheduler on a fresh optimizer
    kind = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    warm = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * n)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = get_scheduler(kind, opt, num_warmup_steps=warm, num_training_steps=n,
                        scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_rate} if cfg.min_lr_rate else None)
    expect = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            expect.append(ref.get_last_lr()[0])
            ref.step()
    assert got == expect


def test_a_schedule_missing_its_arguments_is_a_clear_error(tmp_path, capsys):
    rc = run_from_cli("sft", out=str(tmp_path / "o"), steps=2, sets=SETS + ["lr_schedule=linear", "min_lr_rate=0.1"])
    assert rc == 2 and "min_lr_rate is for cosine_with_min_lr" in capsys.readouterr().err


def test_full_fine_tuning_checkpoints_hold_the_weights_once(tmp_path):
    out = tmp_path / "run"
    assert run_from_cli("sft", out=str(out), steps=1, sets=SETS) == 0
    ck = out / "checkpoint"
    assert (ck / "model" / "model.safetensors").is_file() and not (ck / "trainable.safetensors").exists()
    weights = sum(p.stat().st_size for p in ck.rglob("*.safetensors"))
    assert weights < 1.2 * (out / "model" / "model.safetensors").stat().st_size


def test_a_value_head_is_kept_beside_the_model_and_resumes(tmp_path):
    out = tmp_path / "run"
    sets = SETS + ["lr_schedule=constant"]
    assert run_from_cli("ppo", out=str(out), steps=1, sets=sets) == 0
    from safetensors.torch import load_file
    rest = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    assert rest and all("value_head" in k for k in rest)  # only what model/ does not hold
    eng = build_engine("ppo", out=str(out), steps=2, sets=sets, resume=True)
    eng.load_checkpoint()
    for k, v in eng.state.model.named_parameters():
        if k in rest:
            assert torch.equal(v.detach().cpu(), rest[k]), k


def _steps_kept(out):
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def test_save_total_limit_keeps_the_last_k_and_resume_finds_the_newest(tmp_path):
    out = tmp_path / "run"
    sets = SETS + ["lr_schedule=constant", "save_every=1", "save_total_limit=3"]
    assert run_from_cli("sft", out=str(out), steps=4, sets=sets) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    assert _steps_kept(out) == [2, 3]                      # with OUT/checkpoint: the last 3
    assert json.loads((out / "checkpoint-3" / "state.json").read_text())["step"] == 3
    import shutil
    shutil.rmtree(out / "checkpoint")                       # the latest lost: the newest kept one is found
    assert run_from_cli("sft", out=str(out), steps=5, sets=sets, resume=True) == 0
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if "loss" in ln]
    assert steps[-2:] == [4, 5]
    fresh = tmp_path / "all"
    assert run_from_cli("sft", out=str(fresh), steps=3, sets=sets[:-1] + ["save_total_limit=null"]) == 0
    assert _steps_kept(fresh) == [1, 2]
    assert run_from_cli("sft", out=str(fresh), steps=2, sets=SETS + ["save_every=1", "overwrite=true"]) == 0
    assert _steps_kept(fresh) == []                         # a fresh run drops the earlier run's copies


def test_the_final_model_has_a_model_card(tmp_path):
    out = tmp_path / "run"
    assert run_from_cli("sft", out=str(out), steps=2, sets=SETS + ["lr=0.002"]) == 0
    card = (out / "model" / "README.md").read_text()
    import alignspec
    source = alignspec.compile("sft").spec.source
    assert source.strip() and source.strip() in card
    assert "Base model: alignspec's built-in tiny model" in card and "Data: alignspec's built-in task" in card
    assert "lr: 0.002" in card and "| loss |" in card and "Steps: 2" in card
