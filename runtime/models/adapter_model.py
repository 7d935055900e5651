"""What ``--model`` (or ``init_model``) names, before the token-LM family loads it.

``resolve_policy_source(run, name, setting)`` returns ``(base, adapter)``:

- a local directory or a hub id of a full model (hub ids resolved to their snapshot in the
  user's cache, hub.py): ``(that directory, None)``;
- a PEFT adapter folder (``adapter_config.json`` and no full model: hub.is_adapter_dir), local
  or on the hub: its ``base_model_name_or_path`` (itself a local directory or a hub id) and the adapter
  folder, which ``parallel/lora.add_adapters`` loads trainable on that base -- the same path
  as the ``lora_adapter`` setting, so the adapter keeps its own rank, alpha and targets, and
  with a spec that reads ``logp_ref`` the reference is the base (adapters disabled), as
  TRL does for a PEFT model.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RunError
from .hub import adapter_base, is_adapter_dir, looks_like_hub_id, resolve_model


def resolve_policy_source(run, name, setting: str = "model") -> tuple[str, Path | None]:
    cfg = run.cfg
    raw = str(name)
    p = resolve_model(raw, setting)
    if p.exists() and not Path(raw).expanduser().exists() and looks_like_hub_id(raw):
        run.say(f"{setting}: {raw} from the hub cache ({p})")
    if not is_adapter_dir(p):
        return str(p), None
    if cfg.lora_adapter is not None:
        raise RunError(f"{setting} {p} is a PEFT adapter and lora_adapter {cfg.lora_adapter} is set too",
                       hint="give the adapter once: as --model (its base is loaded) or as lora_adapter with "
                            "the base as --model")
    if cfg.lora_r > 0:
        raise RunError(f"{setting} {p} is a PEFT adapter, which brings its own rank, and lora_r={cfg.lora_r} "
                       "asks for new adapters", hint="drop lora_r to continue training this adapter")
    if getattr(run, "reward_head", False):
        raise RunError(f"{setting} {p} is a PEFT adapter; training a reward model from an adapter folder is not "
                       "supported yet", hint="merge the adapter into its base first (merge_and_unload)")
    plan = getattr(run, "parallel_plan", None)
    if plan is not None and plan.fsdp2:
        raise RunError("LoRA under parallel=fsdp2 is not supported yet (the model is a PEFT adapter)",
                       hint="use parallel=ddp (the default)")
    base = adapter_base(p)
    base_dir = resolve_model(base, f"{setting} {p}'s base_model_name_or_path")
    if base_dir.exists() and is_adapter_dir(base_dir):
        raise RunError(f"{setting} {p}: its base {base} is itself an adapter",
                       hint="merge the first adapter into its base, and point base_model_name_or_path there")
    run.say(f"{setting}: the PEFT adapter in {p} on its base {base}; the adapter is trained further")
    return str(base_dir), p
