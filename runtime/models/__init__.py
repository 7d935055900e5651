"""Models: loaders (``loaders.py``, ``hub.py``, ``adapter_model.py``), the tiny built-in model
(``tiny.py``, ``tokenizer.py``), log-prob forwards (``logprobs.py``, ``fastpath.py``,
``kv_cache.py``, ``train_forward.py``: the module DDP wraps), the reward-model head
(``reward_head.py``), flow-matching models (``flow.py``), self-play iterates and per-iteration
params (``iterations.py``). The policy families that wire them into a run are in family/."""
