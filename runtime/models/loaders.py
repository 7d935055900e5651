"""Loading policies and reference models from checkpoint directories or hub ids.

Everything goes through ``AutoModelForCausalLM`` / ``AutoTokenizer`` on a local directory --
a hub id is first resolved to its snapshot in the user's cache (``hub.resolve_model``) -- so
built-in tiny models (``tiny.build_tiny_model``) and users' checkpoints load the same way.
Every ``from_pretrained`` gets ``trust_remote_code`` explicitly (the run setting, default
false; ``hub.remote_code_check`` says which setting to change), never an interactive prompt.
``add_value_head`` wraps a policy with a scalar value head
for algorithms that need a critic sharing the policy body.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import RunError
from .hub import is_adapter_dir, remote_code_check, resolve_model

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "fp64": torch.float64}


def _resolve_dtype(dtype):
    """None/'auto' -> dtype stored in the checkpoint; a string name or torch.dtype otherwise."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise RunError(f"unknown dtype {dtype!r}", hint=f"use one of {sorted(set(_DTYPES))} or 'auto'")


def _check_model_dir(path, setting: str = "model", trust_remote_code: bool = False) -> Path:
    p = resolve_model(path, setting)
    if not p.exists():
        raise RunError(f"model directory not found: {p}",
                       hint="give a local directory written by save_pretrained, or a hub id such as "
                            "Qwen/Qwen2.5-0.5B-Instruct")
    if not p.is_dir():
        raise RunError(f"model path is not a directory: {p}",
                       hint="give the directory that holds config.json and the weights")
    if is_adapter_dir(p):  # (--model as an adapter is resolved before: models/adapter_model.py)
        raise RunError(f"{setting} {p} holds a PEFT adapter, not a full model",
                       hint="merge it into its base first (peft's merge_and_unload, then save_pretrained)")
    if not (p / "config.json").is_file():
        raise RunError(f"no model in {p}: config.json is missing",
                       hint="save the model with model.save_pretrained(dir)")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise RunError(f"no model weights in {p} (looked for {', '.join(_WEIGHT_FILES)})",
                       hint="save the model with model.save_pretrained(dir)")
    remote_code_check(p, trust_remote_code, setting)
    return p


def remote_code_error(e: Exception, p: Path, setting: str) -> RunError | None:
    """transformers' refusal of custom code as a RunError naming the setting (else None)."""
    if "trust_remote_code" in str(e):
        return RunError(f"{setting} {p} needs its own code to load, and trust_remote_code is false",
                        hint="read that code, then set trust_remote_code: true")
    return None


def _load_model(p: Path, dtype, device, extra: dict | None = None, trust_remote_code: bool = False,
                setting: str = "model"):
    try:  # parallel: `extra` = QLoRA's quantization_config (runtime/parallel/lora.py)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=_resolve_dtype(dtype), local_files_only=True,
                                                     trust_remote_code=trust_remote_code, **(extra or {}))
    except RunError:
        raise
    except Exception as e:  # transformers raises many kinds; say which directory failed
        raise remote_code_error(e, p, setting) or RunError(
            f"could not load a causal LM from {p}: {type(e).__name__}: {e}") from e
    if device is not None and not extra:  # parallel: a quantized model is placed by from_pretrained
        model = model.to(device)
    return model


def load_policy(path, dtype=None, device=None, extra: dict | None = None, trust_remote_code: bool = False,
                setting: str = "model"):
    """Load ``(model, tokenizer)`` from a checkpoint directory or a hub id (``setting`` names it
    in errors).

    ``dtype``: None/'auto' keeps the stored dtype, else a torch.dtype or a name such as
    'bfloat16'. The tokenizer gets ``padding_side='left'`` and, if it has none, the EOS
    token as pad token; the model's config and generation config get the same pad id.
    Raises ``RunError`` when the directory is missing or holds no model/tokenizer.
    """
    p = _check_model_dir(path, setting, trust_remote_code)
    tokenizer = load_tokenizer(p, trust_remote_code, setting)
    model = _load_model(p, dtype, device, extra, trust_remote_code, setting)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(p: Path, trust_remote_code: bool = False, setting: str = "model"):
    """The tokenizer in ``p`` with left padding and a pad token (EOS when it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise remote_code_error(e, p, setting) or RunError(
            f"could not load a tokenizer from {p}: {type(e).__name__}: {e}",
            hint="save the tokenizer next to the model with tokenizer.save_pretrained(dir)") from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RunError(f"the tokenizer in {p} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_frozen_copy(path, dtype=None, device=None, trust_remote_code: bool = False, setting: str = "model"):
    """Load a model for reference use: eval mode, every parameter ``requires_grad=False``."""
    model = _load_model(_check_model_dir(path, setting, trust_remote_code), dtype, device,
                        trust_remote_code=trust_remote_code, setting=setting)
    model.eval()
    model.requires_grad_(False)
    return model


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The plain ``...ForCausalLM`` inside a value-head wrapper and/or a PEFT model."""
    if isinstance(model, PolicyWithValueHead):
        model = model.model
    if hasattr(model, "get_base_model"):  # peft.PeftModel (LoRA layers stay injected)
        model = model.get_base_model()
    return model


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(transformer body, output layer)`` of a causal LM, e.g. ``(LlamaModel, lm_head)``.

    The body is ``model.base_model`` (``.model`` for Llama, ``.transformer`` for GPT-2),
    which returns hidden states without computing logits.
    """
    lm = unwrap_causal_lm(model)
    body = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if body is None or body is lm or head is None:
        raise RunError(f"{type(lm).__name__} does not look like a causal LM with a separate body "
                       "and output layer (base_model / get_output_embeddings)")
    return body, head


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head on its last hidden states.

    ``.model`` is the wrapped LM, ``.value_head`` a ``Linear(hidden, 1)`` kept in float32
    (zero-initialized, so initial values are 0). Get values either from hidden states
    returned by ``logprobs.completion_logprobs(..., return_hidden=True)`` via
    :meth:`values_from_hidden` (one body pass for log-probs and values), or for every
    position with :meth:`forward`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        hidden = model.config.hidden_size
        param = next(model.parameters())
        self.value_head = nn.Linear(hidden, 1, device=param.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.model.config

    def values_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` hidden states -> ``[...]`` float32 values."""
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Values ``[B, L]`` at every position (runs the LM body, not its output layer)."""
        body, _ = body_and_head(self.model)
        out = body(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False)
        return self.values_from_hidden(out[0])


def add_value_head(model: nn.Module) -> PolicyWithValueHead:
    """Wrap ``model`` in a :class:`PolicyWithValueHead`."""
    return PolicyWithValueHead(model)


def load_frozen_local(path, auto_cls, what: str, hint: str, device=None, trust_remote_code: bool = False,
                      setting: str = "model"):
    """(tokenizer, model, resolved path) of a frozen helper model (scorer, embedder) in a local
    dir or a hub id (``setting`` names it in errors).

    The model is in eval mode without gradients; a missing pad token falls back to EOS.
    """
    p = resolve_model(path, setting)
    if not (p / "config.json").is_file():
        raise RunError(f"no {what} in {p} ({setting}): config.json is missing", hint=hint)
    remote_code_check(p, trust_remote_code, setting)
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
        model = auto_cls.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise remote_code_error(e, p, setting) or RunError(
            f"could not load a {what} from {p}: {type(e).__name__}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return tok, model, p
