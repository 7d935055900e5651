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

import os
import sys

from .config import load_config
from .errors import RunError, RunFailure, RunInterrupted
from .loop.base import PHASES
from .loop.engine import EXTERNALS, Engine

__all__ = ["Engine", "EXTERNALS", "PHASES", "build_engine", "run_from_cli"]


def build_engine(spec, *, model=None, data=None, config=None, sets=(), out=None, steps=None, seed=None,
                 save_every=None, resume=False, eval_every=None, profile=False, **extra) -> Engine:
    """Compile ``spec`` (name, path, text, Spec or CompiledAlgorithm), load the config, build."""
    import alignspec
    from alignspec.compiler.api import CompiledAlgorithm
    base = spec if isinstance(spec, CompiledAlgorithm) else alignspec.compile(spec)
    cfg = load_config(config, sets, spec_params=base.params, model=model, data=data, out=out, steps=steps,
                      seed=seed, save_every=save_every, eval_every=eval_every,
                      profile=True if profile else None, **extra)
    algo = base
    if cfg.params:
        merged = dict(cfg.params)
        if isinstance(spec, CompiledAlgorithm):
            merged = {**{k: v for k, v in spec.params.items()}, **merged}
        algo = base.with_params(**merged)
    from .parallel.settings import resolve  # bad parallel / precision / LoRA settings: before --out is made
    resolve(cfg, algo)
    from .rollout.vllm_settings import check as check_rollout_engine
    check_rollout_engine(cfg, algo)  # use_vllm: a refused sampler, vllm missing, a server down
    from .io.outdir import claim_out  # before anything loads: a bad --out costs nothing
    lock = claim_out(cfg, resume=resume, main=int(os.environ.get("RANK", "0")) == 0, spec=algo.name)
    engine = Engine(algo, cfg, resume=resume)  # the policy family follows the plan (loop/engine.py)
    engine.out_lock = lock  # held until the process ends
    return engine


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
