"""What a run writes: checkpoints, metrics and trackers (``tracking.py``)."""
