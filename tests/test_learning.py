"""Learning checks: each demo spec lifts held-out accuracy on the built-in default.

One short run per spec (seed 0, no --model / --data, so the built-in presets of
runtime/presets.py apply), fewer steps than the demo's 300 where that still shows a clear
rise. ``eval_score`` is greedy exact match on the 25 held-out problems, so it moves in
steps of 0.04. On the 2-core CPU these runs reach sft 0.00 -> 0.64 (300 steps, 4 s of
training), dpo 0.28 -> 0.68, grpo 0.28 -> 0.72, ppo 0.28 -> 1.00 (150 steps: 7, 9, 19 s);
the thresholds below sit at least two problems under that. The exact trajectory depends on
the processor's float rounding: on an AVX2-only machine grpo ends at 0.60 after 150 steps
(0.76-0.80 between steps 100 and 150 of a 250-step run), hence its lower bar. The whole file takes under a
minute on 2 cores.

Also checks the preset mechanism itself: applied only on the built-in task and model, only
to what the user left unset, announced on the console, the caller's config left alone.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import alignspec  # noqa: E402
from alignspec.runtime import presets  # noqa: E402
from alignspec.runtime.config import load_config  # noqa: E402
from alignspec.runtime.engine import Engine, build_engine  # noqa: E402
from helpers import quiet, read_metrics, silent_console  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache")  # conftest: a shared model cache, offline


def _evals(out) -> list[float]:
    return [r["eval_score"] for r in read_metrics(out) if "eval_score" in r]


# spec, steps, least rise over the start, least end score (None: rise only)
CASES = [
    ("sft", 300, 0.4, None),     # from a random init (start 0.0); 300 steps take a few seconds
    ("dpo", 150, 0.25, 0.6),
    ("grpo", 150, 0.25, 0.52),
    ("ppo", 150, 0.25, 0.6),
]


@pytest.mark.parametrize("spec,steps,rise,target", CASES, ids=[c[0] for c in CASES])
def test_spec_learns_on_builtin_default(spec, steps, rise, target, tmp_path):
    eng = quiet(build_engine(spec, out=str(tmp_path / spec), steps=steps, seed=0, eval_every=0))
    eng.train()
    ev = _evals(tmp_path / spec)
    start, end = ev[0], ev[-1]
    assert start < 0.3, f"{spec}: starts at {start}"
    assert end >= start + rise, f"{spec}: eval_score {start:.2f} -> {end:.2f} (needs a rise of {rise})"
    if target is not None:
        assert end > target, f"{spec}: eval_score {start:.2f} -> {end:.2f} (needs > {target})"


# -- the preset mechanism ----------------------------------------------------------------

def _engine(spec, tmp_path, capsys, **kw):
    """build_engine as `alignspec run` calls it; returns (engine, what it printed)."""
    capsys.readouterr()
    eng = build_engine(spec, out=str(tmp_path / "o"), **kw)
    said = capsys.readouterr().out.replace("\n", " ")
    return eng, said


def test_preset_fills_unset_fields_and_says_so(tmp_path, capsys):
    eng, said = _engine("ppo", tmp_path, capsys, steps=1)
    want = presets.PRESETS["ppo"]
    assert (eng.state.lr, eng.state.batch_size, eng.state.cfg.lr_schedule) == (want["lr"], want["batch_size"], want["lr_schedule"])
    assert "built-in preset for ppo" in said and f"lr={want['lr']}" in said
    algo = alignspec.compile("ppo")
    cfg = load_config(None, (), spec_params=algo.params, out=str(tmp_path / "c"), steps=1)
    eng = Engine(algo, cfg, console=silent_console())
    assert eng.state.lr == want["lr"]
    assert cfg.lr is None and cfg.batch_size is None and cfg.lr_schedule == "constant"  # the caller's is kept


def test_preset_never_overrides_what_the_user_set(tmp_path, capsys):
    eng, said = _engine("ppo", tmp_path, capsys, steps=1, sets=["lr=1e-3", "lr_schedule=constant"])
    assert eng.state.lr == 1e-3 and eng.state.cfg.lr_schedule == "constant"
    assert eng.state.batch_size == presets.PRESETS["ppo"]["batch_size"]
    line = said.split("built-in preset for ppo:")[1].split("(runtime/presets.py")[0]
    assert "batch_size=" in line and "lr=" not in line and "lr_schedule" not in line


def test_no_preset_for_other_specs(tmp_path, capsys):
    eng, said = _engine("sft", tmp_path, capsys, steps=1)
    assert (eng.state.lr, eng.state.batch_size, eng.state.cfg.lr_schedule) == (1e-3, 16, "constant")
    assert "built-in preset" not in said


def test_no_preset_on_user_model_or_data(tmp_path, capsys):
    from alignspec.runtime.models.tiny import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "m", "llama", seed=1)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    eng, said = _engine("dpo", tmp_path, capsys, steps=1, model=model_dir, data=str(data))
    assert (eng.state.lr, eng.state.batch_size, eng.state.cfg.lr_schedule) == (1e-5, 8, "constant")
    assert "built-in preset" not in said
    eng, said = _engine("dpo", tmp_path, capsys, steps=1, model=model_dir)  # user model, built-in task
    assert eng.state.lr == 1e-5 and "built-in preset" not in said


def test_preset_spec_params_only_when_unset(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "dpo", {"lr": 3e-4, "params": {"beta": 0.5}})
    eng, said = _engine("dpo", tmp_path, capsys, steps=1)
    assert eng.state.algo.params["beta"] == 0.5 and "beta=0.5" in said
    eng, _ = _engine("dpo", tmp_path, capsys, steps=1, sets=["beta=0.2"])
    assert eng.state.algo.params["beta"] == 0.2
    eng, _ = _engine(alignspec.compile("dpo", beta=0.3), tmp_path, capsys, steps=1)
    assert eng.state.algo.params["beta"] == 0.3


def test_builtin_pairs_cover_every_nearby_wrong_sum():
    from alignspec.runtime.tasks.tasks import ArithmeticTask
    task = ArithmeticTask()
    rows = task.records("pairs")
    by_prompt: dict[str, set] = {}
    for r in rows:
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert r["chosen"] == r["answer"] == str(a + b) and r["rejected"] != r["chosen"]
        by_prompt.setdefault(r["prompt"], set()).add(int(r["rejected"]))
    assert len(by_prompt) == len(task.train_problems)
    for p, wrong in by_prompt.items():
        s = sum(map(int, p[:-1].split("+")))
        assert wrong == {x for x in (s - 2, s - 1, s + 1, s + 2) if 0 <= x <= 18}
    assert len(task.records("prompts")) == len(task.records("demonstrations")) == len(task.train_problems)
