"""How the training forward is spread over processes: DDP through ``accelerate`` (``ddp.py``)."""
