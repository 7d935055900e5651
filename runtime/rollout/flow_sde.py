"""``flow_sde(prompt, n, steps, noise)``: n SDE trajectories per class prompt of a flow policy."""

from __future__ import annotations

import torch

from ..models.flow import rollout
from .base import Sampler, register


@register("flow_sde")
class FlowSDE(Sampler):
    """``prompts`` is how many class prompts to draw; they are drawn, then sampled, from one
    generator seeded with ``seed`` (models/flow.py: ``rollout``)."""

    def sample(self, prompts: int, seed: int):
        run = self.run
        g = torch.Generator().manual_seed(seed)
        classes = torch.randint(0, run.task.num_classes, (prompts,), generator=g)
        was = run.model.training
        run.model.eval()
        ro = rollout(run.model, classes, int(self.option("n")), int(self.option("steps")),
                     float(self.option("noise")), generator=g, with_logp_old=False)
        run.model.train(was)
        run.counts["rollouts"] += 1
        return ro
