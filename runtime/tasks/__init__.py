"""The built-in tasks, for runs without data: each holds prompts, a reward and a warmed-up tiny
model. ``tasks.py`` (arithmetic; the cache of built-in models), ``step_task.py`` (step-wise
reasoning for tree search), ``tool_task.py`` (an agentic calculator task for ``rollout``)."""
