"""Seeds derived from integers: the per step / process / round generators of a run, so that a
resumed run reproduces an uninterrupted one (loop/, rollout/, data/stream.py)."""

from __future__ import annotations


def mix(*xs) -> int:
    """A seed in [0, 2**31) from integers (FNV-style): per step / process / round generators."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h % (1 << 31)
