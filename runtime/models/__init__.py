"""Models and policies: loaders (``loaders.py``), the tiny built-in model (``tiny.py``,
``tokenizer.py``), log-prob forwards (``logprobs.py``, ``fastpath.py``, ``train_forward.py``),
the reward-model head (``reward_head.py``), the flow-matching family (``flow.py``)."""
