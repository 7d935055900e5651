"""Flow models on disk: the built-in pretrained model's cache entry and a run's final ``model/``
share one format (``config.json`` + ``model.safetensors``), written atomically.

The built-in default: a ``VelocityNet`` pretrained by rectified flow matching on ``FlowTask``
(2-D class-conditional blob mixtures), cached under ``$ALIGNSPEC_CACHE`` (default
``~/.cache/alignspec``) in ``flow-<hash of every setting>``. ``--model DIR`` takes a
directory written here (the final ``OUT/model`` of an earlier flow run, or the cache entry).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import RunError
from ..io.checkpoint import replace_dir
from ..models.flow import FlowTask, VelocityNet, pretrain

FLOW_MODEL = {"dim": 2, "num_classes": 4, "hidden": 128, "time_freqs": 16}
FLOW_TASK = {"num_classes": 4, "k": 3, "radius": 1.5, "blob_std": 0.1, "reward_width": 0.35}
FLOW_PRETRAIN = {"steps": 1500, "seed": 0, "batch": 256, "lr": 3e-3}
FLOW_INIT_SEED = 0


def write_flow_model(path: Path, model: VelocityNet, task_settings: dict, extra: dict | None = None) -> None:
    """Write ``path/model.safetensors`` + ``path/config.json`` into the existing directory ``path``."""
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    cfg = {"family": "flow", "class": "VelocityNet",
           "velocity_net": {"dim": model.dim, "num_classes": model.num_classes,
                            "hidden": model.cls.embedding_dim, "time_freqs": model.freqs.numel()},
           "task": dict(task_settings), **(extra or {})}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def save_flow_model(dest: Path, model: VelocityNet, task_settings: dict, extra: dict | None = None) -> None:
    """Write ``dest/model.safetensors`` + ``dest/config.json`` atomically (tmp dir + rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary output directory
        write_flow_model(tmp, model, task_settings, extra)
        replace_dir(tmp, dest, dest.parent / f".{dest.name}.old{os.getpid()}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_flow_model(path) -> tuple[VelocityNet, dict]:
    """A ``VelocityNet`` and its config from a directory written by ``save_flow_model``."""
    from safetensors.torch import load_file
    p = Path(os.path.expanduser(str(path)))
    cf = p / "config.json"
    if not cf.is_file() or not (p / "model.safetensors").is_file():
        raise RunError(f"no flow model in {p}: config.json and model.safetensors are needed",
                       hint="give the model/ directory of an earlier flow run, or omit --model for the built-in one")
    cfg = json.loads(cf.read_text())
    if cfg.get("family") != "flow":
        raise RunError(f"{p} holds a {cfg.get('model_type') or cfg.get('family') or 'non-flow'} model, "
                       "but this spec samples with flow_sde(...) and needs a flow model",
                       hint="give the model/ directory of an earlier flow run, or omit --model")
    model = VelocityNet(**cfg["velocity_net"])
    try:
        model.load_state_dict(load_file(str(p / "model.safetensors")))
    except Exception as e:
        raise RunError(f"could not load the flow model in {p}: {e}") from e
    return model.eval(), cfg


def builtin_flow_model_dir() -> tuple[str, dict]:
    """The cached pretrained built-in flow model (pretraining it on first use)."""
    from ..tasks.tasks import cache_key, cache_root
    settings = {"model": FLOW_MODEL, "task": FLOW_TASK, "pretrain": FLOW_PRETRAIN,
                "init_seed": FLOW_INIT_SEED, "version": 1}
    target = cache_root() / f"flow-{cache_key(settings)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target), settings
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FLOW_INIT_SEED)
        model = VelocityNet(**FLOW_MODEL)
    state = pretrain(model, FlowTask(**FLOW_TASK), **FLOW_PRETRAIN)
    model.load_state_dict(state)
    tmp_parent = target.parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=target.name + ".build", dir=tmp_parent))
    try:
        save_flow_model(staged / "m", model, FLOW_TASK, {"builtin": settings})
        try:
            os.replace(staged / "m", target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return str(target), settings
