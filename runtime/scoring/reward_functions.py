"""Calling the configured reward functions as TRL's ``GRPOTrainer`` does.

``RewardFunctions(names, weights)`` is the run's ``reward`` scorer: ``scorer(prompts, texts,
records, completion_ids)`` -> one reward per completion. Each function (scoring/rewards.py for
the signature) is called once per batch with keyword arguments: ``prompts``, ``completions``
(text, or ``[{"role": "assistant", "content": text}]`` when the prompts are conversations),
``completion_ids``, every data column other than those (one value per completion) and
``trainer_state``. ``async def`` functions of a batch run concurrently on one event loop in a
worker thread (at most ``MAX_CONCURRENT`` at once), after the plain functions.

Values: one real number or ``None`` per completion. ``None`` means "this function does not
score this completion" (TRL): it counts as NaN in the function's ``rewards/<name>/mean`` and
``/std`` (nanmean, Bessel-corrected nanstd as TRL's ``nanstd``), and the weighted sum over
functions skips it (nansum); a row that no function scores gets reward 0 and a warning naming
the row. Anything else -- an exception, a non-list, the wrong length, a string, a nested list,
a complex number, NaN or inf -- stops the run with a message naming the function, the step and
the row.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import RunError, RunFailure
from .rewards import REGISTRY, resolve_reward

MAX_CONCURRENT = 8  # async reward functions awaited at once
RESERVED = ("prompt", "completion", "completion_ids")  # columns TRL does not pass as keyword arguments


@dataclass
class RunState:
    """The cheap part of TRL's ``TrainerState`` a reward may read (``trainer_state``)."""
    global_step: int = 0       # optimizer steps done before this batch
    max_steps: int = 0


def is_async(fn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def short_name(name: str) -> str:
    """A reward's name in metrics: the registry name, or ``function`` of ``module:function``."""
    return name.rpartition(":")[2] if ":" in name else name


class RewardFunctions:
    """The weighted sum of several reward functions, with each one's mean and std kept for the
    step's metrics (``pop_metrics``)."""

    def __init__(self, names: list[str], weights: list[float] | None = None, tokenizer=None,
                 builtin: dict | None = None):
        self.names = list(names)
        builtin = builtin or {}  # a built-in task's own rewards by name (not looked up, not imported)
        self.fns = [builtin[n] if n in builtin else resolve_reward(n) for n in names]
        if weights is not None and len(weights) and len(weights) != len(self.names):
            raise RunError(f"reward_weights has {len(weights)} values for {len(self.names)} rewards "
                           f"({', '.join(self.names)})", hint="give one weight per reward, in the same order")
        self.weights = [float(w) for w in weights] if weights else [1.0] * len(self.names)
        keys = [short_name(n) for n in self.names]
        self.keys = [k if keys.count(k) == 1 and (k == n or k not in REGISTRY) else n
                     for k, n in zip(keys, self.names)]
        self.tokenizer = tokenizer  # completion ids for callers that give only text (tree search)
        self.step: int | None = None
        self.state = RunState()
        self._seen: list[torch.Tensor] = []  # [B, F] per call since the last pop_metrics

    def __call__(self, prompts, completions, records, completion_ids=None) -> torch.Tensor:
        per_fn = self.values(prompts, completions, records, completion_ids)
        w = torch.tensor(self.weights, dtype=torch.float32)
        total = (per_fn * w).nansum(dim=1)
        unscored = torch.isnan(per_fn).all(dim=1)
        if unscored.any():
            i = int(unscored.nonzero()[0, 0])
            warnings.warn(f"{self._at()}every reward function returned None for row {i} (prompt "
                          f"{_short(prompts[i])}, completion {_short(completions[i])}); its reward is 0. "
                          f"Make sure at least one reward function scores each completion.", stacklevel=2)
        self._seen.append(per_fn)
        return total

    def values(self, prompts, completions, records, completion_ids=None) -> torch.Tensor:
        """``[B, F]`` rewards, NaN where a function returned None."""
        prompts, texts = list(prompts), list(completions)
        if completion_ids is None:
            completion_ids = ([self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
                              if self.tokenizer is not None else [None] * len(texts))
        chat = any(isinstance(p, list) for p in prompts)
        comps = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        kwargs = columns(records)
        kwargs.update(prompts=prompts, completions=comps, completion_ids=[list(c) if c is not None else None
                                                                          for c in completion_ids],
                      trainer_state=self.state)
        out = torch.full((len(texts), len(self.fns)), float("nan"))
        plain = [(i, n, f) for i, (n, f) in enumerate(zip(self.names, self.fns)) if not is_async(f)]
        for i, name, fn in plain:
            try:
                vals = fn(**kwargs)
            except RunError:
                raise
            except Exception as e:
                raise self._raised(name, e) from e
            out[:, i] = self._check(name, vals, texts)
        waiting = [(i, n, f) for i, (n, f) in enumerate(zip(self.names, self.fns)) if is_async(f)]
        if waiting:
            with ThreadPoolExecutor(1) as pool:  # its own event loop, also under a caller's running loop
                results = pool.submit(asyncio.run, _gather([f for _, _, f in waiting], kwargs)).result()
            for (i, name, _), res in zip(waiting, results):
                if isinstance(res, RunError):
                    raise res
                if isinstance(res, BaseException):
                    raise self._raised(name, res) from res
                out[:, i] = self._check(name, res, texts)
        return out

    def pop_metrics(self) -> dict:
        """``rewards/<name>/mean`` and ``/std`` over every completion scored since the last call."""
        if not self._seen:
            return {}
        allv = torch.cat(self._seen)
        self._seen = []
        out = {}
        for j, key in enumerate(self.keys):
            col = allv[:, j]
            out[f"rewards/{key}/mean"] = float(torch.nanmean(col))
            out[f"rewards/{key}/std"] = float(nanstd(col))
        return out

    # -- validation --------------------------------------------------------------------------------
    def _at(self) -> str:
        return f"step {self.step}: " if self.step is not None else ""

    def _raised(self, name, e) -> RunFailure:
        return RunFailure(f"{self._at()}reward {name!r} raised {type(e).__name__}: {e}",
                          hint="a reward function is called with keyword arguments prompts, completions, "
                               "completion_ids, each data column and trainer_state (TRL's signature; accept "
                               "**kwargs) and returns one number or None per completion")

    def _check(self, name, vals, completions) -> torch.Tensor:
        at = self._at()
        if isinstance(vals, (str, bytes, dict)) or not hasattr(vals, "__len__"):
            raise RunFailure(f"{at}reward {name!r} returned {type(vals).__name__} {_short(vals)} instead of a list "
                             f"of {len(completions)} numbers (one per completion)")
        vals = list(vals)
        if len(vals) != len(completions):
            raise RunFailure(f"{at}reward {name!r} returned {len(vals)} values for {len(completions)} completions")
        out = []
        for i, v in enumerate(vals):
            if v is None:
                out.append(float("nan"))  # not scored by this function (TRL)
                continue
            if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
                v = v.item()  # a NumPy or torch scalar
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise RunFailure(f"{at}reward {name!r} returned {_short(v)} ({type(v).__name__}) for row {i} "
                                 f"(completion {_short(completions[i])}); expected a real number or None")
            if not math.isfinite(v):
                raise RunFailure(f"{at}reward {name!r} returned {v} for row {i} (completion "
                                 f"{_short(completions[i])}); rewards must be finite (None skips a row)")
            out.append(float(v))
        return torch.tensor(out, dtype=torch.float32)


def columns(records) -> dict:
    """Every data column but the prompt and completion, one value per row (None where a row lacks it)."""
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys and k not in RESERVED)
    return {k: [r.get(k) for r in records] for k in keys}


async def _gather(fns, kwargs) -> list:
    gate = asyncio.Semaphore(MAX_CONCURRENT)

    async def one(fn):
        async with gate:
            return await fn(**kwargs)
    return await asyncio.gather(*(one(f) for f in fns), return_exceptions=True)


def nanstd(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std over the non-NaN values (NaN with fewer than two), as TRL's ``nanstd``."""
    ok = x[~torch.isnan(x)]
    return ok.std() if ok.numel() > 1 else torch.tensor(float("nan"))


def _short(v, n: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."
