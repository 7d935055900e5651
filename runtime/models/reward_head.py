"""The reward model being trained: ``rm_score``, a sequence-classification head on an LM body.

A spec that reads ``rm_score`` (``requires`` holds ``reward_head``, e.g.
``algorithms/reward_model.align``) trains an ``AutoModelForSequenceClassification`` with
``num_labels = 1`` built from the run's model: the body's weights come from the policy
checkpoint (the built-in tiny model or ``--model``; or an earlier reward model, whose head
is then kept), the score head is new. The score of a response is the head's logit at the
last valid token of prompt ++ response ++ EOS -- the same token TRL's reward trainer and its
PPO trainer read -- computed with position ids from the attention mask, so padding (left of
the prompt, right of the response) never moves it.

The saved model (``OUT/model``) loads with ``AutoModelForSequenceClassification``; its
config carries ``alignspec_score_eos = True``, which tells ``rewards.SequenceScorer`` to
append EOS before scoring, and ``alignspec_chat_template`` (whether the prompts went through
the tokenizer's chat template, runtime/data/prompts.py), so a downstream
``reward_model(response)`` scores a response exactly as it was trained.

``eval_score`` of such a run is the pairwise accuracy on held-out pairs: the fraction of
(chosen, rejected) pairs with ``s(chosen) > s(rejected)`` (a tie counts one half). On the
built-in task the reward model trains on each training problem's answer against every other
sum 0..18 (1275 pairs; ``builtin_training_pairs`` says why), and the held-out pairs are every
held-out problem's right answer against each wrong sum within 2 of it (99 pairs, the hard
ones); on user data, a seeded 10 % of the pairs (at least 1, when there are at least 10) is
held out of training.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..errors import RunError

SCORE_EOS_FLAG = "alignspec_score_eos"
TEMPLATE_FLAG = "alignspec_chat_template"
HELDOUT_FRACTION = 0.1


def load_reward_model(path, dtype=None, device=None, trust_remote_code: bool = False):
    """``(AutoModelForSequenceClassification with num_labels=1, tokenizer)`` from ``path``.

    ``path`` holds a causal LM (the head is then newly initialised, from the current torch
    seed) or a sequence classifier with one label (loaded as is).
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from .loaders import _check_model_dir, _resolve_dtype, load_tokenizer, remote_code_error
    p = _check_model_dir(path, "model", trust_remote_code)
    tokenizer = load_tokenizer(p, trust_remote_code)  # pad token, left padding: exactly as for a policy
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised: score.weight" is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            p, num_labels=1, dtype=_resolve_dtype(dtype), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise remote_code_error(e, p, "model") or RunError(
            f"could not build a sequence classifier (reward model) from {p}: {type(e).__name__}: {e}",
            hint="the model's architecture needs an AutoModelForSequenceClassification class") from e
    finally:
        hf_logging.set_verbosity(level)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    setattr(model.config, SCORE_EOS_FLAG, True)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def mark_template(model, templated: bool) -> None:
    """Record in the reward model's config whether its prompts are chat-templated."""
    setattr(_unwrap(model).config, TEMPLATE_FLAG, bool(templated))


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32: the classifier's first logit at each row's last valid token.

    Runs the body (``base_model``) once with position ids from ``attention_mask`` and
    applies the score head to the hidden state of the last position whose mask is 1, so the
    result does not depend on where the padding is. Classifiers without a ``score`` head
    fall back to ``model(...).logits[:, 0]``.
    """
    m = _unwrap(model)
    att = attention_mask.long()
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    head = getattr(m, "score", None)
    body = getattr(m, "base_model", None)
    if head is None or body is None or body is m:
        return m(input_ids=input_ids, attention_mask=att).logits[:, 0].float()
    out = body(input_ids=input_ids, attention_mask=att, position_ids=pos, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    L = att.shape[1]
    last = (L - 1) - att.flip(-1).argmax(-1)          # index of the last 1 in each row
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    w = head.weight if hasattr(head, "weight") else None
    if w is not None:
        h = h.to(w.dtype)
    return head(h)[:, 0].float()


def encode(tokenizer, prompt, response: str, eos: bool = True, prompt_format=None) -> list[int]:
    """prompt ++ response ++ EOS, as the engine tokenizes rows: the prompt through
    ``prompt_format`` (runtime/data/prompts.py; None: the raw string with the tokenizer's special
    tokens), the response without special tokens."""
    from ..data.prompts import PromptFormat
    fmt = prompt_format or PromptFormat.raw(tokenizer)
    ids = fmt.ids(prompt) + list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s)
            att[i, L - len(s):] = 1
    return ids.to(device), att.to(device)


@torch.no_grad()
def score_texts(model, tokenizer, prompts, responses, batch_size: int = 64, eos: bool = True,
                prompt_format=None) -> torch.Tensor:
    """``[N]`` scores of prompt + response (+ EOS) under a sequence classifier (prompts
    through ``prompt_format``, as in :func:`encode`)."""
    m = _unwrap(model)
    device = next(m.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was = m.training
    m.eval()
    try:
        out = []
        for s in range(0, len(prompts), batch_size):
            seqs = [encode(tokenizer, p, r, eos, prompt_format)
                    for p, r in zip(prompts[s:s + batch_size], responses[s:s + batch_size])]
            ids, att = left_pad(seqs, pad, device)
            out.append(sequence_scores(model, ids, att).cpu())
    finally:
        m.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs with s(chosen) > s(rejected); a tie counts 1/2."""
    if chosen.numel() == 0:
        return float("nan")
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())


def builtin_training_pairs(task) -> list[dict]:
    """Every training problem's answer against every other sum of two digits (0..18).

    The reward model's pairs on the built-in task: a policy trained against the reward model
    samples more than the nearby wrong sums the task's own pairs hold (those suit DPO), and
    a reward model that never saw "4+8=3" may well score it above "4+8=12" -- PPO then finds
    it. InstructGPT likewise trains on all comparisons among a prompt's ranked responses."""
    rows = []
    for a, b in task.train_problems:
        s = a + b
        rows.extend({"prompt": f"{a}+{b}=", "answer": str(s), "chosen": str(s), "rejected": str(w)}
                    for w in range(19) if w != s)
    return rows


def builtin_heldout_pairs(task) -> list[dict]:
    """Every held-out problem's answer against each wrong sum within 2 of it (0..18)."""
    rows = []
    for a, b in task.eval_problems:
        s = a + b
        for w in (s - 2, s - 1, s + 1, s + 2):
            if 0 <= w <= 18:
                rows.append({"prompt": f"{a}+{b}=", "chosen": str(s), "rejected": str(w)})
    return rows


def split_heldout(records: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): a seeded 10 % held out when there are >= 10 rows."""
    n = len(records)
    if n < 10:
        return records, []
    k = max(1, int(round(HELDOUT_FRACTION * n)))
    idx = list(range(n))
    random.Random(seed * 1000003 + 17).shuffle(idx)
    held = set(idx[:k])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


class PairwiseEval:
    """Stands in for the task's evaluation in a reward-model run: ``eval_score`` is the
    pairwise accuracy on ``pairs``; everything else is the wrapped task's (if any)."""

    def __init__(self, pairs: list[dict], task=None):
        self.pairs = list(pairs)
        self.task = task
        self.name = getattr(task, "name", "held-out pairs")
        self.max_new_tokens = getattr(task, "max_new_tokens", 1)

    def __getattr__(self, item):
        task = self.__dict__.get("task")
        if task is None:
            raise AttributeError(item)
        return getattr(task, item)

    def scores(self, model, tokenizer, size=None, prompt_format=None):
        pairs = self.pairs[:size] if size else self.pairs
        prompts = [p["prompt"] for p in pairs]
        c = score_texts(model, tokenizer, prompts, [p["chosen"] for p in pairs], prompt_format=prompt_format)
        r = score_texts(model, tokenizer, prompts, [p["rejected"] for p in pairs], prompt_format=prompt_format)
        return c, r

    def eval_score(self, model, tokenizer, size=None, prompt_format=None) -> float:
        c, r = self.scores(model, tokenizer, size, prompt_format)
        return pairwise_accuracy(c, r)


def is_reward_model_dir(path) -> bool:
    """Whether ``path`` holds a reward model this module wrote (or any 1-label classifier)."""
    import json
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except ValueError:
        return False
    archs = data.get("architectures") or []
    return bool(data.get(SCORE_EOS_FLAG)) or any(a.endswith("ForSequenceClassification") for a in archs)
