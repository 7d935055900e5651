"""Models and the two policy families of the one loop: ``token_policy.py`` (causal LMs; its
checkpoint files: ``lm_policy_io.py``; extras: ``lm_extras.py``) and ``flow_policy.py``
(flow-matching policies: ``flow.py``, ``flow_io.py``). Loaders (``loaders.py``), the tiny
built-in model (``tiny.py``, ``tokenizer.py``), log-prob forwards (``logprobs.py``,
``fastpath.py``, ``train_forward.py``: the module DDP wraps), the reward-model head
(``reward_head.py``)."""
