"""Samplers that read responses from the data: ``demonstration(prompt)``, the data's pairs and
its labelled unpaired completions."""

from __future__ import annotations

from .base import Sampler, register


@register("demonstration")
class Demonstrations(Sampler):
    """One row per record: its ``response``."""

    def sample(self, recs, seed):
        run = self.run
        return [[{"p": run.tok_prompt(r["prompt"]), "c": run.tok_completion(r["response"]),
                  "text": r["response"], "rec": r}] for r in recs]


@register("pairs")
class Pairs(Sampler):
    """Two rows per record (``data pairs``): ``chosen``, then ``rejected``."""

    def sample(self, recs, seed):
        run = self.run
        return [[{"p": run.tok_prompt(r["prompt"]), "c": run.tok_completion(r["chosen"]),
                  "text": r["chosen"], "rec": r},
                 {"p": run.tok_prompt(r["prompt"]), "c": run.tok_completion(r["rejected"]),
                  "text": r["rejected"], "rec": r}] for r in recs]


@register("unpaired")
class Unpaired(Sampler):
    """One labelled row per record (``data unpaired``, KTO): its ``completion``."""

    def sample(self, recs, seed):
        run = self.run
        return [[{"p": run.tok_prompt(r["prompt"]), "c": run.tok_completion(r["completion"]),
                  "text": r["completion"], "rec": r}] for r in recs]
