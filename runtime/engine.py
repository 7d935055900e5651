"""Entry points of a training run: ``build_engine`` and ``run_from_cli`` (``alignspec run``).

The run itself is the one loop of runtime/loop/engine.py (``Engine``): rollout -> score,
filter, select -> no-grad forwards -> advantage -> updates -> checkpoint and metrics, for
causal LMs and flow policies alike. Where things live:

    loop/       the loop and its stages (engine, rollout_stage, update), iterations
    rollout/    samplers behind one interface, chosen by the run plan (rollout/base.py)
    models/     loaders, the token-LM and flow policy families, log-prob forwards, heads
    data/       data files, prompts and chat templates, built-in tasks, token rows
    scoring/    reward functions, scorer models, embeddings
    io/         checkpoints, metrics, trackers
    parallel/   DDP (parallel/ddp.py) or FSDP2 (parallel/fsdp2.py), chosen in parallel/wrap.py;
                mixed precision, activation checkpointing, sharded checkpoints, LoRA settings

Distributed runs: ``accelerate launch --multi_gpu --num_processes N`` (or torchrun); see
parallel/ddp.py for the normalizers, padding micro-batches and gradient reduction.
``--set parallel=fsdp2`` (or accelerate's FSDP2 config) shards the training forward with
``fully_shard`` instead of DDP (parallel/fsdp2.py); FSDP1 and DeepSpeed are refused.
"""

from __future__ import annotations

import sys

from .errors import RunError, RunFailure, RunInterrupted
from .build import build_engine
from .loop.base import PHASES
from .loop.engine import EXTERNALS, Engine

__all__ = ["Engine", "EXTERNALS", "PHASES", "build_engine", "run_from_cli"]


def run_from_cli(spec, model=None, data=None, config=None, sets=(), out=None, steps=None, seed=None,
                 save_every=None, resume=False, eval_every=None, profile=False) -> int:
    """Entry point of ``alignspec run``: 0 ok, 2 bad input (spec, config, data, paths), 1 run failure."""
    from alignspec import SpecError
    try:
        from .pipeline import load_pipeline, run_pipeline
        if load_pipeline(spec) is not None:  # a pipeline of stages (runtime/pipeline.py)
            run_pipeline(spec, model=model, data=data, config=config, sets=sets, out=out, steps=steps, seed=seed,
                         save_every=save_every, resume=resume, eval_every=eval_every, profile=profile)
            return 0
        engine = build_engine(spec, model=model, data=data, config=config, sets=sets, out=out, steps=steps,
                              seed=seed, save_every=save_every, resume=resume, eval_every=eval_every,
                              profile=profile)
        engine.train()
        return 0
    except SpecError as e:
        print(e.format() if hasattr(e, "format") else str(e), file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(f"{e}", file=sys.stderr)
        return e.code
    except RunFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
