"""The KV cache of a causal LM's forward, across transformers versions (models/logprobs.py,
rollout/sampling.py)."""

from __future__ import annotations

import inspect


def cache_kwarg(lm) -> str | None:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def new_cache(lm):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=lm.config)
    except TypeError:
        return DynamicCache()
