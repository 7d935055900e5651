"""Experiment trackers (the ``log_with`` setting) through ``accelerate``.

``check_trackers(names)`` runs before ``Accelerator(log_with=...)``: an unknown name or a
tracker whose package is missing is a ``RunError`` (accelerate itself would raise a bare
``ValueError`` for the first and silently drop the second). ``hparams(engine)`` is the
run's configuration as the hyperparameters ``init_trackers`` records: only ``bool``,
``int``, ``float`` and ``str`` values, which every tracker accepts (TensorBoard's
``add_hparams`` rejects anything else, None included) -- unset settings show the value the
run resolved them to (``steps``, ``batch_size``, ``lr``, ...), spec parameters appear as
``params.NAME``, lists and mappings as text.

With ``tensorboard`` the engine's ``acc.log`` calls write event files under
``OUT/alignspec/`` (one scalar series per logged metric, the optimizer step as the x-axis),
readable with ``tensorboard --logdir OUT``.
"""

from __future__ import annotations

import json

from ..errors import RunError

# the pip package behind each tracker name accelerate knows
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
            "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
            "trackio": "trackio"}
# settings the engine resolves when they are unset (None)
RESOLVED = ("steps", "batch_size", "lr", "max_new_tokens", "eval_every")


def _tensorboard_importable() -> str | None:
    """None if accelerate's TensorBoard tracker can start, else why not."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        return None
    except ImportError as e:
        why = f"{type(e).__name__}: {e}"
    try:
        import tensorboardX  # noqa: F401  (accelerate's fallback)
        return None
    except ImportError:
        return why


def check_trackers(names) -> None:
    """Raise ``RunError`` unless every name in ``names`` is a tracker that can start here."""
    from accelerate.tracking import get_available_trackers
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name == "all":
            continue
        if name not in PACKAGES:
            raise RunError(f"log_with: unknown tracker {name!r}",
                           hint=f"use one of {', '.join(sorted(PACKAGES))} (or all: every installed one)")
        if name == "tensorboard":
            why = _tensorboard_importable()
            if why is not None:
                raise RunError(f"log_with: tensorboard is not installed ({why})",
                               hint="pip install tensorboard, or drop tensorboard from log_with")
        elif name not in available:
            raise RunError(f"log_with: {name} is not installed",
                           hint=f"pip install {PACKAGES[name]}, or drop {name} from log_with")


def _value(v):
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def hparams(engine) -> dict:
    """The run's settings for ``init_trackers`` (see the module docstring)."""
    cfg = engine.cfg.model_dump()
    out: dict = {"spec": engine.algo.name}
    for k, v in cfg.items():
        if k == "params":
            continue
        if v is None and k in RESOLVED and getattr(engine, k, None) is not None:
            v = getattr(engine, k)
        if v is not None:
            out[k] = _value(v)
    for k, v in sorted(engine.algo.params.items()):
        if v is not None:
            out[f"params.{k}"] = _value(v)
    return out
