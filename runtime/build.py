"""``build_engine``: one training run of a spec, built (compiled, configured, its ``--out``
claimed) and ready to ``train()``; runtime/engine.py (``alignspec run``) and
runtime/pipeline.py (one per stage) use it."""

from __future__ import annotations

import os

from .config import load_config
from .loop.engine import Engine


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
