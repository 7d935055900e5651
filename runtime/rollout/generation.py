"""Sampling groups of completions per prompt with ``model.generate`` (KV cache).

``generate_groups`` returns a :class:`Rollout` whose rows are grouped contiguously
(rows ``i*n .. i*n+n-1`` are the completions of prompt ``i``), matching the group layout
in docs/contracts.md. Masks are integer (0/1) tensors, usable as attention masks; cast
``completion_mask`` to float for action-level losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import sampling
from .stops import StopWatcher, stop_at  # noqa: F401  (stop_at: the definition of where a completion ends)
from ..models.loaders import unwrap_causal_lm


@dataclass
class Rollout:
    """Prompts and sampled completions, ``B = len(prompts) * n`` rows.

    prompt_ids/prompt_mask ``[B, P]`` (left-padded), completion_ids/completion_mask
    ``[B, T]`` (mask is 1 up to and including the first EOS), ``texts`` the decoded valid
    completion tokens without special tokens, ``prompt_index`` ``[B]`` the prompt of each row.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    prompt_index: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None  # [B, T] when asked for: see generate_groups

    @property
    def input_ids(self) -> torch.Tensor:
        """``[B, P + T]`` prompt ++ completion, the layout ``completion_logprobs`` expects."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[B, P + T]`` prompt_mask ++ completion_mask."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def completion_mask_from_ids(ids: torch.Tensor, eos_id: int | Sequence[int]) -> torch.Tensor:
    """``[B, T]`` long mask: 1 up to and including the first EOS of each row, 0 after it.

    Rows without EOS are all 1. ``eos_id`` may be one id or several.
    """
    eos = torch.as_tensor(eos_id, device=ids.device).reshape(-1)
    is_eos = torch.isin(ids, eos).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # number of EOS strictly before each position
    return (eos_before == 0).long()


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


@torch.no_grad()
def generate_groups(model, tokenizer, prompts: list, n: int, *, max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                    generator_seed: int | None = None, fast: bool = True, prompt_format=None,
                    sampler_logprobs: bool = False, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: float = 1.0, stop: Sequence[str] = ()) -> Rollout:
    """Sample ``n`` completions for each prompt; greedy when ``temperature == 0`` or not
    ``do_sample``. Sampling is temperature / top-k (0: off) / top-p / min-p (0: off), with
    ``repetition_penalty`` (1: off; also when greedy), as ``generate``'s processors compute them.
    A completion ends at its first EOS or at the token that completes one of the ``stop``
    strings (kept in the text, as ``generate(stop_strings=...)``; ``stop_at``), on both paths; both
    stop drawing a row's tokens as soon as its text holds one (the fast path through
    ``stops.StopWatcher``, ``generate`` through its own ``stop_strings``). ``generator_seed`` makes
    the draw reproducible without touching the global RNG state. The model is put in eval
    mode for the call and restored afterwards.

    ``fast`` (default): :func:`sampling.sample_groups` -- each prompt prefilled once, inverse-CDF
    sampling -- when :func:`sampling.supported` says the model and its generation config allow
    it; otherwise (or with ``fast=False``) ``model.generate``. Both sample the same
    distribution, with different random streams.

    ``prompt_format`` (a :class:`prompts.PromptFormat` of ``tokenizer``) renders each prompt --
    a string or a list of messages -- as the policy sees it (the chat template when the run
    uses one); None: the raw strings, with the tokenizer's special tokens.

    ``sampler_logprobs``: also record ``Rollout.sampler_logprobs`` ``[B, T]``, the log-prob of
    each drawn token under the distribution the sampler drew it from (temperature and top-p
    applied, through the sampler's own forward and KV cache; greedy: the model's log-softmax),
    0 after the completion's end.
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError("n and max_new_tokens must be >= 1")
    lm = unwrap_causal_lm(model)
    device = next(lm.parameters()).device
    from ..data.prompts import PromptFormat
    enc = (prompt_format or PromptFormat.raw(tokenizer)).encode(list(prompts))
    prompt_ids = enc["input_ids"].repeat_interleave(n, dim=0).to(device)
    prompt_mask = enc["attention_mask"].repeat_interleave(n, dim=0).to(device)
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(n)

    eos = _eos_ids(lm, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, use_cache=True,
                  repetition_penalty=float(repetition_penalty) if repetition_penalty != 1.0 else None)
    if eos:
        kwargs["eos_token_id"] = eos
    if do_sample and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                      min_p=float(min_p) if min_p > 0 else None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    was_training = lm.training
    lm.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        if fast and sampling.supported(lm):
            gen = None
            if generator_seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(int(generator_seed))
            steps = [] if sampler_logprobs else None
            completion_ids = sampling.sample_groups(
                lm, enc["input_ids"].to(device), enc["attention_mask"].to(device), n,
                max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad_id, temperature=float(temperature),
                top_p=float(top_p), greedy=not (do_sample and temperature > 0), generator=gen, logprobs=steps,
                top_k=int(top_k), min_p=float(min_p), repetition_penalty=float(repetition_penalty),
                stop=StopWatcher(tokenizer, stop) if stop else None)
            lp = torch.stack(steps, 1) if sampler_logprobs else None
        else:
            if stop:  # generate's StopStringCriteria ends a row at the token completing a string
                kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
            if sampler_logprobs:  # the processed scores: logits after temperature / top-p
                kwargs.update(output_scores=True, return_dict_in_generate=True)
            with torch.random.fork_rng(devices=devices, enabled=generator_seed is not None):
                if generator_seed is not None:
                    torch.manual_seed(generator_seed)
                out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
            seqs = out.sequences if sampler_logprobs else out
            completion_ids = seqs[:, prompt_ids.shape[1]:]
            lp = None
            if sampler_logprobs:
                lp = torch.stack([torch.log_softmax(sc.float(), -1).gather(-1, completion_ids[:, t:t + 1]).squeeze(-1)
                                  for t, sc in enumerate(out.scores)], 1)
    finally:
        lm.train(was_training)

    if eos:
        completion_mask = completion_mask_from_ids(completion_ids, eos)
    else:
        completion_mask = torch.ones_like(completion_ids)
    if stop:
        completion_mask = stop_at(completion_ids, completion_mask, tokenizer, stop)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
    if lp is not None:
        lp = lp.masked_fill(completion_mask == 0, 0.0)
    texts = [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
             for row, m in zip(completion_ids.cpu(), completion_mask.cpu())]
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, prompt_index, lp)
