"""How the training is spread over processes and kept within memory.

- ``wrap``: the one place that chooses DDP or FSDP2 for the training forward (``prepare_training``),
  the gradient clipping and the gathered weights of generation;
- ``ddp``: DDP through ``accelerate`` (the accelerator, the normalizers, padding micro-batches,
  gradient reduction, the collectives the loop uses);
- ``settings``: the checks of the parallel, precision, checkpointing and LoRA settings, before anything loads;
- ``fsdp2``: sharding the training forward and the frozen reference with ``torch.distributed.fsdp.fully_shard``;
- ``vocab_parallel``: log-probs from the output layer's shards, never gathered (under FSDP2);
- ``precision``: mixed precision (float32 master weights, low-precision compute);
- ``activation_checkpointing``: the model's own non-reentrant gradient checkpointing;
- ``sharded_checkpoint``: checkpoints of sharded runs (``torch.distributed.checkpoint``) and the
  gathered final model;
- ``lora``: LoRA adapters (``peft.LoraConfig`` from the run settings, or an existing adapter) and QLoRA.
"""
