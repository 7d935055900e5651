"""Scores of responses: reward functions and scorer models (``rewards.py``), embeddings for
the active selectors (``embedding.py``)."""
