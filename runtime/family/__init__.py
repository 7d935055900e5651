"""The two policy families of the one loop, which wire models, parallel wrappers, data and
scorers together: ``token_policy.py`` (causal LMs; setup: ``lm_setup.py``; its checkpoint
files: ``lm_policy_io.py``; extras: ``lm_extras.py``; no-grad forwards: ``lm_forwards.py``;
held-out evaluation: ``evaluation.py``) and ``flow_policy.py`` (flow-matching policies; model
files: ``flow_io.py``). The loop (loop/engine.py) chooses one; nothing below imports them."""
