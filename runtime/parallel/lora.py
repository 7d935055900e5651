"""LoRA adapters from the run settings, or from an existing adapter directory; QLoRA.

``add_adapters(model, cfg)`` returns a ``peft`` model around ``model``:

- ``lora_adapter: DIR`` (or a hub id; or ``--model`` naming an adapter folder, models/adapter_model.py)
  starts from an adapter saved by a PEFT model (``adapter_config.json``
  + weights): its own rank, alpha, dropout and target modules, trainable;
- otherwise a fresh ``peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha or 2 * lora_r,
  lora_dropout=lora_dropout, target_modules=lora_target_modules)``.

QLoRA (``qlora: true``): :func:`quantized_load_kwargs` gives the ``from_pretrained`` arguments
of a 4-bit NF4 base (``bitsandbytes``; on a GPU, or slowly on a CPU, whose 4-bit kernels want
layer widths that are multiples of their block), and ``add_adapters`` prepares the quantized model for training (peft's
``prepare_model_for_kbit_training``) before the adapters go on.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RunError


def lora_config(cfg, reward_head: bool = False):
    """The ``peft.LoraConfig`` of the run settings."""
    from peft import LoraConfig
    targets = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=cfg.lora_dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      **({"task_type": "SEQ_CLS"} if reward_head else {}))


def add_adapters(model, cfg, reward_head: bool = False, adapter=None):
    """``model`` with trainable LoRA adapters (see the module docstring); ``adapter``: an adapter
    directory to continue (``--model`` given as a PEFT adapter folder), else ``lora_adapter``."""
    from peft import PeftModel, get_peft_model
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter is None and cfg.lora_adapter is not None:
        from ..models.hub import resolve_model
        adapter = resolve_model(cfg.lora_adapter, "lora_adapter")  # a directory or a hub id
    if adapter is not None:
        path = Path(adapter).expanduser()
        try:
            return PeftModel.from_pretrained(model, str(path), is_trainable=True)
        except Exception as e:  # peft raises several kinds: wrong base model, missing weights
            raise RunError(f"could not load the LoRA adapter in {path}: {type(e).__name__}: {e}",
                           hint="the adapter must have been trained on this base model") from e
    try:
        return get_peft_model(model, lora_config(cfg, reward_head))
    except ValueError as e:  # e.g. target modules that the model does not have
        raise RunError(f"LoRA: {e}", hint="check lora_target_modules against the model's module names") from e


def quantized_load_kwargs(cfg, device=None) -> dict:
    """``from_pretrained`` arguments of the 4-bit base model of QLoRA on ``device`` (a quantized
    model is placed while it loads, not moved afterwards); empty without qlora."""
    if not cfg.qlora:
        return {}
    import torch
    from transformers import BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_use_double_quant=True)
    return {"quantization_config": q, "device_map": {"": str(device if device is not None else "cpu")}}
