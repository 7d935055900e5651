"""What a run writes: checkpoints and the final model (``checkpoint.py``), metrics, progress
and plots (``metrics.py``), trackers (``tracking.py``)."""
