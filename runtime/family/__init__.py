"""The two policy families of the one loop, which wire models, parallel wrappers, data and
scorers together. ``base.py``: the protocol the loop calls (``PolicyFamily``); ``state.py``:
the run state that a family's ``setup`` returns (``RunState``: who sets and who changes each
field). The families: ``token_policy.py`` (causal LMs; setup: ``lm_setup.py``; its checkpoint
files: ``lm_policy_io.py``; extras: ``lm_extras.py``; no-grad forwards: ``lm_forwards.py``;
held-out evaluation: ``evaluation.py``) and ``flow_policy.py`` (flow-matching policies; model
files: ``flow_io.py``). The loop (loop/engine.py) chooses one; nothing below imports them."""
