"""The flow-matching policy family, in the one loop: specs that sample with ``flow_sde``.

The loss is the compiled spec's, unchanged (``algo.score`` / ``advantage`` / ``step_loss``),
with the per-step quantities the flow policy provides (models/flow.py):

    logp [B, T]           per-step Gaussian log-density of the sampled transition (grad)
    logp_old [B, T]       the same under the sampling model, from a no-grad forward before the
                          updates -- only when the spec reads it (else the compiler's stopgrad(logp))
    logp_ref [B, T]       the same under the frozen reference (no grad)
    mu_sqdist_ref [B, T]  mean over latent elements of (mu_theta - mu_ref)^2 (grad)
    step_std [B, T]       sigma_t of each step;  mask [B, T] ones;  length [B] = T
    reward [B]            the task's reward of the final sample (or the run's rewards)

A row set is a ``FlowRollout`` (trajectories); prompts are class ids drawn per round by the
``flow_sde`` sampler (rollout/flow_sde.py). Built-in default: ``FlowTask`` and a pretrained
``VelocityNet`` (family/flow_io.py). Checkpoints hold ``model.safetensors`` (and the
reference when iterations replace it); the final ``model/`` is in ``save_flow_model``'s
format. It trains on one process, on the CPU, in float32.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import RunError
from ..models.flow import FlowPolicy, FlowRollout, FlowTask
from .flow_io import FLOW_TASK, builtin_flow_model_dir, load_flow_model, write_flow_model
from .base import PolicyFamily
from .state import FlowState, build_scheduler, set_threads

# what the flow policy provides; anything else a spec reads is an error before any model is built
PROVIDED = {"logp", "logp_old", "logp_ref", "mu_sqdist_ref", "step_std", "mask", "length", "reward"}
UNSUPPORTED = {"tree_search", "embedding", "generation", "critic", "reward_head"}


def cat_rollouts(ros: list[FlowRollout]) -> FlowRollout:
    if len(ros) == 1:
        return ros[0]
    first = ros[0]
    cat = {}
    for k in ("traj", "classes", "logp_old", "step_std", "trans_std", "mask", "samples"):
        vals = [getattr(r, k) for r in ros]
        cat[k] = None if any(v is None for v in vals) else torch.cat(vals)
    return FlowRollout(times=first.times, noise=first.noise, **cat)


class FlowPolicyFamily(PolicyFamily):
    """A flow policy for loop/engine.py: ``setup`` returns the run's ``FlowState``; the other
    hooks take ``run``, the Engine (which shows the state's fields read-only)."""

    name = "flow"

    # -- setup ---------------------------------------------------------------------------
    def _check(self, algo, cfg) -> None:
        if algo.plan.sampler.kind != "flow_sde":
            raise RunError(f"{algo.name} requires a flow policy, but its sample section is not flow_sde(prompt, ...)")
        bad = UNSUPPORTED & set(algo.requires)
        if bad:
            raise RunError(f"{algo.name} needs {', '.join(sorted(bad))}, which the flow runtime does not provide")
        missing = sorted(set(algo.inputs) - PROVIDED)
        if missing:
            raise RunError(f"{algo.name} reads {', '.join(missing)}, which a flow policy does not provide",
                           hint="flow policies provide " + ", ".join(sorted(PROVIDED)))
        if cfg.data is not None:
            raise RunError("flow policies train on the built-in task's class prompts; a data file is not supported",
                           hint="omit --data")
        if cfg.eval_data is not None or cfg.eval_fraction is not None:
            raise RunError("flow policies evaluate on the built-in task; eval_data / eval_fraction are not supported",
                           hint="drop eval_data / eval_fraction")
        if cfg.lora_r > 0:
            raise RunError("LoRA is not supported for flow policies", hint="set lora_r: 0")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RunError("flow policies train on one process; this run was launched on "
                           f"{os.environ['WORLD_SIZE']}", hint="run it without accelerate launch / torchrun")
        if cfg.dtype not in ("float32", "fp32", "auto"):
            raise RunError(f"flow policies train in float32 (dtype {cfg.dtype!r} is not supported)",
                           hint="set dtype: float32")

    def setup(self, algo, cfg, *, out, console, parallel_plan) -> FlowState:
        """The flow model, its task and rewards, the optimizer and schedule, returned."""
        s = FlowState(algo=algo, cfg=cfg, out=out, console=console, parallel_plan=parallel_plan,
                      builds={"policy": 0, "reference": 0},
                      counts={"rollouts": 0, "logp_old": 0, "logp_ref": 0},  # no-grad forwards, for tests
                      bar_metrics=(("reward/mean", "reward"),), curve_metrics=("reward/mean", "eval_score"),
                      cuda_rng=False)  # the flow policy runs on the CPU: checkpoints hold the CPU generators only
        self._check(algo, cfg)
        s.builtin = cfg.model is None
        s.steps = cfg.steps or (60 if s.builtin else 100)
        s.batch_size = s.local_batch = cfg.batch_size or 8
        s.lr = cfg.lr or (1e-3 if s.builtin else 1e-4)
        s.eval_every = cfg.eval_every if cfg.eval_every is not None else 10
        s.eval_per_class = cfg.eval_size or 128
        set_threads(cfg, 1)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (1 << 32))
        torch.manual_seed(cfg.seed)
        from ..io.tracking import check_trackers
        check_trackers(list(cfg.log_with))
        from ..parallel.ddp import accelerator
        s.acc = accelerator(s.out, list(cfg.log_with), cpu=True, plan=parallel_plan)
        s.rank, s.world, s.main, s.device = 0, 1, True, torch.device("cpu")
        # model and task
        if s.builtin:
            s.model_dir, _ = builtin_flow_model_dir()
            s.say(f"model: built-in flow VelocityNet (2-D, pretrained by flow matching), cached at {s.model_dir}")
        else:
            s.model_dir = cfg.model
        s.model, mcfg = load_flow_model(s.model_dir)
        s.task_settings = dict(mcfg.get("task") or FLOW_TASK)
        s.task = FlowTask(**s.task_settings)
        if s.model.num_classes != s.task.num_classes:
            raise RunError(f"{s.model_dir}: the model has {s.model.num_classes} classes, the task "
                           f"{s.task.num_classes}")
        s.say(f"data: built-in flow task ({s.task.num_classes} class prompts, {s.task.k} blobs each; "
              "reward high on one blob per class)")
        s.builds["policy"] += 1
        s.model.train()
        if "reference" in algo.requires:
            s.reference, _ = load_flow_model(s.model_dir)
            s.reference.requires_grad_(False)
            s.builds["reference"] += 1
        if "reward" in algo.inputs:
            from ..scoring.flow_rewards import FlowRewards
            names = list(cfg.rewards) or ["task"]
            s.rewards = FlowRewards(names, s.task)
            s.say(f"reward: {' + '.join(names)}")
        for name in ("reward_model", "preference"):
            if name in algo.inputs:
                raise RunError(f"{algo.name} scores with {name}(response), which flow policies do not support",
                               hint="score with reward(response)")
        # optimizer / schedule (the LM family's settings)
        s.grad_params = [p for p in s.model.parameters() if p.requires_grad]
        s.optimizer = torch.optim.AdamW(s.grad_params, lr=s.lr, weight_decay=cfg.weight_decay)
        build_scheduler(s)
        s.evaluates = True
        s.run_line = (f"run: {algo.name} (flow policy) for {s.steps} steps, batch {s.batch_size} prompts, "
                      f"lr {s.lr}, builds {', '.join(k for k, v in s.builds.items() if v)}")
        return s

    # -- rows (loop/rollout_stage.py) ----------------------------------------------------------
    @staticmethod
    def next_prompts(run) -> int:
        return run.batch_size  # class prompts, drawn by the flow_sde sampler

    @staticmethod
    def rows(ro: FlowRollout) -> FlowRollout:
        return ro

    @staticmethod
    def batch_of(run, ro: FlowRollout) -> dict:
        return {"mask": ro.mask, "length": ro.mask.sum(1), "step_std": ro.step_std}

    @staticmethod
    def score_rows(run, ro: FlowRollout, batch: dict) -> None:
        if run.rewards is not None:
            batch["reward"] = run.rewards(ro.samples, ro.classes)

    @staticmethod
    def select_rows(ro: FlowRollout, idx: list[int]) -> FlowRollout:
        return ro.select(torch.as_tensor(idx, dtype=torch.long))

    @staticmethod
    def cat_rows(parts: list[FlowRollout]) -> FlowRollout:
        return cat_rollouts(parts)

    # -- forwards --------------------------------------------------------------------------------
    @staticmethod
    def no_grad_forwards(run, batch: dict) -> None:
        algo, ro = run.current, run.batch_rows
        with torch.no_grad():
            if "logp_old" in algo.inputs:
                batch["logp_old"] = FlowPolicy(run.model).logprobs(ro)["logp"].detach()
                run.counts["logp_old"] += 1
            if "logp_ref" in algo.inputs:
                batch["logp_ref"] = FlowPolicy(run.reference).logprobs(ro)["logp"].detach()
                run.counts["logp_ref"] += 1

    @staticmethod
    def forward(run, mb: dict, sl: slice, rows: torch.Tensor) -> dict:
        """logp (and mu_sqdist_ref when read) of the batch rows ``rows`` (grad)."""
        need_sq = "mu_sqdist_ref" in run.current.inputs
        lp = FlowPolicy(run.model, run.reference if need_sq else None).logprobs(run.batch_rows.select(rows))
        return {"logp": lp["logp"], **({"mu_sqdist_ref": lp["mu_sqdist_ref"]} if need_sq else {})}

    @staticmethod
    def zero_loss(run, fw: dict | None = None):
        assert fw is not None, "a flow run has one process: no padding micro-batches"
        return sum(v.sum() for v in fw.values() if torch.is_tensor(v) and v.requires_grad) * 0.0

    # -- metrics, evaluation, iterations -------------------------------------------------------
    @staticmethod
    def rollout_metrics(run, batch: dict) -> dict:
        return {"reward/mean": float(batch["reward"].float().mean())} if "reward" in batch else {}

    @staticmethod
    def evaluate(run) -> float:
        was = run.model.training
        run.model.eval()
        try:
            return run.task.evaluate(run.model, per_class=run.eval_per_class)
        finally:
            run.model.train(was)

    # -- checkpoints and the final model ---------------------------------------------------------
    @staticmethod
    def save_weights(run, tmp: Path, final: bool = False) -> None:
        """A checkpoint's ``model.safetensors`` (and the reference when iterations replace it); with
        ``final``, the final model in ``save_flow_model``'s format (``--model`` of a later run)."""
        if final:
            return write_flow_model(tmp, run.model, run.task_settings,
                                    {"spec": run.algo.name, "steps": run.step, "init": str(run.model_dir)})
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        if run.reference is not None and run.algo.plan.reference == "iterate":
            save_file({k: v.contiguous() for k, v in run.reference.state_dict().items()},
                      str(tmp / "reference.safetensors"))

    @staticmethod
    def load_weights(run, ck: Path) -> None:
        from safetensors.torch import load_file
        try:
            run.model.load_state_dict(load_file(str(ck / "model.safetensors")))
        except RuntimeError as e:
            raise RunError(f"{ck}: the checkpoint does not fit this model: {e}") from None
        if run.reference is not None and (ck / "reference.safetensors").is_file():
            run.reference.load_state_dict(load_file(str(ck / "reference.safetensors")))

    @staticmethod
    def checkpoint_state(run) -> dict:
        """What ``state.json`` holds besides the settings (its ``spec`` and ``family`` are checked on
        --resume)."""
        return {"step": run.step, "spec": run.algo.name, "family": "flow", "seed": run.cfg.seed,
                "model": str(run.model_dir)}
