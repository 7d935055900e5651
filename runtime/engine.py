"""Entry points of a training run: ``build_engine`` and ``run_from_cli`` (``alignspec run``).

The run itself is the one loop of runtime/loop/engine.py (``Engine``): rollout -> score,
filter, select -> no-grad forwards -> advantage -> updates -> checkpoint and metrics, for
causal LMs and flow policies alike.

Where things live, in import layers from the top (a module imports only from layers below
its own; ``|``: independent folders of one layer). The contracts are in .importlinter, checked
by ``lint-imports`` (run at the repository's root) in ``make test`` and tests/test_plan.py:

    engine.py       ``alignspec run`` (``run_from_cli``): one spec, or a pipeline of stages
    pipeline.py     a pipeline spec: one run per stage, each stage's model feeding the next
    build.py        ``build_engine``: compile, configure, claim ``--out``, build the loop
    loop/           the one run loop and its stages (engine, rollout_stage, update, base)
    family/         the policy families (token LMs, flow models): models, data, scorers wired
                    together; their protocol (base.py), the run state their setup returns
                    (state.py); the token family's evaluation
    tasks/          the built-in tasks (prompts, reward, warmed-up tiny model)
    rollout/ | scoring/   samplers behind one interface, chosen by the run plan (registered by
                    rollout/__init__.py) | reward functions, scorer models, embeddings
    parallel/       DDP (parallel/ddp.py) or FSDP2 (parallel/fsdp2.py), chosen in parallel/wrap.py;
                    mixed precision, activation checkpointing, sharded checkpoints, LoRA settings
    models/         loaders, log-prob forwards, heads, flow models, self-play iterates
    data/ | io/     data files, prompts and chat templates, token rows | checkpoints, metrics,
                    trackers, the output folder
    config.py | presets.py | user_code.py | seeds.py    settings, presets, user code, seeds
    errors.py

Outside runtime/, the runtime imports neither alignspec.dsl nor alignspec.cli (it reads the
compiled plan); the compiler never imports the runtime, the DSL never the compiler.

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
