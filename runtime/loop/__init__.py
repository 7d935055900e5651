"""The run loop: rollout -> score, filter, select -> no-grad forwards -> advantage -> updates
-> checkpoint and metrics (``engine.py``, ``base.py``), self-play iterations (``iterations.py``)."""
