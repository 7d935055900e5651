"""Scores of responses: reward functions and scorer models (``rewards.py``), calling TRL-style
reward functions with weights, None and async (``reward_functions.py``), how a run binds them
to the spec's external scores (``bind.py``), flow rewards (``flow_rewards.py``), embeddings for
the active selectors (``embedding.py``)."""
