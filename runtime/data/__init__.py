"""Where rows come from: data files (``records.py``), prompts and chat templates
(``prompts.py``), the built-in tasks (``tasks.py``, ``step_task.py``, the agentic
``tool_task.py``), token rows and their
tensors (``token_rows.py``)."""
