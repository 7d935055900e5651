"""Samplers behind one interface, chosen by the run plan (``base.py``: ``Sampler``, ``register``,
``build_sampler``): ``generate`` (generate.py; token sampling: generation.py, sampling.py),
``demonstration`` and ``pairs`` (offline.py), ``concat`` (concat.py), ``tree_search``
(tree.py; the search: mcts_sampler.py, tree_search.py), ``flow_sde`` (flow_sde.py), ``rollout`` (episodes.py: multi-turn episodes with envs.py, tools.py)."""

# The samplers register themselves (``@register``) as their modules are imported: here, never
# from base.py, which the sampler modules import.
from . import concat, episodes, flow_sde, generate, offline, tree  # noqa: E402,F401  (registration)
from . import vllm_samplers  # noqa: E402,F401  (use_vllm's samplers; vllm itself is imported when an engine starts)
