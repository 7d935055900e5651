"""Data parallelism (DDP) through ``accelerate``: the accelerator, and the collectives the loop uses.

``accelerate launch --multi_gpu --num_processes N`` (or torchrun) starts N processes; each
builds the whole model. The training forward (models/train_forward.py) is the one module
``accelerator.prepare`` wraps in DDP; each process takes its slice of every global batch of
prompts. What keeps the update the one of the whole batch (loop/update.py):

- the loss normalizers (tokens, responses, groups) are summed over micro-batches *and*
  processes (``global_totals``), so the per-process losses add up to the batch's loss;
- DDP *averages* gradients, so each process back-propagates ``world * loss`` (``backward``);
- gradients are reduced at the last micro-batch of an update only (``sync_context``: DDP's
  ``no_sync`` before it);
- processes may hold different numbers of micro-batches (filters): the count of an update is
  agreed first (the max), and a process with fewer runs zero-weight padding micro-batches,
  so every process joins every gradient reduction;
- batch-wide statistics of ``score`` and ``advantage`` are taken over every process's rows
  (``batch_stats_context``).

The choice between DDP and FSDP2 is parallel/wrap.py's; accelerate's FSDP1 and DeepSpeed
configurations are refused (parallel/settings.py, and ``accelerator``).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import RunError


def _destroy_process_group() -> None:
    """At interpreter exit: tear the process group down before the C++ runtime goes. Garbage
    is collected first, so that collective handles (``Work`` objects, their tensors) still
    referenced from Python are freed while the interpreter is whole, not during its
    finalization, where gloo's threads releasing them can abort the process."""
    import gc

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def accelerator(out, log_with: list, *, cpu: bool, plan=None):
    """The run's ``accelerate.Accelerator`` (DDP or one process; gloo on CPU), with the
    autocast of ``plan``'s mixed precision (parallel/precision.py); under ``parallel=fsdp2``
    accelerate's FSDP2 launch mode is accepted (parallel/fsdp2.py shards). A RunError for
    distributed modes this runtime does not drive."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    from . import precision, settings
    plan = plan or settings.ParallelPlan()
    # cpu=True without a GPU: accelerate then picks gloo (MULTI_CPU) under torchrun / launchers
    # buffers (rotary tables) are the same on every process: no broadcast at each forward
    acc = Accelerator(log_with=log_with or None, project_dir=str(out), cpu=cpu,
                      mixed_precision=precision.accelerator_setting(plan),
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    accepted = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if plan.fsdp2:  # accelerate's FSDP2 config: parallel/fsdp2.py applies fully_shard itself
        accepted += (DistributedType.FSDP,)
    if acc.distributed_type not in accepted:
        raise RunError(f"accelerate's {acc.distributed_type.value} mode is not supported by this runtime yet",
                       hint="use DDP (the default of `accelerate launch --multi_gpu`) or FSDP2 "
                            "(--set parallel=fsdp2, or fsdp_version: 2 in the accelerate config)")
    if acc.num_processes > 1:  # processes that exit with the process group alive can abort (gloo threads)
        import atexit
        atexit.register(_destroy_process_group)
    return acc


def sync_context(run, i: int, n_micro: int):
    """DDP reduces gradients at the last backward of an update only: ``no_sync`` before it."""
    if run.world == 1 or i == n_micro - 1:
        return contextlib.nullcontext()
    return run.acc.no_sync(run.wrapped)


def backward(run, loss: torch.Tensor) -> None:
    """DDP averages gradients over processes; the losses are shares of one sum: ``world * loss``."""
    run.acc.backward(loss * run.world if run.world > 1 else loss)


def global_totals(run, tokens: float, responses: int, groups: int, micro: int) -> tuple[dict, int]:
    """The update's loss normalizers summed over processes, and its micro-batch count (the most
    any process has; the others pad)."""
    local = torch.tensor([tokens, float(responses), float(groups), float(micro)], device=run.device,
                         dtype=torch.float64)
    every = run.acc.gather(local[None]) if run.world > 1 else local[None]
    tot = every[:, :3].sum(0)
    totals = {"tokens": tot[0].clamp(min=1).float(), "responses": tot[1].clamp(min=1).float(),
              "groups": tot[2].clamp(min=1).float()}
    return totals, int(every[:, 3].max())


def sum_over_processes(run, t: torch.Tensor) -> torch.Tensor:
    return run.acc.reduce(t, reduction="sum") if run.world > 1 else t


def gather_objects(run, obj) -> list:
    """``obj`` of every process, in rank order (one process: ``[obj]``)."""
    if run.world == 1:
        return [obj]
    from accelerate.utils import gather_object
    return gather_object([obj])


def mean_over_processes(run, metrics: dict, terms: dict) -> tuple[dict, dict]:
    """A step's metrics: each the mean over the processes that report it (a process without
    rows has none); ``loss/*`` terms are shares of one sum, so they add up."""
    if run.world == 1:
        return metrics, terms
    every = gather_objects(run, (metrics, terms))
    out = {}
    for k in sorted({k for m, _ in every for k in m}):
        vals = [m[k] for m, _ in every if k in m]
        out[k] = sum(vals) / len(vals)
    summed = {k: sum(t.get(k, 0.0) for _, t in every) for k in sorted({k for _, t in every for k in t})}
    return out, summed


def batch_stats_context(run, have_rows: bool, stage: str):
    """Batch-wide statistics (whiten, batch_std, means, sums) of ``score`` and ``advantage``
    over all processes' rows (``ops.batch_stats_reduce``). Every process calls this at every
    scoring round and every advantage stage, rows or not (it is a collective). A process
    without rows runs no stage, so when one has none every process keeps its own
    statistics for that stage (said in yellow). Specs without batch statistics skip it."""
    if run.world == 1 or not run.current.batch_statistics:
        return contextlib.nullcontext()
    flag = run.acc.reduce(torch.tensor([0.0 if have_rows else 1.0], device=run.device), reduction="sum")
    if flag.item() > 0:
        run.say(f"[yellow]step {run.step + 1}: a process has no rows for its {stage} stage; that stage's "
                "batch statistics are per process[/yellow]")
        return contextlib.nullcontext()
    import torch.distributed as dist

    from alignspec import ops

    def all_sum(t):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_cat(x):  # order statistics (ops.batch_rank, ...): every process's values, in rank order
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(run.world)]
        dist.all_gather(sizes, torch.tensor([x.numel()], device=x.device))
        sizes = [int(n) for n in sizes]
        padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
        padded[:x.numel()] = x
        parts = [torch.empty_like(padded) for _ in range(run.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:run.rank])
    return ops.batch_stats_reduce(all_sum, all_cat)


def micro_slices(run, rows: int, G: int) -> list[slice]:
    """Micro-batches of ``micro_batch_size`` whole groups."""
    m = run.cfg.micro_batch_size * G
    return [slice(s, min(s + m, rows)) for s in range(0, rows, m)]
