"""Tiny built-in causal LMs made from a transformers config (no download).

``build_tiny_model`` writes an ordinary Hugging Face checkpoint directory (config,
safetensors weights, generation config, char tokenizer), so the built-in models and a
user's checkpoint go through exactly the same loading path (``models.load_policy``).
The default (hidden 64, 2 layers, 4 heads, char vocab of 49) has about 100k parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from .tokenizer import build_char_tokenizer

ARCHS = ("llama", "gpt2")


def _special_ids() -> dict[str, int]:
    tok = build_char_tokenizer()
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}


def tiny_config(
    arch: str = "llama",
    vocab_size: int | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 256,
    tie_embeddings: bool | None = None,
    **extra,
) -> PretrainedConfig:
    """Config of a tiny Llama or GPT-2; ``vocab_size`` defaults to the char tokenizer's size.

    pad/bos/eos ids match the char tokenizer. Dropout is off (GPT-2's default 0.1 would make
    log-probs stochastic in train mode). GPT-2 ties its output layer to the input embedding
    by default, Llama does not; ``tie_embeddings`` overrides. ``kv_heads`` (Llama) sets
    grouped-query attention; other ``extra`` keys go to the config.
    """
    if vocab_size is None:
        vocab_size = len(build_char_tokenizer())
    ids = _special_ids()
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate or (hidden * 8) // 3,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=extra.pop("kv_heads", heads),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(tie_embeddings),
            **ids,
            **extra,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=intermediate,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True if tie_embeddings is None else tie_embeddings,
            **ids,
            **extra,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")


def build_tiny_model(dir: str | os.PathLike, arch: str = "llama", seed: int = 0, **cfg) -> str:
    """Build a randomly initialized tiny model and save it with its tokenizer to ``dir``.

    ``cfg`` goes to :func:`tiny_config`. Weights are saved as safetensors in float32.
    Returns ``dir`` as a string.
    """
    config = tiny_config(arch, **cfg)
    tokenizer = build_char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = model.generation_config
    gen.pad_token_id = config.pad_token_id
    gen.bos_token_id = config.bos_token_id
    gen.eos_token_id = config.eos_token_id
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)
