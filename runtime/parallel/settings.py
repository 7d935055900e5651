"""The parallel, precision, checkpointing and LoRA settings, checked before anything loads.

``resolve(cfg, algo=None, env=os.environ)`` returns the run's :class:`ParallelPlan` or raises a
``RunError`` that names the setting and says what to do instead. It runs before the
``Accelerator``, the data and the models are built, so a bad combination costs nothing:

- ``parallel: fsdp2`` shards over processes: with one process there is nothing to shard;
- accelerate's own launch configuration is read from the environment its launcher sets
  (``ACCELERATE_USE_FSDP`` / ``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``,
  ``FSDP_RESHARD_AFTER_FORWARD``, ``FSDP_ACTIVATION_CHECKPOINTING``, ``ACCELERATE_MIXED_PRECISION``):
  FSDP2 (``fsdp_version: 2``) selects ``parallel=fsdp2``; FSDP1 and DeepSpeed are refused;
- ``mixed_precision: fp16`` needs a CUDA device (loss scaling; CPUs have no fp16 autocast worth
  it) and DDP; mixed precision keeps float32 master weights, so it excludes a low-precision ``dtype``;
- QLoRA needs LoRA and ``bitsandbytes`` (whose 4-bit layers also run, slowly, on CPUs);
- what FSDP2 does not cover yet (LoRA, flow policies, self-play iterates and a replaced
  reference, which copy whole weights between models, tree search, multi-turn episodes,
  reward-model training) is refused with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import RunError

_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class ParallelPlan:
    """What runtime/parallel/ applies to a run (resolved from the settings and the launcher)."""

    parallel: str = "ddp"                 # "ddp" | "fsdp2"
    mixed_precision: str = "no"           # "no" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    reshard_after_forward: bool = True
    world: int = 1

    @property
    def fsdp2(self) -> bool:
        return self.parallel == "fsdp2"


def world_size(env=os.environ) -> int:
    """The number of processes the launcher started (torchrun and accelerate set WORLD_SIZE)."""
    try:
        return max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _from_launcher(cfg, env) -> dict:
    """Settings that accelerate's launcher put in the environment, where the run left them unset."""
    explicit = cfg.model_fields_set
    out = {}
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        raise RunError("accelerate's DeepSpeed mode is not supported by this runtime",
                       hint="launch without the DeepSpeed config; for sharded training use FSDP2: "
                            "--set parallel=fsdp2, or an accelerate config with fsdp_version: 2")
    if env.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise RunError(f"accelerate's FSDP version {version} is not supported by this runtime",
                           hint="set fsdp_version: 2 in the accelerate config (FSDP2, torch fully_shard), "
                                "or --set parallel=fsdp2")
        if "parallel" in explicit and cfg.parallel != "fsdp2":
            raise RunError(f"parallel={cfg.parallel} contradicts the launch configuration, which asks for FSDP2",
                           hint="drop the parallel setting or launch without the FSDP config")
        out["parallel"] = "fsdp2"
        raf = env.get("FSDP_RESHARD_AFTER_FORWARD")
        if raf is not None and "reshard_after_forward" not in explicit:
            # accelerate writes FSDP2's bool, or FSDP1-style strategy names
            out["reshard_after_forward"] = raf.lower() in _TRUE + ("full_shard",)
        ac = env.get("FSDP_ACTIVATION_CHECKPOINTING")
        if ac is not None and "gradient_checkpointing" not in explicit:
            out["gradient_checkpointing"] = ac.lower() in _TRUE
    mp = env.get("ACCELERATE_MIXED_PRECISION")
    if mp in ("bf16", "fp16") and "mixed_precision" not in explicit:
        out["mixed_precision"] = mp
    return out


def resolve(cfg, algo=None, env=os.environ, cuda: bool | None = None) -> ParallelPlan:
    """The checked :class:`ParallelPlan` of run config ``cfg`` for compiled ``algo`` (optional)."""
    import torch
    if cuda is None:
        cuda = torch.cuda.is_available()
    world = world_size(env)
    s = {"parallel": cfg.parallel, "mixed_precision": cfg.mixed_precision,
         "gradient_checkpointing": cfg.gradient_checkpointing,
         "reshard_after_forward": cfg.reshard_after_forward}
    s.update(_from_launcher(cfg, env))
    plan = ParallelPlan(world=world, **s)
    lora = cfg.lora_r > 0 or cfg.lora_adapter is not None or _local_adapter(cfg.init_model or cfg.model)
    if plan.fsdp2:
        if world < 2:
            raise RunError("parallel=fsdp2 shards the model over processes, but this run has one process",
                           hint="launch several: torchrun --nproc_per_node 2 -m alignspec run ... "
                                "(or drop parallel=fsdp2)")
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError as e:
            raise RunError(f"parallel=fsdp2 needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") from e
        if lora:
            raise RunError("LoRA under parallel=fsdp2 is not supported yet",
                           hint="LoRA trains few parameters: use parallel=ddp (the default) with lora_r")
    if plan.mixed_precision != "no":
        if str(cfg.dtype) not in ("float32", "fp32"):
            raise RunError(f"mixed_precision={plan.mixed_precision} keeps float32 master weights, but "
                           f"dtype={cfg.dtype} stores the weights in low precision",
                           hint="use one: mixed_precision (float32 weights, low-precision compute) or dtype "
                                "(pure low-precision weights)")
        if plan.mixed_precision == "fp16":
            if not cuda:
                raise RunError("mixed_precision=fp16 needs a CUDA device (fp16 compute with loss scaling); "
                               "this machine has none", hint="use mixed_precision=bf16 on a CPU")
            if plan.fsdp2:
                raise RunError("mixed_precision=fp16 under parallel=fsdp2 is not supported (no sharded "
                               "loss scaler is wired up)", hint="use mixed_precision=bf16 with fsdp2")
    if cfg.qlora:
        if not lora:
            raise RunError("qlora trains LoRA adapters on a 4-bit base model, but LoRA is off",
                           hint="set lora_r (e.g. lora_r=16) or lora_adapter")
        import importlib.util
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RunError("qlora needs the bitsandbytes package, which is not installed",
                           hint="pip install bitsandbytes (or the qlora extra: pip install alignspec[qlora])")
    if cfg.lora_adapter is not None:
        from pathlib import Path

        from ..models.hub import looks_like_hub_id
        p = Path(cfg.lora_adapter).expanduser()
        if not (p / "adapter_config.json").is_file() and (p.exists() or not looks_like_hub_id(cfg.lora_adapter)):
            raise RunError(f"lora_adapter {p}: no adapter_config.json there",
                           hint="give a directory written by a PEFT model's save_pretrained")
    if algo is not None:
        _check_algorithm(plan, cfg, algo)
    return plan


def _local_adapter(model) -> bool:
    """``--model`` names a local PEFT adapter folder (models/adapter_model.py); a hub id is
    only known to be one once it is resolved, where the same checks run again."""
    if model is None:
        return False
    from pathlib import Path

    from ..models.hub import is_adapter_dir
    p = Path(str(model)).expanduser()
    return p.is_dir() and is_adapter_dir(p)


def _check_algorithm(plan: ParallelPlan, cfg, algo) -> None:
    """What the spec needs that a non-default plan does not cover yet."""
    if "flow" in algo.requires and (plan.fsdp2 or plan.mixed_precision != "no" or plan.gradient_checkpointing):
        raise RunError(f"{algo.name}: parallel, mixed_precision and gradient_checkpointing apply to causal LMs; "
                       "the flow policy family (family/flow_policy.py) does not support them yet",
                       hint="drop these settings for flow specs")
    if plan.fsdp2:
        from ..models.iterations import wants_iterate
        if wants_iterate(algo):
            raise RunError(f"{algo.name}: self-play iterations (an iterate or a replaced reference copy the "
                           "policy's whole weights) are not supported under parallel=fsdp2 yet",
                           hint="use parallel=ddp for this spec")
        if any(sp.kind == "rollout" for sp in algo.plan.sampler.walk()):
            raise RunError(f"{algo.name}: multi-turn episodes (the rollout sampler, rollout/episodes.py) under "
                           "parallel=fsdp2 are not supported yet", hint="use parallel=ddp for this spec")
        if "tree_search" in algo.requires or "reward_head" in algo.requires:
            raise RunError(f"{algo.name}: tree search and reward-model training "
                           "under parallel=fsdp2 are not supported yet",
                           hint="use parallel=ddp for this spec")
