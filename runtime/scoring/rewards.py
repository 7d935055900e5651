"""Reward functions by name, user functions by ``module:function``, and scoring models.

Reward functions take TRL's signature (``GRPOTrainer``'s ``reward_funcs``) and are called with
keyword arguments only::

    def my_reward(prompts, completions, completion_ids, **kwargs) -> list[float | None]

``prompts`` are the data rows' prompts as written -- strings, or lists of ``{"role", "content"}``
messages for conversational data, never the chat-templated text the policy was given;
``completions`` are the decoded texts, or for conversational prompts one-message lists
``[{"role": "assistant", "content": text}]`` (as TRL); ``completion_ids`` the token ids; every
other column of the data row comes as a keyword argument holding one value per completion
(``answer=[...]``), plus ``trainer_state`` (``global_step``, ``max_steps``). A function may be
``async def``. Calling, weighting, None handling and validation: scoring/reward_functions.py.

Built-in names: ``exact_answer`` (1 if the completion, stripped, equals the row's
``answer``), ``format`` (1 if the completion is a non-empty run of digits -- the built-in
task's answer format), ``length`` (minus the completion's length in characters / 100).
``module:function`` strings are imported only when the run's configuration names them (an
explicit opt-in to running that code).

``SequenceScorer`` wraps an ``AutoModelForSequenceClassification`` directory: the score of a
response is the first logit on prompt + completion (+ EOS for a reward model alignspec
trained, whose config says ``alignspec_score_eos``: scored as it was trained, its prompts through
its tokenizer's chat template when they went through it in training). A conversational prompt
(a list of messages) is scored with the classifier's own chat template: the messages plus
an assistant message holding the completion. It serves ``reward_model(response)``
and, as a Bradley-Terry scorer with P(i > j) = sigmoid(s_i - s_j), ``preference(response)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import RunError
from ..user_code import import_named


def completion_text(c) -> str:
    """A completion as text: itself, or the content of a conversational completion's messages."""
    if isinstance(c, str):
        return c
    return "".join(str(m.get("content") or "") for m in c if isinstance(m, dict))


def exact_answer(prompts, completions, completion_ids=None, answer=None, **kwargs):
    if answer is None or any(a is None for a in answer):
        raise RunError("reward 'exact_answer' needs an 'answer' field in every data row",
                       hint="map one with fields: {answer: <your field>}")
    return [1.0 if completion_text(c).strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def format_reward(prompts, completions, completion_ids=None, **kwargs):
    return [1.0 if completion_text(c).strip().isdigit() else 0.0 for c in completions]


def length_reward(prompts, completions, completion_ids=None, **kwargs):
    return [-len(completion_text(c)) / 100.0 for c in completions]


REGISTRY: dict[str, Callable] = {
    "exact_answer": exact_answer,
    "format": format_reward,
    "length": length_reward,
}


def resolve_reward(name: str) -> Callable:
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        return import_named(name, "reward", "function", "rewards: [my_rewards:correct]")
    raise RunError(f"unknown reward {name!r}",
                   hint=f"use one of {', '.join(sorted(REGISTRY))}, or 'module:function'")


class SequenceScorer:
    """A scalar scorer from an ``AutoModelForSequenceClassification`` directory."""

    def __init__(self, path: str, device=None, batch_size: int = 32, trust_remote_code: bool = False,
                 setting: str = "reward_model"):
        from transformers import AutoModelForSequenceClassification

        from ..models.loaders import load_frozen_local
        self.tok, self.model, p = load_frozen_local(
            path, AutoModelForSequenceClassification, "sequence classifier",
            "give a directory written by save_pretrained of a sequence classifier", device,
            trust_remote_code=trust_remote_code, setting=setting)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.batch_size = batch_size
        self.path = str(p)

    @torch.no_grad()
    def __call__(self, prompts, completions, records, completion_ids=None) -> torch.Tensor:
        from ..data.prompts import PromptFormat, is_conversation
        if getattr(self.model.config, "alignspec_score_eos", False):
            # a reward model alignspec trained (runtime/models/reward_head.py): scored as it was trained,
            # at the EOS after prompt + completion, the prompt templated as in training
            from ..models.reward_head import TEMPLATE_FLAG, score_texts
            templated = getattr(self.model.config, TEMPLATE_FLAG, None)
            fmt = PromptFormat(self.tok, "auto" if templated is None else "on" if templated else "off",
                               source=self.path)
            return score_texts(self.model, self.tok, list(prompts), list(completions), self.batch_size,
                               prompt_format=fmt)
        chat = any(is_conversation(p) for p in prompts)
        texts = [self._chat_text(p, c) if chat else p + c for p, c in zip(prompts, completions)]
        out = []
        device = next(self.model.parameters()).device
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[s:s + self.batch_size], padding=True, return_tensors="pt",
                           add_special_tokens=not chat).to(device)
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out)

    def _chat_text(self, prompt, completion: str) -> str:
        """A conversational prompt + completion through the classifier's chat template."""
        from ..data.prompts import has_chat_template
        if not has_chat_template(self.tok):
            raise RunError(f"the prompts are lists of messages, but the tokenizer of the sequence classifier "
                           f"in {self.path} has no chat template",
                           hint="give its tokenizer a chat template, or write the prompts as plain text")
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
        messages.append({"role": "assistant", "content": completion})
        try:
            return self.tok.apply_chat_template(messages, tokenize=False)
        except Exception as e:
            raise RunError(f"the chat template of the sequence classifier in {self.path} failed: "
                           f"{type(e).__name__}: {e}") from e
