"""Samplers that read responses from the data: ``demonstration(prompt)``, the data's pairs and
its labelled unpaired completions."""

from __future__ import annotations

from .base import Sampler, register


def _row(run, rec: dict, field: str) -> dict:
    """The token row of record ``rec``'s prompt and its completion in ``field``."""
    return {"p": run.tok_prompt(rec["prompt"]), "c": run.tok_completion(rec[field]), "text": rec[field], "rec": rec}


@register("demonstration")
class Demonstrations(Sampler):
    """One row per record: its ``response``."""

    def sample(self, recs, seed):
        return [[_row(self.run, r, "response")] for r in recs]


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
