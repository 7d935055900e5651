"""Rewards of a flow-policy run: the sum of the configured ``task`` (the built-in task's) or
``module:function`` rewards, each ``fn(samples [B, D], classes [B]) -> [B]``."""

from __future__ import annotations

import torch

from ..errors import RunError
from ..models.flow import FlowTask


class FlowRewards:
    """The sum of the configured rewards: ``task`` or ``module:function``."""

    def __init__(self, names: list[str], task: FlowTask):
        from .rewards import resolve_reward
        self.names, self.fns = list(names), []
        for n in self.names:
            if n == "task":
                self.fns.append(task.reward)
            elif ":" in n:
                self.fns.append(resolve_reward(n))
            else:
                raise RunError(f"reward {n!r} is a text reward; a flow policy is scored on its samples",
                               hint="use 'task' (the built-in task's reward) or 'module:function' taking "
                                    "(samples [B, D], classes [B]) and returning [B] rewards")

    def __call__(self, samples: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(samples.shape[0], dtype=torch.float32)
        for name, fn in zip(self.names, self.fns):
            vals = fn(samples, classes)
            vals = torch.as_tensor(vals, dtype=torch.float32).reshape(-1)
            if vals.shape[0] != samples.shape[0]:
                raise RunError(f"reward {name!r} returned {vals.shape[0]} values for {samples.shape[0]} samples")
            total += vals
        return total
