"""The token-LM policy family: causal LMs (``transformers``) on ``accelerate``, in the one loop.

``setup`` builds exactly what ``algo.requires`` / ``algo.inputs`` name (the models and the
data: family/lm_setup.py): the policy (or a reward-model head for ``rm_score``), LoRA
adapters, a value head for a ``critic``, a frozen reference only if ``reference`` is
required (with LoRA: the policy with its adapters disabled), the data (data/), the scorers (scoring/), the extras (family/lm_extras.py:
prompt format, self-play iterate, embeddings, tree search), AdamW and the LR schedule, and
the training forward, wrapped for several processes by parallel/wrap.py (DDP through
``accelerator.prepare``, or sharded by FSDP2's ``fully_shard``; activation checkpointing and
mixed precision: parallel/). The loop then calls the hooks below: rows and tensors, the no-grad
forwards (old, reference, value), the training forward, and what a checkpoint and the final
model hold (``checkpoint/``: ``model/`` with the tokenizer, ``trainable.safetensors``, the
reference / iterate when iterations change them; ``model/``: the LM, LoRA merged, plus
``value_head.safetensors`` for a critic).
"""

from __future__ import annotations

import contextlib

import torch

from ..data import token_rows
from ..errors import RunError
from . import lm_setup
from ..models.fastpath import ReferenceCache
from ..models.loaders import PolicyWithValueHead, unwrap_causal_lm
from .lm_policy_io import load_weights, save_weights
from ..models.train_forward import TrainForward, dummy_micro_batch, zero_loss
from .base import PolicyFamily
from .state import TokenState, build_scheduler, set_threads


class TokenPolicy(PolicyFamily):
    """A causal-LM policy for loop/engine.py: ``setup`` returns the run's ``TokenState``; the
    other hooks take ``run``, the Engine (which shows the state's fields read-only)."""

    name = "token"

    # -- setup ---------------------------------------------------------------------------
    def setup(self, algo, cfg, *, out, console, parallel_plan) -> TokenState:
        """The run's models, data, scorers, optimizer and schedule, built in that order (see the
        module docstring) and returned; ``algo`` and ``cfg`` may come back replaced (presets)."""
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except Exception:
            pass
        s = TokenState(algo=algo, cfg=cfg, out=out, console=console, parallel_plan=parallel_plan,
                       builds={"policy": 0, "reference": 0, "critic": 0})
        from ..io.tracking import check_trackers
        check_trackers(list(cfg.log_with))  # unknown or missing trackers: a RunError before anything is built
        from ..parallel.ddp import accelerator
        s.acc = accelerator(s.out, list(cfg.log_with), cpu=not torch.cuda.is_available(), plan=parallel_plan)
        s.rank, s.world = s.acc.process_index, s.acc.num_processes
        s.main, s.device = s.acc.is_main_process, s.acc.device
        self._apply_builtin_preset(s)
        self._build(s)
        s.evaluates = s.task is not None or s.user_eval is not None
        s.run_line = (f"run: {s.algo.name} for {s.steps} steps, batch {s.batch_size} "
                      f"({s.world} process{'es' if s.world > 1 else ''}), lr {s.lr}, "
                      f"builds {', '.join(k for k, v in s.builds.items() if v)}{' +LoRA' if s.lora else ''}")
        return s

    def _apply_builtin_preset(self, s: TokenState) -> None:
        """Fill what the user left unset from the spec's built-in demo preset (runtime/presets.py):
        only on the built-in task and model; ``s.cfg`` becomes a copy, the caller's is kept."""
        from ..presets import builtin_preset, describe
        fields, params = builtin_preset(s.algo, s.cfg)
        if not fields and not params:
            return
        cfg = s.cfg.model_copy(deep=True)
        for k, v in fields.items():
            setattr(cfg, k, v)
        if params:
            cfg.params = {**cfg.params, **params}
            s.algo = s.algo.with_params(**params)
        s.cfg = cfg
        s.say(describe(s.algo.name, fields, params))

    def _apply_task_defaults(self, s: TokenState) -> None:
        """The settings a built-in task needs (its ``run_defaults``, e.g. the agentic task's tool
        markers), where the user set none; then the task takes the run's settings."""
        from ..presets import user_set
        fields = {k: v for k, v in getattr(s.task, "run_defaults", {}).items() if not user_set(s.cfg, k)}
        if fields:
            cfg = s.cfg.model_copy(deep=True)
            for k, v in fields.items():
                setattr(cfg, k, v)
            s.cfg = cfg
            s.say(f"built-in task {s.task.name}: " + ", ".join(f"{k}={v!r}" for k, v in fields.items()))
        s.task.configure(s.cfg)

    def _build(self, s: TokenState) -> None:
        from accelerate.utils import set_seed
        algo, cfg = s.algo, s.cfg
        s.kind = algo.plan.data  # prompts | demonstrations | pairs (compiler/passes/plan.py)
        s.builtin = cfg.data is None
        s.reward_head = "reward_head" in algo.requires   # trains a reward model (models/reward_head.py)
        if s.builtin:
            from ..tasks.tasks import ArithmeticTask
            s.task = ArithmeticTask()
            if "tree_search" in algo.requires:  # the step-structured task (tasks/step_task.py)
                from ..tasks.step_task import BuiltinStepTask
                s.task = BuiltinStepTask()
            elif "env" in algo.requires and not cfg.env and not cfg.tools:  # episodes: tasks/tool_task.py
                from ..tasks.tool_task import BuiltinToolTask
                s.task = BuiltinToolTask()
                self._apply_task_defaults(s)
                cfg = s.cfg
        # effective settings
        s.steps = cfg.steps or (300 if s.builtin else 100)
        s.batch_size = cfg.batch_size or (16 if s.builtin else 8)
        s.max_new_tokens = cfg.max_new_tokens or (s.task.max_new_tokens if s.builtin else 64)
        s.lr = cfg.lr or (1e-3 if cfg.model is None else 1e-5)
        s.eval_every = cfg.eval_every if cfg.eval_every is not None else (25 if s.builtin else 0)
        if s.batch_size % s.world:
            raise RunError(f"batch_size {s.batch_size} does not split over {s.world} processes",
                           hint=f"use a multiple of {s.world}")
        s.local_batch = s.batch_size // s.world
        set_threads(cfg, 1 if cfg.model is None else 0)
        set_seed(cfg.seed)
        s.records = lm_setup.load_data(s)   # data first: bad data fails before any model is built
        lm_setup.load_models(s)
        from ..scoring.bind import bind_scorers
        s.scorers = bind_scorers(s)
        s.ref_cache = ReferenceCache(s)  # offline data, fixed reference (models/fastpath.py)
        from .lm_extras import setup_extras  # iterate, embeddings, tree search, reward-model eval
        setup_extras(s)
        if s.eval_records is not None and not s.reward_head:  # reward models: lm_extras.py
            from .evaluation import UserEval
            s.user_eval = UserEval(s, s.eval_records)
        # the training forward (models/train_forward.py): activation checkpointing, then FSDP2's
        # shards, before the optimizer sees the parameters (parallel/wrap.py)
        from ..parallel.wrap import prepare_training, wrap_training
        s.logprob_temperature = algo.plan.logprob_temperature  # "sampling" resolved by the compiler
        prepare_training(s, self.forwarder(s, s.model), lambda m: self.forwarder(s, m))
        # optimizer / schedule
        params = [p for p in s.model.parameters() if p.requires_grad]
        from ..models.fastpath import adamw
        s.optimizer = adamw(params, lr=s.lr, weight_decay=cfg.weight_decay)  # fused where torch has it
        build_scheduler(s)  # warmup + lr_schedule (family/state.py)
        s.wrapped, s.optimizer = wrap_training(s, s.optimizer)  # DDP, or FSDP2's sharded forward
        s.grad_params = list(s.wrapped.parameters())

    def forwarder(self, run, model) -> TrainForward:
        return TrainForward(model, run.cfg, reward_head=run.reward_head, pairs=run.kind == "pairs",
                            temperature=run.logprob_temperature)

    # -- rows (loop/rollout_stage.py) ----------------------------------------------------------
    def next_prompts(self, run) -> list[dict]:
        return token_rows.next_records(run)

    def tok_prompt(self, run, prompt) -> list[int]:
        """A prompt (string or list of messages) as the policy's token ids: through the chat
        template when the run uses one (``run.prompt_format``, data/prompts.py). A prompt
        that leaves no room for ``max_new_tokens`` in the model's context is a RunError when the
        spec samples (``plan.generates``); otherwise, one that leaves no room for a single token."""
        ids = run.prompt_format.ids(prompt)  # cut to max_prompt_length when set (data/prompts.py)
        context = getattr(unwrap_causal_lm(run.policy).config, "max_position_embeddings", None)
        samples = run.algo.plan.generates
        if context and len(ids) + (run.max_new_tokens if samples else 1) > context:
            text = prompt if isinstance(prompt, str) else str(prompt)
            what = f"max_new_tokens {run.max_new_tokens}" if samples else "a completion"
            raise RunError(f"a prompt of {len(ids):,} tokens ({text[:50]!r}...) leaves no room for {what} "
                           f"in the model's context of {context:,} positions",
                           hint="shorten or drop the long prompts" + (", or lower max_new_tokens" if samples else ""))
        return ids

    def tok_completion(self, run, text: str) -> list[int]:
        return token_rows.tok_completion(run.tokenizer, text)

    @staticmethod
    def rows(groups) -> list[dict]:
        return [r for g in groups for r in g]

    def batch_of(self, run, rows: list[dict]) -> dict:
        return token_rows.tensors(rows, run.tokenizer.pad_token_id, run.device, labels=run.kind == "unpaired")

    def score_rows(self, run, rows: list[dict], batch: dict) -> None:
        prompts = [token_rows.scorer_prompt(run.tokenizer, r) for r in rows]  # as in the data, not templated
        texts = [r["text"] for r in rows]
        recs = [r["rec"] for r in rows]
        ids = [r["c"] for r in rows]
        for name, scorer in run.scorers.items():
            scorer.step = run.step + 1  # named in a reward's error message
            if hasattr(scorer, "state"):  # trainer_state of TRL-style reward functions
                scorer.state.global_step, scorer.state.max_steps = run.step, run.steps
            batch[name] = scorer(prompts, texts, recs, completion_ids=ids).to(run.device, torch.float32)
        if "env_reward" in run.algo.inputs:  # the environment's reward of each episode (rollout/episodes.py)
            batch["env_reward"] = torch.tensor([float(r.get("env_reward", 0.0)) for r in rows],
                                               dtype=torch.float32, device=run.device)
        if getattr(run, "embedder", None) is not None:  # embedding(response), scoring/embedding.py
            from ..parallel.wrap import gathered
            # the policy's own hidden states: under FSDP2 its whole weights for the duration (every
            # process scores in the same refill rounds, loop/rollout_stage.py)
            with gathered(run) if run.embedder.text is None else contextlib.nullcontext():
                batch["embedding"] = run.embedder(batch, texts)

    @staticmethod
    def select_rows(rows: list[dict], idx: list[int]) -> list[dict]:
        return [rows[i] for i in idx]

    @staticmethod
    def cat_rows(parts: list[list[dict]]) -> list[dict]:
        return [r for p in parts for r in p]

    def rollout_info(self, run, rows: list[dict], info: dict) -> None:
        info["texts"] = [r["text"] for r in rows]
        if run.prompt_format.truncated:  # max_prompt_length
            info["truncated_prompts"] = len(run.prompt_format.truncated)

    # -- forwards --------------------------------------------------------------------------------
    def forward_rows(self, run, model, batch, sl, *, grad, entropy=False, value=False) -> dict:
        """Outputs of ``model`` on rows ``sl`` of ``batch``: with ``grad``, through the wrapped
        training forward (``model`` must be ``run.model``); without, a plain forward of any model
        (old, reference, iterate; models/train_forward.py)."""
        args = [batch[k][sl] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
        if grad:
            assert model is run.model
            return run.wrapped(*args, entropy=entropy, value=value)
        from ..parallel.wrap import frozen_forward  # FSDP2's sharded reference
        fwd = run.train_forward if model is run.model else (frozen_forward(run, model) or self.forwarder(run, model))
        with torch.no_grad():
            return fwd(*args, entropy=entropy, value=value)

    def forward(self, run, mb: dict, sl: slice, rows) -> dict:
        """The training forward of a micro-batch (grad): logp, and entropy / value when read."""
        inputs = run.current.inputs
        return self.forward_rows(run, run.model, mb, sl, grad=True, entropy="entropy" in inputs,
                                 value="value" in inputs)

    def zero_loss(self, run, fw: dict | None = None) -> torch.Tensor:
        """Zero times the outputs ``fw``, or without them of a one-row dummy micro-batch: a process
        with no more rows (or a dropped micro-batch) still joins the reduction."""
        if fw is None:
            inputs = run.current.inputs
            dummy = dummy_micro_batch(run.tokenizer.pad_token_id or 0, run.device)
            fw = self.forward_rows(run, run.model, dummy, slice(0, 1), grad=True, entropy="entropy" in inputs,
                                   value="value" in inputs)
        return zero_loss(fw)

    def no_grad_forwards(self, run, batch: dict) -> None:
        from .lm_forwards import no_grad_forwards
        no_grad_forwards(self, run, batch)

    @staticmethod
    def reference_needed(run) -> bool:
        return "logp_ref" in run.algo.inputs or (run.cfg.force_reference and run.reference is not None)

    def reference_forward(self, run, batch) -> torch.Tensor:
        from .lm_forwards import reference_forward
        return reference_forward(self, run, batch)

    # -- metrics, evaluation, iterations -------------------------------------------------------
    def rollout_metrics(self, run, batch: dict) -> dict:
        from ..scoring.bind import EXTERNALS
        out = {f"{name}/mean": float(batch[name].float().mean()) for name in (*EXTERNALS, "env_reward")
               if name in batch}
        tree = getattr(run, "tree_sampler", None)
        for scorer in [*run.scorers.values(), getattr(tree, "reward", None)]:  # rewards/<name>/mean, /std
            out.update(scorer.pop_metrics() if hasattr(scorer, "pop_metrics") else {})
        lens = batch["length"].float()  # the policy's tokens per row (an episode's observations are not)
        out["length/mean"] = float(lens.mean())
        if run.world == 1:  # (metrics are averaged over processes, which min/max are not)
            out.update({"length/min": float(lens.min()), "length/max": float(lens.max())})
        return out

    def step_extra(self, run) -> dict | None:
        search = getattr(getattr(run, "tree_sampler", None), "stats", None)  # search/*
        episodes = getattr(run, "episode_stats", None)  # episodes/*: rollout(...) (rollout/episodes.py)
        engine = getattr(run, "engine_stats", None)  # vllm/*: use_vllm (rollout/vllm_samplers.py)
        return {**(search or {}), **(episodes or {}), **(engine or {})} or None

    def evaluate(self, run) -> float | None:
        if run.task is None:  # the user's held-out data (family/evaluation.py), or nothing
            return run.user_eval(run) if getattr(run, "user_eval", None) is not None else None
        from ..parallel.wrap import gathered
        with gathered(run):  # whole weights for generation under FSDP2
            return run.task.eval_score(run.policy, run.tokenizer, run.cfg.eval_size, prompt_format=run.prompt_format)

    def before_steps(self, run) -> None:
        if run.cfg.precompute_reference and self.reference_needed(run):
            run.ref_cache.precompute(run)
            from ..parallel.wrap import pad_frozen_forwards
            pad_frozen_forwards(run)  # FSDP2: as many reference forwards on every process

    # -- checkpoints (the files: family/lm_policy_io.py) ------------------------------------------
    save_weights = staticmethod(save_weights)   # (run, folder, final=False): checkpoint or final model/
    load_weights = staticmethod(load_weights)

    @staticmethod
    def checkpoint_state(run) -> dict:
        """What ``state.json`` holds besides the settings (its ``spec`` is checked on --resume)."""
        state = {"step": run.step, "cursor": run.cursor, "spec": run.algo.name, "world": run.world,
                 "seed": run.cfg.seed}
        if hasattr(run.records, "position"):  # streamed data (data/stream.py): where the stream is
            state["stream"] = run.records.position()
        return state

    @staticmethod
    def process_state(run, restore: dict | None = None) -> dict:
        """The tree-search sampler's pairs found but not yet trained on (a process's own);
        with ``restore`` (a checkpoint's), put them back."""
        tree = run.tree_sampler
        if tree is not None and restore is not None and "tree_buffer" in restore:
            tree.buffer = restore["tree_buffer"]
        return {"tree_buffer": tree.buffer} if tree is not None else {}


__all__ = ["TokenPolicy", "PolicyWithValueHead"]
