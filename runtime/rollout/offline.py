"""Samplers that read responses from the data: ``demonstration(prompt)``, the data's pairs and
its labelled unpaired completions."""

from __future__ import annotations

from .base import Sampler, register


def _row(run, rec: dict, field: str) -> dict:
    """The token row of record ``rec``'s prompt and its completion in ``field``."""
    return {"p": run.tok_prompt(rec["prompt"]), "c": run.tok_completion(rec[field]), "text": rec[field], "rec": rec}


def _conversation_row(run, rec: dict) -> dict:
    """A ``messages`` demonstration (data/formats.py): the conversation through the chat
    template, ``m`` = 1 only on the trained assistant turns (data/chat_masks.py); the prompt
    ``p`` is everything before the first trained token (cut to ``max_prompt_length``)."""
    from ..data.chat_masks import assistant_tokens
    ids, mask, k = assistant_tokens(run.prompt_format, rec["messages"], rec.get("train_from", 0))
    end = len(mask) - mask[::-1].index(1)  # nothing after the last trained token
    return {"p": run.prompt_format.fit(ids[:k]), "c": ids[k:end], "m": mask[k:end], "text": rec["response"], "rec": rec}


def _text_row(run, rec: dict) -> dict:
    """A language-modeling demonstration (``text`` alone, data/formats.py): the text with the
    tokenizer's special tokens, then EOS; every token after the first is trained."""
    ids = list(run.tokenizer(rec["response"])["input_ids"])
    if run.tokenizer.eos_token_id is not None:
        ids.append(run.tokenizer.eos_token_id)
    return {"p": ids[:1], "c": ids[1:], "text": rec["response"], "rec": rec}


def _demonstration_row(run, rec: dict) -> dict:
    if rec.get("lm_text"):
        return _text_row(run, rec)
    if "messages" in rec and "train_from" in rec:
        return _conversation_row(run, rec)
    return _row(run, rec, "response")


@register("demonstration")
class Demonstrations(Sampler):
    """One row per record: its ``response`` (a ``messages`` record: its assistant turns; a
    ``text`` record: all of it)."""

    def sample(self, recs, seed):
        return [[_demonstration_row(self.run, r)] for r in recs]


@register("pairs")
class Pairs(Sampler):
    """Two rows per record (``data pairs``): ``chosen``, then ``rejected``."""

    def sample(self, recs, seed):
        return [[_row(self.run, r, "chosen"), _row(self.run, r, "rejected")] for r in recs]


@register("unpaired")
class Unpaired(Sampler):
    """One labelled row per record (``data unpaired``, KTO): its ``completion``."""

    def sample(self, recs, seed):
        return [[_row(self.run, r, "completion")] for r in recs]
