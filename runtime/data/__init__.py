"""Where rows come from: data files (``records.py``; opened for a run, streamed or not:
``stream.py``), prompts and chat templates (``prompts.py``), token rows and their tensors
(``token_rows.py``). The built-in tasks are in tasks/."""
