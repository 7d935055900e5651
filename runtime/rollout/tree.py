"""``tree_search(prompt, simulations, branching, depth, c_puct, temperature)``: sibling-step
pairs from an MCTS over reasoning steps (the search: mcts_sampler.py, tree_search.py)."""

from __future__ import annotations

from .base import Sampler, register


@register("tree_search")
class TreeSearch(Sampler):
    """Pairs (chosen, rejected) of sibling steps; may yield fewer groups than prompts (the
    rest wait in the run's ``tree_sampler`` buffer), which the plan's refill covers."""

    def sample(self, recs, seed):
        run = self.run
        model = run.policy if getattr(run, "iterate", None) is None else run.iterate
        return run.tree_sampler.groups(model, recs, seed=seed, **dict(self.plan.options))
