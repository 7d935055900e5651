"""``log_with=[tensorboard]``: event files with every step's metrics, and clear errors for
missing or unknown trackers (runtime/tracking.py). tensorboard is a dev dependency
(pyproject.toml), so these tests run under ``make test``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402
from alignspec.runtime.io.tracking import check_trackers  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ALIGNSPEC_CACHE", str(tmp_path_factory.getbasetemp() / "alignspec-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    found: dict = {}
    files = sorted(out.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {out}"
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def _hparams(out: Path) -> dict:
    """The hyperparameters of the run's hparams session (TensorBoard's hparams plugin)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    for f in sorted(out.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for run, content in acc.PluginTagToContent("hparams").items():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                        for k, v in data.session_start_info.hparams.items()}
    return {}


def test_tensorboard_logs_each_step(tmp_path):
    out = tmp_path / "sft"
    eng = build_engine("sft", out=str(out), steps=2, sets=["log_with=[tensorboard]", "eval_every=0", "batch_size=4"])
    eng.train()
    scalars = _scalars(out / "alignspec")
    assert [s for s, _ in scalars["loss"]] == [1, 2]
    assert all(v == v for _, v in scalars["loss"])
    assert {"lr", "step_time", "grad_norm"} <= set(scalars)
    assert [s for s, _ in scalars["eval_score"]] == [0, 2]   # the start and end evaluations
    hp = _hparams(out / "alignspec")
    # unset settings appear with the value the run used; lists as text; nothing is None
    assert hp["spec"] == "sft" and hp["steps"] == 2 and hp["batch_size"] == 4
    assert hp["lr"] == pytest.approx(eng.state.lr) and hp["log_with"] == "tensorboard"


def test_hparams_hold_only_tracker_types(tmp_path):
    from alignspec.runtime.io.tracking import hparams
    eng = build_engine("dpo", out=str(tmp_path / "d"), steps=1, sets=["batch_size=2", "rewards=[format, length]"])
    hp = hparams(eng)
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())
    assert hp["params.beta"] == eng.state.algo.params["beta"] and hp["rewards"] == "format,length"
    assert hp["fields"] == "{}" and "model" not in hp        # None: left out


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch, capsys):
    for name in ("tensorboard", "tensorboardX", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)   # import raises ImportError
    with pytest.raises(RunError, match="log_with: tensorboard is not installed") as e:
        check_trackers(["tensorboard"])
    assert "pip install tensorboard" in str(e.value)
    rc = run_from_cli("sft", out=str(tmp_path / "o"), steps=1, sets=["log_with=[tensorboard]"])
    assert rc == 2 and "tensorboard is not installed" in capsys.readouterr().err


def test_unknown_or_missing_tracker(monkeypatch):
    with pytest.raises(RunError, match="log_with: unknown tracker 'tensorbord'"):
        check_trackers(["tensorbord"])
    import accelerate.tracking
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(RunError, match="log_with: wandb is not installed") as e:
        check_trackers(["wandb"])
    assert "pip install wandb" in str(e.value)


def test_flow_engine_logs_to_tensorboard(tmp_path):
    out = tmp_path / "flow"
    build_engine("flow_grpo", out=str(out), steps=1,
                 sets=["log_with=[tensorboard]", "eval_every=0", "batch_size=2"]).train()
    assert [s for s, _ in _scalars(out / "alignspec")["loss"]] == [1]
    assert _hparams(out / "alignspec")["spec"] == "flow_grpo"
