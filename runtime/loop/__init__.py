"""The one run loop (``engine.py``) and its stages: rollout, score, filter, select
(``rollout_stage.py``), updates (``update.py``); the run around the steps (``base.py``)."""
