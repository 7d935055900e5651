"""Stop strings: where a completion ends, and a watcher that ends sampling there early.

``stop_at(ids, mask, tokenizer, stop)`` is the definition: the mask is cut after the token that
completes the first of the ``stop`` strings in the row's decoded text (the token is kept, as
``generate(stop_strings=...)``'s StopStringCriteria stops after it).

``StopWatcher`` lets a sampling loop stop drawing tokens for a row as soon as one of the
strings appears, instead of sampling to ``max_new_tokens`` and cutting afterwards. It decodes
only the tail of each live row (``window`` tokens: enough to hold the longest stop string,
since a token decodes to at least one character, plus slack for tokens that decode to
nothing); because every step is checked, the first string to appear is always caught in the
step that completes it. The loop's result is then cut by ``stop_at`` as before, so the
watcher changes the compute spent, never the completions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stop_at(ids: torch.Tensor, mask: torch.Tensor, tokenizer, stop: Sequence[str]) -> torch.Tensor:
    """``mask`` cut after the token that completes the first of the ``stop`` strings in each row's
    decoded text (the token is kept, as ``generate``'s StopStringCriteria stops after it)."""
    mask = mask.clone()
    for i, (row, m) in enumerate(zip(ids.cpu(), mask.cpu())):
        toks = row[m.bool()].tolist()
        text = tokenizer.decode(toks, skip_special_tokens=True)
        ends = [text.find(s) + len(s) for s in stop if s and s in text]
        if not ends:
            continue
        end, lo, hi = min(ends), 1, len(toks)  # the fewest tokens whose text reaches `end`
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(toks[:mid], skip_special_tokens=True)) >= end:
                hi = mid
            else:
                lo = mid + 1
        mask[i, lo:] = 0
    return mask


class StopWatcher:
    """``hits(toks, live)``: which live rows' recent tokens contain one of the stop strings."""

    SLACK = 16  # tokens beyond the longest string's length, for tokens that decode to ""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.window = max((len(s) for s in self.stop), default=0) + self.SLACK

    def __bool__(self) -> bool:
        return bool(self.stop)

    def hits(self, toks: list[torch.Tensor], live: torch.Tensor) -> torch.Tensor:
        """``toks``: the ``[B]`` tokens drawn so far, one tensor a step; ``live`` ``[B]`` bool.
        Returns ``[B]`` bool, True where a live row's text now holds a stop string."""
        out = torch.zeros_like(live)
        rows = live.nonzero().flatten().tolist()
        if not rows or not self.stop:
            return out
        tail = torch.stack(toks[-self.window:], 1)[rows].tolist()
        for r, seq in zip(rows, tail):
            text = self.tokenizer.decode(seq, skip_special_tokens=True)
            if any(s in text for s in self.stop):
                out[r] = True
        return out
