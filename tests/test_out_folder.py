"""The output folder under hostile contents (issue 23): symlinks in it are never followed, a
finished run is never replaced without a word, overwrite=true deletes only what alignspec
wrote, a kill between the final model's renames loses nothing, and a checkpoint with values
of the wrong type is named as damaged (exit 2), never an internal error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.engine import run_from_cli  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402
from alignspec.runtime.io import checkpoint as ck_mod  # noqa: E402
from alignspec.runtime.io.outdir import MARK, claim_out  # noqa: E402
from helpers import read_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache")
SETS = ["batch_size=2", "eval_every=0", "lr_schedule=constant", "save_every=1"]


class Kill(BaseException):
    """Stands for SIGKILL: nothing in the run catches it."""


# ------------------------------------------------------------------ symlinks
@pytest.mark.parametrize("name", [".lock", MARK, "metrics.jsonl", "checkpoint", "model"])
def test_a_symlink_in_out_is_refused_and_its_target_untouched(tmp_path, name):
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    (out / MARK).write_text(json.dumps({"spec": "sft"}) + "\n")
    if name == "checkpoint" or name == "model":
        victim.mkdir()
        (victim / "state.json").write_text("precious")
    else:
        victim.write_text("precious")
    if name == MARK:
        (out / MARK).unlink()
    (out / name).symlink_to(victim)
    with pytest.raises(RunError, match="symbolic link") as e:
        claim_out(SimpleNamespace(out=str(out), overwrite=True), resume=True)
    assert str(out / name) in str(e.value)
    assert (victim / "state.json" if victim.is_dir() else victim).read_text() == "precious"


# ------------------------------------------------------------------ a finished run
def test_a_fresh_run_never_replaces_a_finished_one_without_a_word(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_from_cli("sft", out=str(out), steps=1, sets=SETS) == 0
    before = {str(p): (p / "model.safetensors").read_bytes() for p in (out / "model", out / "checkpoint" / "model")}
    metrics = (out / "metrics.jsonl").read_text()
    assert run_from_cli("dpo", out=str(out), steps=1, sets=SETS) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "sft" in err and "step 1" in err and "--resume" in err and "overwrite" in err, err
    assert {str(p): (p / "model.safetensors").read_bytes() for p in (out / "model", out / "checkpoint" / "model")} == before
    assert (out / "metrics.jsonl").read_text() == metrics
    assert run_from_cli("dpo", out=str(out), steps=1, sets=SETS + ["overwrite=true"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["spec"] == "dpo"


def test_overwrite_deletes_only_alignspec_checkpoints(tmp_path):
    out = tmp_path / "r"
    assert run_from_cli("sft", out=str(out), steps=3, sets=SETS + ["save_total_limit=3"]) == 0
    assert (out / "checkpoint-2").is_dir()  # the earlier run's own kept checkpoint
    for name in ("checkpoint-best", "checkpoint-500", "checkpoint-7"):  # the user's (a HF Trainer's)
        (out / name).mkdir()
        (out / name / "trainer_state.json").write_text("{}")
    assert run_from_cli("sft", out=str(out), steps=2, sets=SETS + ["overwrite=true", "save_total_limit=2"]) == 0
    for name in ("checkpoint-best", "checkpoint-500", "checkpoint-7"):
        assert (out / name / "trainer_state.json").read_text() == "{}", name
    assert not (out / "checkpoint-2").exists()  # the earlier alignspec run's went
    assert (out / "checkpoint-1" / "state.json").is_file()  # this run's, kept by save_total_limit=2


# ------------------------------------------------------------------ the final model
@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert run_from_cli("sft", out=str(out), steps=4, sets=SETS) == 0
    return out


@pytest.mark.parametrize("window", ["while-writing", "between-renames", "before-old-removed"])
def test_a_kill_in_any_final_save_window_keeps_the_model(tmp_path, monkeypatch, capsys, four_steps, window):
    """The final save replaces OUT/model as checkpoints are replaced: a kill at each step of it
    leaves a model that the next start (even one refused a moment later) keeps, and --resume
    writes the model of the uninterrupted run."""
    out = tmp_path / "run"
    assert run_from_cli("sft", out=str(out), steps=2, sets=SETS) == 0
    real_save, real_replace, real_rmtree = ck_mod.CheckpointMixin._save_dir, os.replace, ck_mod.shutil.rmtree

    def save_dir(self, name, fill, keep=None):
        if name == "model" and window == "while-writing":
            def half(tmp):
                (tmp / "config.json").write_text("{")
                raise Kill
            return real_save(self, name, half, keep)
        return real_save(self, name, fill, keep)

    def replace(src, dst):
        real_replace(src, dst)
        if window == "between-renames" and Path(str(src)).name == "model":  # OUT/model -> .model.old
            raise Kill

    def rmtree(path, *a, **k):
        if window == "before-old-removed" and Path(str(path)).name == ".model.old":
            raise Kill
        return real_rmtree(path, *a, **k)
    monkeypatch.setattr(ck_mod.CheckpointMixin, "_save_dir", save_dir)
    monkeypatch.setattr(ck_mod.os, "replace", replace)
    monkeypatch.setattr(ck_mod.shutil, "rmtree", rmtree)
    with pytest.raises(Kill):
        run_from_cli("sft", out=str(out), steps=4, sets=SETS, resume=True)
    monkeypatch.undo()
    if window == "between-renames":
        assert not (out / "model").exists() and (out / ".model.old").is_dir()  # the state the issue found
    assert run_from_cli("sft", out=str(out), steps=4, sets=SETS, seed=5, resume=True) == 2  # refused
    assert "settings differ" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").is_file()
    assert run_from_cli("sft", out=str(out), steps=4, sets=SETS, resume=True) == 0
    wa, wb = read_weights(four_steps / "model"), read_weights(out / "model")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)
    assert not [p for p in out.iterdir() if p.name.startswith((".checkpoint.", ".model."))]


# ------------------------------------------------------------------ damaged checkpoints
@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert run_from_cli("sft", out=str(out), steps=1, sets=SETS) == 0
    return out


def _edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


DAMAGE = {
    "step -5": ("state.json", lambda s: {**s, "step": -5}),
    "step 1e30": ("state.json", lambda s: {**s, "step": 1e30}),
    "step 10**30": ("state.json", lambda s: {**s, "step": 10 ** 30}),
    "step true": ("state.json", lambda s: {**s, "step": True}),
    "cursor -1": ("state.json", lambda s: {**s, "cursor": -1}),
    "settings a list": ("state.json", lambda s: {**s, "settings": []}),
    "params a list": ("state.json", lambda s: {**s, "settings": {**s["settings"], "params": [1]}}),
    "process {}": ("process_0.json", lambda s: {}),
    "process a list": ("process_0.json", lambda s: []),
    "rng wrong size": ("process_0.json", lambda s: {**s, "rng": {**s["rng"], "torch": s["rng"]["torch"][:10]}}),
    "python rng wrong": ("process_0.json", lambda s: {**s, "rng": {**s["rng"], "python": [3, [1, 2], None]}}),
    "optimizer {}": ("optimizer.pt", {}),
    "optimizer other groups": ("optimizer.pt", "groups"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_checkpoint_with_wrong_types_is_named_as_damaged(tmp_path, capsys, one_step, case):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    name, change = DAMAGE[case]
    f = out / "checkpoint" / name
    if name == "optimizer.pt":
        opt = torch.load(f, weights_only=True)
        if change == "groups":
            opt["optimizer"]["param_groups"] = opt["optimizer"]["param_groups"] * 2
            torch.save(opt, f)
        else:
            torch.save(change, f)
    else:
        _edit_json(f, change)
    assert run_from_cli("sft", out=str(out), steps=2, sets=SETS, resume=True) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"{f} is damaged" in err and "Traceback" not in err, err


@pytest.mark.parametrize("copy", [".checkpoint.old", ".checkpoint.tmp123"])
def test_a_damaged_recovery_copy_does_not_block_the_folder(tmp_path, capsys, one_step, copy):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    os.replace(out / "checkpoint", out / copy)  # a kill between the renames, its copy damaged
    (out / copy / "state.json").write_text("[]")
    assert run_from_cli("sft", out=str(out), steps=1, sets=SETS, resume=True) == 0, capsys.readouterr().err
    shutil.rmtree(out / "checkpoint")
    os.replace(out / "model", out / ".model.old")
    (out / copy).mkdir()
    (out / copy / "state.json").write_text('{"step": "x"}')
    assert run_from_cli("sft", out=str(out), steps=1, sets=SETS + ["overwrite=true"]) == 0, capsys.readouterr().err
