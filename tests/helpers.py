"""Plain helpers shared by the engine tests (fixtures are in conftest.py).

Import them as `from helpers import ...`: pytest puts tests/ on sys.path.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

QUIET = ["eval_every=0"]  # `sets` for a run without the periodic evaluation


def read_metrics(out) -> list[dict]:
    """The records of a run's metrics.jsonl, in order (blank lines skipped)."""
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def read_weights(path) -> dict:
    """The tensors of `path`/model.safetensors (a saved model directory)."""
    from safetensors.torch import load_file
    return load_file(str(Path(path) / "model.safetensors"))


def silent_console():
    """A rich Console that writes nowhere visible (into a StringIO)."""
    from rich.console import Console
    return Console(file=io.StringIO())


def quiet(engine):
    """The engine, with its console silenced."""
    engine.state.console = silent_console()
    return engine


def bias_towards_eos(model, eos_id: int, bias: float) -> None:
    """Give ``model``'s output layer a bias of ``bias`` on EOS (a copy of its weight, bias 0
    elsewhere), so sampled rows end at different positions."""
    import torch
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_id] = bias
    model.lm_head = head
