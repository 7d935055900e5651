"""What a run is made of after setup: ``RunState``, which a policy family's ``setup`` returns.

Setup builds everything a run needs and returns it in one object, as a torchtune recipe's
setup methods return what they build: ``state = family.setup(algo, cfg, out=..., console=...,
parallel_plan=...)``. The loop (loop/engine.py) keeps it as ``engine.state`` and the stages read
it; nothing else is added to it later (the dataclasses have slots: a field that is not declared
here cannot be set). The Engine shows the fields read-only (``engine.device`` is
``engine.state.device``; assigning ``engine.device`` is an error), so a change of the run state
is always written ``engine.state.<field> = ...``, and only where the table below says.

Who sets and who changes each field:

=====================  ==================================  ====================================
field                  set by                              changed after setup by
=====================  ==================================  ====================================
algo, cfg              the Engine; setup may replace them  nobody
                       (built-in preset, task defaults)
out, parallel_plan     the Engine (``--out``, settings)    nobody
console                the Engine                          tests (a silent console)
acc, rank, world,      setup (``accelerate``)              nobody
main, device
steps, batch_size,     setup (settings, or the family's    nobody
local_batch, lr,       defaults)
eval_every
builds                 setup (models built, by role)       nobody
model_dir              setup (the policy's source)         nobody
model, reference       setup                               nobody (their weights: the updates,
                                                           iteration boundaries, checkpoints)
optimizer, scheduler,  setup (``build_scheduler`` below)   nobody (stepped by loop/update.py)
grad_params,
updates_per_step,
warmup_updates
task, records          setup                               nobody (a stream moves on reading)
evaluates, run_line    setup                               nobody
bar_metrics,           setup (the family's; defaults: the  nobody
curve_metrics,         token family's)
cuda_rng
step                   0                                   the loop (one per optimizer step),
                                                           a resumed checkpoint
cursor                 0                                   the data reader (data/token_rows.py),
                                                           a resumed checkpoint
=====================  ==================================  ====================================

``TokenState`` and ``FlowState`` add each family's own fields, documented there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(slots=True, eq=False)
class RunState:
    """The run after setup (see the module docstring for who sets and changes each field)."""

    # given by the Engine (setup may replace algo and cfg: presets, a built-in task's defaults)
    algo: Any
    cfg: Any
    out: Path
    console: Any
    parallel_plan: Any = None
    # processes (accelerate)
    acc: Any = None
    rank: int = 0
    world: int = 1
    main: bool = True
    device: Any = None
    # effective settings
    steps: int = 0
    batch_size: int = 0
    local_batch: int = 0
    lr: float = 0.0
    eval_every: int = 0
    # models, optimizer, schedule
    builds: dict = field(default_factory=dict)   # {"policy": n, "reference": n, ...}: models built
    model_dir: Any = None       # the policy's source (a folder, or the built-in model's)
    model: Any = None           # the trained module (the policy, with a value head for a critic)
    reference: Any = None       # the frozen reference, or None
    optimizer: Any = None
    scheduler: Any = None
    grad_params: list = field(default_factory=list)   # the trained parameters (clipped by norm)
    updates_per_step: int = 1   # optimizer updates per step (the plan's epochs x minibatches)
    warmup_updates: int = 0
    # task, data, evaluation
    task: Any = None            # the built-in task (prompts, reward, eval score), or None
    records: Any = None         # the training records: a list, or a stream (data/stream.py)
    evaluates: bool = True      # whether the run has a held-out score (``family.evaluate``)
    run_line: str = ""          # the "run: ..." console line
    # what the family decides
    bar_metrics: tuple = ()     # (key, label): step metrics the progress bar shows after the loss
    curve_metrics: tuple = ("eval_score",)  # panels of curves.png after the loss, when logged
    cuda_rng: bool = True       # checkpoints hold the CUDA generators' states (when CUDA is there)
    # the position: the only fields that change at every step
    step: int = 0               # optimizer steps done
    cursor: int = 0             # training records read (all processes together)

    def say(self, msg: str) -> None:
        """Print ``msg`` (rich markup) on the run's console, on the main process only."""
        if self.main:
            self.console.print(msg)


@dataclass(slots=True, eq=False)
class TokenState(RunState):
    """A causal-LM run (family/token_policy.py). All set by setup and never reassigned after it,
    except ``iterate``, which the evaluation (family/evaluation.py) sets aside while it samples."""

    kind: str = "prompts"       # the plan's data kind: prompts | demonstrations | pairs | unpaired
    builtin: bool = False       # the built-in task (no --data)
    reward_head: bool = False   # trains a reward model (models/reward_head.py)
    lora: bool = False
    model_adapter: Any = None   # --model as a PEFT adapter folder: the adapter (models/adapter_model.py)
    policy: Any = None          # the causal LM (with its adapters); ``model`` adds a value head
    tokenizer: Any = None
    max_new_tokens: int = 64
    logprob_temperature: float = 1.0
    train_forward: Any = None   # the training forward (models/train_forward.py; parallel/wrap.py)
    frozen_forwards: dict = field(default_factory=dict)  # FSDP2's sharded reference forwards
    wrapped: Any = None         # the training forward wrapped by DDP (or FSDP2's own)
    prompt_format: Any = None   # prompts -> token ids (data/prompts.py)
    iterate: Any = None         # self-play's frozen pi_t (models/iterations.py), or None
    embedder: Any = None        # embedding(response) (scoring/embedding.py), or None
    tree_sampler: Any = None    # the tree_search sampler (rollout/mcts_sampler.py), or None
    scorers: dict = field(default_factory=dict)   # {external score: scorer} (scoring/bind.py)
    ref_cache: Any = None       # reference log-probs of offline data (models/fastpath.py)
    eval_records: Any = None    # held-out records (eval_data / eval_fraction), or None
    user_eval: Any = None       # the evaluation on them (family/evaluation.py), or None


@dataclass(slots=True, eq=False)
class FlowState(RunState):
    """A flow-policy run (family/flow_policy.py); every field set by setup and never reassigned
    (``counts`` is counted up by the no-grad forwards)."""

    builtin: bool = True
    task_settings: dict = field(default_factory=dict)   # the flow task's settings, saved with the model
    rewards: Any = None          # reward(response) (scoring/flow_rewards.py), or None
    eval_per_class: int = 128
    counts: dict = field(default_factory=dict)   # no-grad forwards so far (read by tests)


def set_threads(cfg, default: int) -> None:
    """torch's intra-op threads: the ``threads`` setting, else ``default`` (0: leave as is)."""
    threads = cfg.threads if cfg.threads is not None else default
    if threads > 0:
        torch.set_num_threads(threads)


def build_scheduler(state: RunState) -> None:
    """``state.scheduler``: ``transformers.get_scheduler(lr_schedule)`` over the run's
    ``steps * updates_per_step`` optimizer updates, with ``warmup_steps`` (or ``warmup_ratio``
    of the updates, rounded up) of warmup; ``constant`` with warmup is HF's
    ``constant_with_warmup``; ``min_lr_rate`` and ``lr_scheduler_kwargs`` go to the schedule."""
    import math

    from transformers import get_scheduler

    from ..errors import RunError
    cfg = state.cfg
    state.updates_per_step = state.algo.plan.updates_per_rollout
    total = state.steps * state.updates_per_step
    warm = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    kind = "constant_with_warmup" if cfg.lr_schedule == "constant" and warm else cfg.lr_schedule
    extra = dict(cfg.lr_scheduler_kwargs)
    if kind in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and "min_lr" not in extra:
        extra.setdefault("min_lr_rate", cfg.min_lr_rate or 0.0)
    elif cfg.min_lr_rate is not None:
        raise RunError(f"min_lr_rate is for cosine_with_min_lr and cosine_warmup_with_min_lr, not lr_schedule "
                       f"{cfg.lr_schedule!r}", hint="set lr_schedule=cosine_with_min_lr")
    try:
        state.scheduler = get_scheduler(kind, state.optimizer, num_warmup_steps=warm, num_training_steps=total,
                                        scheduler_specific_kwargs=extra or None)
    except (TypeError, ValueError) as e:
        raise RunError(f"lr_schedule {cfg.lr_schedule!r} with lr_scheduler_kwargs {extra}: {e}",
                       hint="see transformers.get_scheduler for the arguments of each schedule") from None
    state.warmup_updates = warm
