"""The training engine for flow-matching policies: any compiled spec that requires ``flow``.

``alignspec run SPEC`` hands a spec whose ``sample`` section calls ``flow_sde(prompt, ...)``
to ``FlowEngine`` (``engine.build_engine`` dispatches on ``"flow" in algo.requires``). It is
the LM engine's loop with the flow policy family of ``runtime/flow.py`` in place of a causal
LM; the loss is the compiled spec's, unchanged (``algo.score`` / ``algo.advantage`` /
``algo.step_loss``), with the per-step quantities the flow policy provides:

    logp [B, T]           per-step Gaussian log-density of the sampled transition (grad)
    logp_old [B, T]       the same under the sampling model, from a no-grad forward before the
                          updates -- only when the spec reads it ("old_logp" in requires); a
                          spec that uses each rollout for one update gets stopgrad(logp) from
                          the compiler instead
    logp_ref [B, T]       the same under the frozen reference (no grad)
    mu_sqdist_ref [B, T]  mean over latent elements of (mu_theta - mu_ref)^2 (grad)
    step_std [B, T]       sigma_t of each step;  mask [B, T] ones;  length [B] = T
    reward [B]            the task's reward of the final sample (or the run's rewards)

Per optimizer step: prompts (class ids, a seeded draw per step) -> ``flow_sde`` rollout with
the call's n / steps / noise resolved from the compiled params -> reward -> ``algo.score``
(filters and selection; refill rounds up to ``max_refill_rounds`` as in the LM engine) ->
no-grad forwards for ``logp_old`` / ``logp_ref`` if read -> ``algo.advantage`` -> epochs x
minibatches over whole groups (seeded shuffles), micro-batches of ``micro_batch_size``
groups with the minibatch's global ``totals``, backward, grad clipping, AdamW + LR schedule.

The built-in default: ``FlowTask`` (2-D class-conditional blob mixtures; the reward is high
on one blob per class) and a ``VelocityNet`` pretrained by rectified flow matching, cached
under ``$ALIGNSPEC_CACHE`` (default ``~/.cache/alignspec``) in ``flow-<hash of every
setting>``, written atomically. ``--model DIR`` takes a directory this engine wrote
(``config.json`` + ``model.safetensors``: the final ``OUT/model`` of an earlier run, or the
cache entry). A frozen reference copy is built only if the spec requires ``reference``.

Rewards: by default the task's; ``rewards: [module:function, ...]`` in the run config names
user functions ``fn(samples [B, D] tensor, classes [B] long tensor) -> [B]`` (tensor or
sequence of floats), summed; the name ``task`` is the built-in task reward.

Outputs, as the LM engine's: ``metrics.jsonl`` (one line per step: step, loss, the compiled
metrics, reward/mean, grad_norm, lr, groups, time/*, step_time; eval lines
``{"step", "eval_score"}`` at the start, every ``eval_every`` steps and at the end),
``checkpoint/`` (atomic; ``--resume`` reproduces an uninterrupted run: prompts, noise and
shuffles come from generators seeded by (seed, step, ...)), ``model/`` and ``curves.png``
(loss, reward/mean, eval_score).

``FlowEngine`` subclasses ``TrainingLoop`` (runtime/loop.py), the run plumbing it shares with
the LM engine: the ``train()`` loop, resume, the metrics writer and trackers, the LR schedule,
the progress bar, atomic checkpoint / model directories and the plot. What is its own: the
flow model and task, rollouts, the optimizer step, and what its checkpoint and model hold
(``model.safetensors``, the reference when iterations replace it; the final ``model/`` in
``save_flow_model``'s format). It runs on one process, on the CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .errors import RunError
from .models.flow import FlowPolicy, FlowRollout, FlowTask, VelocityNet, pretrain, rollout
from .loop.base import PHASES, TrainingLoop, _mix, replace_dir

FLOW_MODEL = {"dim": 2, "num_classes": 4, "hidden": 128, "time_freqs": 16}
FLOW_TASK = {"num_classes": 4, "k": 3, "radius": 1.5, "blob_std": 0.1, "reward_width": 0.35}
FLOW_PRETRAIN = {"steps": 1500, "seed": 0, "batch": 256, "lr": 3e-3}
FLOW_INIT_SEED = 0

# what the flow policy provides; anything else a spec reads is an error before any model is built
PROVIDED = {"logp", "logp_old", "logp_ref", "mu_sqdist_ref", "step_std", "mask", "length", "reward"}
UNSUPPORTED = {"tree_search", "embedding", "generation", "critic", "reward_head"}


# ---------------------------------------------------------------------------------------
# models on disk: the built-in cache entry and the final model share one format
# ---------------------------------------------------------------------------------------


def write_flow_model(path: Path, model: VelocityNet, task_settings: dict, extra: dict | None = None) -> None:
    """Write ``path/model.safetensors`` + ``path/config.json`` into the existing directory ``path``."""
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    cfg = {"family": "flow", "class": "VelocityNet",
           "velocity_net": {"dim": model.dim, "num_classes": model.num_classes,
                            "hidden": model.cls.embedding_dim, "time_freqs": model.freqs.numel()},
           "task": dict(task_settings), **(extra or {})}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def save_flow_model(dest: Path, model: VelocityNet, task_settings: dict, extra: dict | None = None) -> None:
    """Write ``dest/model.safetensors`` + ``dest/config.json`` atomically (tmp dir + rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary output directory
        write_flow_model(tmp, model, task_settings, extra)
        replace_dir(tmp, dest, dest.parent / f".{dest.name}.old{os.getpid()}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_flow_model(path) -> tuple[VelocityNet, dict]:
    """A ``VelocityNet`` and its config from a directory written by ``save_flow_model``."""
    from safetensors.torch import load_file
    p = Path(os.path.expanduser(str(path)))
    cf = p / "config.json"
    if not cf.is_file() or not (p / "model.safetensors").is_file():
        raise RunError(f"no flow model in {p}: config.json and model.safetensors are needed",
                       hint="give the model/ directory of an earlier flow run, or omit --model for the built-in one")
    cfg = json.loads(cf.read_text())
    if cfg.get("family") != "flow":
        raise RunError(f"{p} holds a {cfg.get('model_type') or cfg.get('family') or 'non-flow'} model, "
                       "but this spec samples with flow_sde(...) and needs a flow model",
                       hint="give the model/ directory of an earlier flow run, or omit --model")
    model = VelocityNet(**cfg["velocity_net"])
    try:
        model.load_state_dict(load_file(str(p / "model.safetensors")))
    except Exception as e:
        raise RunError(f"could not load the flow model in {p}: {e}") from e
    return model.eval(), cfg


def builtin_flow_model_dir() -> tuple[str, dict]:
    """The cached pretrained built-in flow model (pretraining it on first use)."""
    from .data.tasks import _key, cache_root
    settings = {"model": FLOW_MODEL, "task": FLOW_TASK, "pretrain": FLOW_PRETRAIN,
                "init_seed": FLOW_INIT_SEED, "version": 1}
    target = cache_root() / f"flow-{_key(settings)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target), settings
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FLOW_INIT_SEED)
        model = VelocityNet(**FLOW_MODEL)
    state = pretrain(model, FlowTask(**FLOW_TASK), **FLOW_PRETRAIN)
    model.load_state_dict(state)
    tmp_parent = target.parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=target.name + ".build", dir=tmp_parent))
    try:
        save_flow_model(staged / "m", model, FLOW_TASK, {"builtin": settings})
        try:
            os.replace(staged / "m", target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return str(target), settings


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _cat_rollouts(ros: list[FlowRollout]) -> FlowRollout:
    if len(ros) == 1:
        return ros[0]
    first = ros[0]
    cat = {}
    for k in ("traj", "classes", "logp_old", "step_std", "trans_std", "mask", "samples"):
        vals = [getattr(r, k) for r in ros]
        cat[k] = None if any(v is None for v in vals) else torch.cat(vals)
    return FlowRollout(times=first.times, noise=first.noise, **cat)


def _rows(v, n: int) -> bool:
    return torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n


class _UserRewards:
    """The sum of the configured rewards: ``task`` or ``module:function``."""

    def __init__(self, names: list[str], task: FlowTask):
        from .scoring.rewards import resolve_reward
        self.names, self.fns = list(names), []
        for n in self.names:
            if n == "task":
                self.fns.append(task.reward)
            elif ":" in n:
                self.fns.append(resolve_reward(n))
            else:
                raise RunError(f"reward {n!r} is a text reward; a flow policy is scored on its samples",
                               hint="use 'task' (the built-in task's reward) or 'module:function' taking "
                                    "(samples [B, D], classes [B]) and returning [B] rewards")

    def __call__(self, samples: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(samples.shape[0], dtype=torch.float32)
        for name, fn in zip(self.names, self.fns):
            vals = fn(samples, classes)
            vals = torch.as_tensor(vals, dtype=torch.float32).reshape(-1)
            if vals.shape[0] != samples.shape[0]:
                raise RunError(f"reward {name!r} returned {vals.shape[0]} values for {samples.shape[0]} samples")
            total += vals
        return total


# ---------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------


class FlowEngine(TrainingLoop):
    """A training run of one compiled flow-policy algorithm (see the module docstring)."""

    family = "flow"
    bar_metrics = (("reward/mean", "reward"),)
    curve_metrics = ("reward/mean", "eval_score")
    cuda_rng = False  # the flow policy runs on the CPU: checkpoints hold the CPU generators only

    def __init__(self, algo, cfg: RunConfig, resume: bool = False, console=None):
        from rich.console import Console
        self.algo, self.cfg, self.resume = algo, cfg, resume
        self.out = Path(cfg.out)
        self.console = console or Console(stderr=False, highlight=False)
        self.builds = {"policy": 0, "reference": 0}
        self.counts = {"rollouts": 0, "logp_old": 0, "logp_ref": 0}   # no-grad forwards, for tests
        self.acc = None
        self._setup()

    # -- setup -------------------------------------------------------------------------
    def _check_spec(self) -> None:
        algo = self.algo
        if algo.plan.sampler.kind != "flow_sde":
            raise RunError(f"{algo.name} requires a flow policy, but its sample section is not flow_sde(prompt, ...)")
        bad = UNSUPPORTED & set(algo.requires)
        if bad:
            raise RunError(f"{algo.name} needs {', '.join(sorted(bad))}, which the flow runtime does not provide")
        missing = sorted(set(algo.inputs) - PROVIDED)
        if missing:
            raise RunError(f"{algo.name} reads {', '.join(missing)}, which a flow policy does not provide",
                           hint="flow policies provide " + ", ".join(sorted(PROVIDED)))

    def _setup(self) -> None:
        algo, cfg = self.algo, self.cfg
        self._check_spec()
        if cfg.data is not None:
            raise RunError("flow policies train on the built-in task's class prompts; a data file is not supported",
                           hint="omit --data")
        if cfg.lora_r > 0:
            raise RunError("LoRA is not supported for flow policies", hint="set lora_r: 0")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RunError("flow policies train on one process; this run was launched on "
                           f"{os.environ['WORLD_SIZE']}", hint="run it without accelerate launch / torchrun")
        if cfg.dtype not in ("float32", "fp32", "auto"):
            raise RunError(f"flow policies train in float32 (dtype {cfg.dtype!r} is not supported)",
                           hint="set dtype: float32")
        self.builtin = cfg.model is None
        self.steps = cfg.steps or (60 if self.builtin else 100)
        self.batch_size = cfg.batch_size or 8
        self.lr = cfg.lr or (1e-3 if self.builtin else 1e-4)
        self.eval_every = cfg.eval_every if cfg.eval_every is not None else 10
        self.eval_per_class = cfg.eval_size or 128
        self._set_threads(1)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (1 << 32))
        torch.manual_seed(cfg.seed)
        if cfg.log_with:
            from accelerate import Accelerator

            from .io.tracking import check_trackers
            check_trackers(cfg.log_with)
            self.acc = Accelerator(log_with=list(cfg.log_with), project_dir=str(self.out), cpu=True)
        # model and task
        if self.builtin:
            self.model_dir, _ = builtin_flow_model_dir()
            self.say(f"model: built-in flow VelocityNet (2-D, pretrained by flow matching), cached at {self.model_dir}")
        else:
            self.model_dir = cfg.model
        self.model, mcfg = load_flow_model(self.model_dir)
        self.task_settings = dict(mcfg.get("task") or FLOW_TASK)
        self.task = FlowTask(**self.task_settings)
        if self.model.num_classes != self.task.num_classes:
            raise RunError(f"{self.model_dir}: the model has {self.model.num_classes} classes, the task "
                           f"{self.task.num_classes}")
        self.say(f"data: built-in flow task ({self.task.num_classes} class prompts, {self.task.k} blobs each; "
                 "reward high on one blob per class)")
        self.builds["policy"] += 1
        self.model.train()
        self.reference = None
        if "reference" in algo.requires:
            self.reference, _ = load_flow_model(self.model_dir)
            self.reference.requires_grad_(False)
            self.builds["reference"] += 1
        self.rewards = None
        if "reward" in algo.inputs:
            names = list(cfg.rewards) or ["task"]
            self.rewards = _UserRewards(names, self.task)
            self.say(f"reward: {' + '.join(names)}")
        for name in ("reward_model", "preference"):
            if name in algo.inputs:
                raise RunError(f"{algo.name} scores with {name}(response), which flow policies do not support",
                               hint="score with reward(response)")
        # optimizer / schedule (the LM engine's settings)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=cfg.weight_decay)
        self._build_scheduler()
        self._init_iterations()

    # -- per-iteration algorithm (param schedules; TrainingLoop.algo_for) ---------------
    def _policy_state(self) -> dict:
        return self.model.state_dict()

    # -- sampling ----------------------------------------------------------------------
    def _rollout(self, times: dict) -> tuple[dict | None, FlowRollout | None, dict]:
        """Sampled, scored and filtered groups: (batch, kept rollout, info); refills like the LM engine."""
        algo = self.current
        G = algo.group_size
        opts = algo.plan.sampler  # flow_sde's options, params resolved (compiler/passes/plan.py)
        n = int(opts.option("n"))
        T = int(opts.option("steps"))
        noise = float(opts.option("noise"))
        target = self.batch_size
        kept, carried, info = [], [], {"refill_rounds": 0, "dropped_groups": 0}
        have, rnd = 0, 0
        while True:
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(_mix(self.cfg.seed, self.step, 0, rnd, 11))
            classes = torch.randint(0, self.task.num_classes, (target,), generator=g)
            was = self.model.training
            self.model.eval()
            ro = rollout(self.model, classes, n, T, noise, generator=g, with_logp_old=False)
            self.model.train(was)
            self.counts["rollouts"] += 1
            times["time/generation"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            B = len(ro)
            batch = {"mask": ro.mask, "length": ro.mask.sum(1), "step_std": ro.step_std}
            if self.rewards is not None:
                batch["reward"] = self.rewards(ro.samples, ro.classes)
            with torch.no_grad():
                s = algo.score(batch)
            sel = s.pop("rows")
            s.pop("keep")  # the row mask; `rows` already applies it
            idx = torch.arange(B) if sel is None else torch.as_tensor(sel, dtype=torch.long)
            info["dropped_groups"] += B // algo.sample_group_size - idx.numel() // G
            if "reward" in batch:
                s.setdefault("reward", batch["reward"][idx])
            if idx.numel():
                kept.append(ro.select(idx))
                carried.append(s)
            have += idx.numel() // G
            times["time/scoring"] += time.perf_counter() - t0
            if have >= target or not algo.plan.refill:
                break
            if self._refill_capped(info, have, target, rnd):
                break
            rnd += 1
            info["refill_rounds"] = rnd
        if not kept:
            return None, None, info
        n_keep = min(have, target) * G
        ro = _cat_rollouts(kept).select(torch.arange(n_keep))
        batch = {"mask": ro.mask, "length": ro.mask.sum(1), "step_std": ro.step_std}
        for k in carried[0]:
            vals = [c[k] for c in carried if k in c]
            if all(torch.is_tensor(v) and v.dim() > 0 for v in vals):
                batch[k] = torch.cat(vals)[:n_keep]
            else:
                batch[k] = vals[0]
        return batch, ro, info

    def _no_grad_forwards(self, batch: dict, ro: FlowRollout, times: dict) -> None:
        algo = self.current
        t0 = time.perf_counter()
        with torch.no_grad():
            if "logp_old" in algo.inputs:
                batch["logp_old"] = FlowPolicy(self.model).logprobs(ro)["logp"].detach()
                self.counts["logp_old"] += 1
            if "logp_ref" in algo.inputs:
                batch["logp_ref"] = FlowPolicy(self.reference).logprobs(ro)["logp"].detach()
                self.counts["logp_ref"] += 1
        times["time/ref_old_forward"] += time.perf_counter() - t0

    # -- one optimizer step ------------------------------------------------------------
    def _train_step(self) -> dict:
        algo = self.current
        times = {k: 0.0 for k in PHASES}
        t_start = time.perf_counter()
        batch, ro, info = self._rollout(times)
        if batch is None:
            self.say(f"[yellow]step {self.step + 1}: no group survived the filters; step skipped[/yellow]")
            return {"loss": float("nan"), "skipped": 1, **times, "step_time": time.perf_counter() - t_start}
        self._no_grad_forwards(batch, ro, times)
        metrics: dict = {}
        with torch.no_grad():
            adv = algo.advantage(batch)
        for k, v in adv.pop("metrics", {}).items():
            metrics[k] = float(v)
        batch.update(adv)
        if "reward" in batch:
            metrics["reward/mean"] = float(batch["reward"].float().mean())
        G = algo.group_size
        rows = len(ro)
        n_groups = rows // G
        need_sq = "mu_sqdist_ref" in algo.inputs
        policy = FlowPolicy(self.model, self.reference if need_sq else None)
        loss_sum, updates, stat_sums, stat_n, term_sums = 0.0, 0, {}, 0, {}
        grad_norms = []
        params = [p for p in self.model.parameters() if p.requires_grad]
        for chunk in self._minibatches(algo, n_groups):
            if not chunk:
                continue
            t0 = time.perf_counter()
            ridx = torch.tensor([g * G + j for g in chunk for j in range(G)], dtype=torch.long)
            mb = {k: (v[ridx] if _rows(v, rows) else v) for k, v in batch.items()}
            mro = ro.select(ridx)
            totals = {"tokens": mb["mask"].sum().clamp(min=1).float(),
                      "responses": torch.tensor(float(len(ridx))), "groups": torch.tensor(float(len(chunk)))}
            mb_loss, bad = 0.0, None
            m = self.cfg.micro_batch_size * G
            for s0 in range(0, len(ridx), m):
                sl = slice(s0, min(s0 + m, len(ridx)))
                lp = policy.logprobs(mro.select(torch.arange(sl.start, sl.stop)))
                micro = {k: (v[sl] if _rows(v, len(ridx)) else v) for k, v in mb.items()}
                micro["logp"] = lp["logp"]
                if need_sq:
                    micro["mu_sqdist_ref"] = lp["mu_sqdist_ref"]
                out = algo.step_loss(micro, totals)
                bad = self._bad_term(out)
                if bad is not None:
                    break
                out.loss.backward()
                mb_loss += float(out.loss.detach())
                self._add_metrics(out.metrics, term_sums, stat_sums)
                stat_n += 1
            if bad is not None:
                raise self._non_finite(f"term '{bad}'")
            times["time/policy_fwd_bwd"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if self.cfg.max_grad_norm:
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum += mb_loss
            updates += 1
            times["time/optimizer"] += time.perf_counter() - t0
        metrics.update({k: v / max(1, stat_n) for k, v in stat_sums.items()})
        metrics.update({k: v / max(1, updates) for k, v in term_sums.items()})  # per update, like `loss`
        return self._step_record(loss_sum / max(1, updates), metrics, grad_norms, n_groups, info, times, t_start)

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self) -> float:
        was = self.model.training
        self.model.eval()
        try:
            return self.task.evaluate(self.model, per_class=self.eval_per_class)
        finally:
            self.model.train(was)

    # -- checkpoints and the final model (written by TrainingLoop: runtime/loop.py) --------
    def _save_weights(self, tmp: Path) -> None:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        if self.reference is not None and self.algo.plan.reference == "iterate":
            save_file({k: v.contiguous() for k, v in self.reference.state_dict().items()},
                      str(tmp / "reference.safetensors"))

    def _checkpoint_state(self) -> dict:
        return {"step": self.step, "spec": self.algo.name, "family": "flow", "seed": self.cfg.seed,
                "model": str(self.model_dir)}

    def _check_checkpoint(self, ck: Path, state: dict) -> None:
        if state.get("spec") != self.algo.name or state.get("family") != "flow":
            raise RunError(f"{ck} is a checkpoint of {state.get('spec')!r}"
                           f"{'' if state.get('family') == 'flow' else ' (not a flow policy)'}, "
                           f"not of {self.algo.name!r}", hint="use another --out, or run the same spec")

    def _load_weights(self, ck: Path) -> None:
        from safetensors.torch import load_file
        try:
            self.model.load_state_dict(load_file(str(ck / "model.safetensors")))
        except RuntimeError as e:
            raise RunError(f"{ck}: the checkpoint does not fit this model: {e}") from None
        if self.reference is not None and (ck / "reference.safetensors").is_file():
            self.reference.load_state_dict(load_file(str(ck / "reference.safetensors")))

    def _write_model(self, tmp: Path) -> None:
        """The final model, in ``save_flow_model``'s format (``--model`` of a later run)."""
        write_flow_model(tmp, self.model, self.task_settings,
                         {"spec": self.algo.name, "steps": self.step, "init": str(self.model_dir)})

    # -- hooks of the run (TrainingLoop.train) ----------------------------------------------
    def _run_line(self) -> str:
        return (f"run: {self.algo.name} (flow policy) for {self.steps} steps, batch {self.batch_size} prompts, "
                f"lr {self.lr}, builds {', '.join(k for k, v in self.builds.items() if v)}")
