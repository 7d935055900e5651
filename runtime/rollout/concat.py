"""``concat(a, b, ...)``: each prompt's group is the groups of its parts, in order."""

from __future__ import annotations

from ..seeds import mix as _mix
from .base import Sampler, build_sampler, register


@register("concat")
class Concat(Sampler):
    def __init__(self, plan, run):
        super().__init__(plan, run)
        self.parts = [build_sampler(p, run) for p in plan.parts]

    def sample(self, recs, seed):
        parts = [s.sample(recs, _mix(seed, k)) for k, s in enumerate(self.parts)]
        return [sum((p[i] for p in parts), []) for i in range(len(recs))]
