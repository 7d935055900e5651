"""One training engine for every compiled spec, on ``accelerate``.

``Engine(algo, cfg).train()`` builds exactly what ``algo.requires`` / ``algo.inputs`` name
(policy; a reference only if ``reference`` is required -- with LoRA the policy with its
adapters disabled; a value head only for ``critic``), then per optimizer step:

    data -> sample (the spec's `sample` call, or the data set's pairs / demonstrations)
         -> externals (reward, reward_model, preference) -> algo.score (filters; refill)
         -> no-grad forwards for logp_old / logp_ref / value_old, only if read
         -> algo.advantage
         -> epochs x minibatches: micro-batches along whole groups, logp (+ entropy /
            value if read), algo.step_loss(micro, totals), backward; DDP reduces the
            gradients over processes; clip; AdamW + LR schedule.

Distributed runs (``accelerate launch --multi_gpu --num_processes N``, or torchrun): the
training forward is one module (runtime/train_forward.py) that ``accelerator.prepare`` wraps
in DDP. Each process takes its slice of every global batch of prompts; the loss normalizers
(``totals``: tokens, responses, groups) are summed over micro-batches and processes, so the
per-process losses add up to the loss of the whole batch; DDP *averages* gradients, so each process
back-propagates ``world * loss`` and the update is the one of the whole batch. Filters can
leave processes with different numbers of micro-batches: the count of each update is
agreed first, and a process that has fewer runs zero-weight padding micro-batches, so every
process joins every gradient reduction. Batch-wide statistics in ``score`` and ``advantage``
(``whiten``, ``batch_std``, means and sums) are taken over all processes
(``ops.batch_stats_reduce``). ``parallel=fsdp2`` (or accelerate's FSDP2 config) shards the
training forward with ``fully_shard`` instead of DDP, and mixed precision, activation
checkpointing and LoRA settings apply (runtime/parallel/); FSDP1 and DeepSpeed are refused.

Reproducibility: sampling uses a seed derived from (seed, step, process, round), minibatch
shuffles from (seed, step, epoch), so a resumed run reproduces an uninterrupted one.

The run around the steps -- resume, metrics.jsonl and trackers, evaluations, the LR schedule,
the progress bar, atomic checkpoint / model directories, curves.png -- is ``TrainingLoop``'s
(runtime/loop.py, shared with the flow engine); ``Engine`` provides the hooks: the step, the
evaluation, and what its checkpoint and final model hold (``checkpoint/``: ``model/`` with the
tokenizer, ``trainable.safetensors``, the reference / iterate when they change, optimizer,
RNG states, ``state.json`` with step and data cursor; ``model/``: the LM, LoRA merged, plus
``value_head.safetensors`` for a critic).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path

import torch

from .config import RunConfig, load_config
from .errors import RunError, RunFailure
from .fastpath import ReferenceCache
from .loop import PHASES, TrainingLoop, _mix
from .models import PolicyWithValueHead, add_value_head, load_frozen_copy, load_policy, unwrap_causal_lm
from .train_forward import TrainForward, dummy_micro_batch, zero_loss

EXTERNALS = ("reward", "reward_model", "preference")


def _destroy_process_group() -> None:
    """At interpreter exit: tear the process group down before the C++ runtime goes."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Engine(TrainingLoop):
    """A training run of one compiled algorithm (see the module docstring)."""

    def __init__(self, algo, cfg: RunConfig, resume: bool = False, console=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except Exception:
            pass
        self.algo = algo
        self.cfg = cfg
        self.resume = resume
        self.builds = {"policy": 0, "reference": 0, "critic": 0}
        self.out = Path(cfg.out)
        log_with = list(cfg.log_with)
        from .tracking import check_trackers
        check_trackers(log_with)  # unknown or missing trackers: a RunError before anything is built
        # cpu=True without a GPU: accelerate then picks gloo (MULTI_CPU) under torchrun / launchers
        # buffers (rotary tables) are the same on every process: no broadcast at each forward
        # parallel: the parallel / precision / LoRA settings checked before anything loads (runtime/parallel/settings.py)
        from .parallel import precision, settings
        self.parallel_plan = settings.resolve(cfg, algo)
        self.acc = Accelerator(log_with=log_with or None, project_dir=str(self.out),
                               cpu=not torch.cuda.is_available(),
                               mixed_precision=precision.accelerator_setting(self.parallel_plan),  # parallel: autocast
                               kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        from accelerate.utils import DistributedType
        accepted = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        if self.parallel_plan.fsdp2:  # parallel: accelerate's FSDP2 config; runtime/parallel/fsdp2.py shards
            accepted += (DistributedType.FSDP,)
        if self.acc.distributed_type not in accepted:
            raise RunError(f"accelerate's {self.acc.distributed_type.value} mode is not supported by this runtime yet",
                           hint="use DDP (the default of `accelerate launch --multi_gpu`) or FSDP2 "
                                "(--set parallel=fsdp2, or fsdp_version: 2 in the accelerate config)")
        self.rank = self.acc.process_index
        self.world = self.acc.num_processes
        if self.world > 1:  # processes that exit with the process group alive can abort (gloo threads)
            import atexit
            atexit.register(_destroy_process_group)
        self.main = self.acc.is_main_process
        self.device = self.acc.device
        from rich.console import Console
        self.console = console or Console(stderr=False, highlight=False)
        self._apply_builtin_preset()
        self._setup()

    # -- setup -------------------------------------------------------------------------
    def _apply_builtin_preset(self) -> None:
        """Fill what the user left unset from the spec's built-in demo preset (runtime/presets.py):
        only on the built-in task and model; ``self.cfg`` becomes a copy, the caller's is kept."""
        from .presets import builtin_preset, describe
        fields, params = builtin_preset(self.algo, self.cfg)
        if not fields and not params:
            return
        cfg = self.cfg.model_copy(deep=True)
        for k, v in fields.items():
            setattr(cfg, k, v)
        if params:
            import alignspec
            cfg.params = {**cfg.params, **params}
            self.algo = alignspec.compile(self.algo.spec, **params)
        self.cfg = cfg
        self.say(describe(self.algo.name, fields, params))

    def _setup(self) -> None:
        from accelerate.utils import set_seed
        algo, cfg = self.algo, self.cfg
        unsupported = {"flow"} & set(algo.requires)
        if unsupported:
            raise RunError(f"{algo.name} needs {', '.join(sorted(unsupported))}, which this runtime "
                           "does not provide yet")
        self.sample_call = algo.graph.graph.get("sample")
        self.kind = algo.spec.data or ("pairs" if self.sample_call is None and algo.group_size == 2
                                       else "demonstrations" if self.sample_call is None else "prompts")
        self.builtin = cfg.data is None
        self.task = None
        self.reward_head = "reward_head" in algo.requires   # trains a reward model (runtime/reward_head.py)
        if self.builtin:
            from .tasks import ArithmeticTask
            self.task = ArithmeticTask()
            if "tree_search" in algo.requires:  # the step-structured task (runtime/step_task.py)
                from .step_task import BuiltinStepTask
                self.task = BuiltinStepTask()
        # effective settings
        self.steps = cfg.steps or (300 if self.builtin else 100)
        self.batch_size = cfg.batch_size or (16 if self.builtin else 8)
        self.max_new_tokens = cfg.max_new_tokens or (self.task.max_new_tokens if self.builtin else 64)
        self.lr = cfg.lr or (1e-3 if cfg.model is None else 1e-5)
        self.eval_every = cfg.eval_every if cfg.eval_every is not None else (25 if self.builtin else 0)
        if self.batch_size % self.world:
            raise RunError(f"batch_size {self.batch_size} does not split over {self.world} processes",
                           hint=f"use a multiple of {self.world}")
        self.local_batch = self.batch_size // self.world
        self._set_threads(1 if cfg.model is None else 0)
        set_seed(cfg.seed)
        self.records = self._load_data()   # data first: bad data fails before any model is built
        # model
        if cfg.model is None:
            from .tasks import builtin_model_dir
            warm = self.kind != "demonstrations" or self.sample_call is not None
            builtin_model_dir = getattr(self.task, "builtin_model_dir", builtin_model_dir)
            with self.acc.main_process_first():
                self.model_dir, settings = builtin_model_dir(warm=warm, seed=0)
            self.say(f"model: built-in tiny llama ({'after a short SFT warm-up on the task' if warm else 'random init'}), "
                     f"cached at {self.model_dir}")
        else:
            self.model_dir = cfg.model
        if cfg.init_model:  # a pipeline stage starts from an earlier stage's model
            self.model_dir = cfg.init_model
            self.say(f"init: weights from {cfg.init_model}")
        if self.reward_head:
            from .reward_head import load_reward_model
            self.policy, self.tokenizer = load_reward_model(self.model_dir, dtype=cfg.dtype, device=self.device)
            self.say("reward model: a sequence-classification head (num_labels = 1) on the model's body")
        else:
            from .parallel.lora import quantized_load_kwargs  # parallel: QLoRA's 4-bit base
            self.policy, self.tokenizer = load_policy(self.model_dir, dtype=cfg.dtype, device=self.device,
                                                      extra=quantized_load_kwargs(cfg, self.device))
        self.builds["policy"] += 1
        self.lora = cfg.lora_r > 0 or cfg.lora_adapter is not None  # parallel: or an existing adapter
        if self.lora:
            if algo.train.get("reference") == "iterate" and "reference" in algo.requires:
                raise RunError("LoRA with `reference = \"iterate\"` is not supported yet",
                               hint="set lora_r: 0 for this spec")
            from .parallel.lora import add_adapters  # parallel: peft.LoraConfig from the run settings
            self.policy = add_adapters(self.policy, cfg, reward_head=self.reward_head)
        self.model = self.policy
        if "critic" in algo.requires:
            self.model = add_value_head(self.policy)
            self.builds["critic"] += 1
        self.model.train()
        self.reference = None
        if ("reference" in algo.requires or cfg.force_reference) and not self.lora:
            self.reference = load_frozen_copy(cfg.reference_model or self.model_dir, dtype=cfg.dtype,
                                              device=self.device)
            if cfg.reference_model:
                self.say(f"reference: {cfg.reference_model}")
            self.builds["reference"] += 1
        # scorers
        self.scorers = self._bind_scorers()
        self.ref_cache = ReferenceCache(self)  # offline data, fixed reference (runtime/fastpath.py)
        from .lm_extras import setup_extras  # iterate, embeddings, tree search, reward-model eval
        setup_extras(self)
        # parallel: activation checkpointing, then FSDP2 sharding, before the optimizer sees the parameters
        self.logprob_temperature = self._logprob_temperature()
        from .parallel.fsdp2 import prepare_forward
        self.train_forward = prepare_forward(self)
        # optimizer / schedule
        params = [p for p in self.model.parameters() if p.requires_grad]
        from .fastpath import adamw
        self.optimizer = adamw(params, lr=self.lr, weight_decay=cfg.weight_decay)  # fused where torch has it
        self._build_scheduler()  # warmup + lr_schedule (runtime/loop.py)
        # the training forward, wrapped by accelerate (DDP under `accelerate launch`; runtime/train_forward.py)
        if self.parallel_plan.fsdp2:  # parallel: already sharded (runtime/parallel/fsdp2.py)
            self.wrapped, self.optimizer = self.train_forward, self.acc.prepare(self.optimizer)
        else:
            self.wrapped, self.optimizer = self.acc.prepare(self.train_forward, self.optimizer)
        self._init_iterations()
        self.cursor = 0

    def _logprob_temperature(self) -> float:
        """The spec's ``train: logprob_temperature``: a number, or ``"sampling"`` = the temperature
        its sampler draws at (TRL and verl divide the logits by it); 1 by default."""
        t = self.algo.train.get("logprob_temperature", 1)
        if t != "sampling":
            return float(t)
        from alignspec.dsl import ast
        temps = set()

        def visit(call):
            if call.func in ("generate", "tree_search"):
                temps.add(float(self._kw(call, "temperature", 1.0, self.algo)))
            for a in call.args:
                if isinstance(a, ast.Call):
                    visit(a)
        if self.sample_call is not None:
            visit(self.sample_call)
        if len(temps) != 1:
            raise RunError(f"{self.algo.name}: logprob_temperature = \"sampling\" needs one sampling temperature, "
                           f"found {sorted(temps) or 'none'}", hint="set train: logprob_temperature to a number")
        return temps.pop()

    def _forwarder(self, model) -> TrainForward:
        return TrainForward(model, self.cfg, reward_head=self.reward_head, pairs=self.kind == "pairs",
                            temperature=self.logprob_temperature)

    def _load_data(self) -> list[dict]:
        need = {"prompts": ["prompt"], "demonstrations": ["prompt", "response"],
                "pairs": ["prompt", "chosen", "rejected"]}.get(self.kind, ["prompt"])
        if self.builtin:
            recs = self.task.records(self.kind)
            self.say(f"data: built-in task {self.task.name} ({len(recs)} {self.kind} from "
                     f"{len(self.task.train_problems)} training problems; {len(self.task.eval_problems)} held-out)")
            return recs
        from .data import load_records
        recs = load_records(self.cfg.data, self.cfg.fields, required=need)
        self.say(f"data: {self.cfg.data} ({len(recs)} rows, {self.kind})")
        return recs

    def _bind_scorers(self) -> dict:
        from .rewards import RewardFunctions, SequenceScorer
        cfg, out = self.cfg, {}
        wanted = [n for n in EXTERNALS if n in self.algo.inputs]
        for name in wanted:
            if name == "reward":
                names = cfg.rewards or (["exact_answer"] if self.builtin else [])
                if not names:
                    raise RunError(f"{self.algo.name} scores with reward(response), but no reward is configured",
                                   hint="set rewards: [exact_answer, format, length] or 'module:function'")
                out[name] = RewardFunctions(names)
                self.say(f"reward: {' + '.join(names)}")
                continue
            path = cfg.reward_model if name == "reward_model" else cfg.preference_model
            if path:
                out[name] = SequenceScorer(path, device=self.device)
                self.say(f"{name}: sequence classifier from {path}")
            elif self.builtin:
                out[name] = RewardFunctions(["exact_answer"])
                self.say(f"[yellow]{name}: no {'reward' if name == 'reward_model' else 'preference'} model "
                         f"configured; using the built-in task's exact_answer reward in its place "
                         f"(built-in default, not a learned model)[/yellow]")
            else:
                key = "reward_model" if name == "reward_model" else "preference_model"
                raise RunError(f"{self.algo.name} scores with {name}(response), but no {key} is configured",
                               hint=f"set {key}: <directory of a sequence classifier>")
        return out

    # -- per-iteration algorithm (param schedules; TrainingLoop.algo_for) ---------------
    def _policy_state(self) -> dict:
        return unwrap_causal_lm(self.model).state_dict()

    def _start_iteration(self, it: int, replace: bool = True) -> None:
        super()._start_iteration(it, replace)
        if replace and it > 0:
            from .iterations import refresh_iterate
            refresh_iterate(self)  # pi_t := the policy (when it is not the reference itself)

    # -- data and sampling ----------------------------------------------------------------
    def _next_records(self) -> list[dict]:
        """This process's slice of the next global batch of rows (epoch-wise seeded shuffles)."""
        n, B = len(self.records), self.batch_size
        rows = []
        for j in range(self.cursor, self.cursor + B):
            epoch, pos = divmod(j, n)
            perm = self._perm(epoch)
            rows.append(self.records[perm[pos]])
        self.cursor += B
        lo = self.rank * self.local_batch
        return rows[lo:lo + self.local_batch]

    def _perm(self, epoch: int):
        if getattr(self, "_perm_epoch", None) != epoch:
            g = random.Random(_mix(self.cfg.seed, epoch, 7))
            perm = list(range(len(self.records)))
            g.shuffle(perm)
            self._perm_epoch, self._perm_cache = epoch, perm
        return self._perm_cache

    def _tok_prompt(self, prompt) -> list[int]:
        """A prompt (string or list of messages) as the policy's token ids: through the chat
        template when the run uses one (``self.prompt_format``, runtime/prompts.py)."""
        return self.prompt_format.ids(prompt)

    def _tok_completion(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _kw(self, call, name, default, algo=None):
        from alignspec.dsl import ast
        params = (algo or self.current).params
        for kw in call.kwargs:
            if kw.name == name:
                v = kw.value
                if isinstance(v, ast.Number):
                    return v.value
                if isinstance(v, ast.Name):
                    if v.id in params:
                        return params[v.id]
                    return v.id
                if isinstance(v, (ast.Str, ast.Bool)):
                    return v.value
                raise RunError(f"sampler argument {name} must be a number or a param name")
        return default

    def _sample(self, call, recs, seed) -> list[list[dict]]:
        """One group (list of rows) per record, for a sampler call of the spec."""
        f = call.func
        if f == "demonstration":
            return [[{"p": self._tok_prompt(r["prompt"]), "c": self._tok_completion(r["response"]),
                      "text": r["response"], "rec": r}] for r in recs]
        if f == "generate":
            from .generation import generate_groups
            n = int(self._kw(call, "n", 1))
            temp = float(self._kw(call, "temperature", 1.0))
            top_p = float(self._kw(call, "top_p", 1.0))
            which = self._kw(call, "model", "policy")
            max_tok = int(self._kw(call, "max_tokens", self.max_new_tokens))
            model = self.policy if getattr(self, "iterate", None) is None else self.iterate  # pi_t (iterations.py)
            ctx = contextlib.nullcontext()
            if which == "reference":
                if self.reference is not None:
                    model = self.reference
                elif self.lora:
                    ctx = self.policy.disable_adapter()
            from .parallel.fsdp2 import gathered
            with ctx, gathered(self):  # parallel: whole weights for generation under FSDP2
                ro = generate_groups(model, self.tokenizer, [r["prompt"] for r in recs], n,
                                     max_new_tokens=max_tok, temperature=temp, top_p=top_p,
                                     generator_seed=seed, fast=self.cfg.fast_sampling,
                                     prompt_format=self.prompt_format)
            groups = [[] for _ in recs]
            pm, cm = ro.prompt_mask.cpu(), ro.completion_mask.cpu()
            for i in range(ro.completion_ids.shape[0]):
                gi = int(ro.prompt_index[i])
                groups[gi].append({"p": ro.prompt_ids[i].cpu()[pm[i].bool()].tolist(),
                                   "c": ro.completion_ids[i].cpu()[cm[i].bool()].tolist(),
                                   "text": ro.texts[i], "rec": recs[gi]})
            return groups
        if f == "tree_search":  # runtime/mcts_sampler.py
            kw = {k: self._kw(call, k, d) for k, d in (("simulations", 16), ("branching", 3), ("depth", 4),
                                                        ("c_puct", 1.5), ("temperature", 1.0))}
            model = self.policy if getattr(self, "iterate", None) is None else self.iterate
            return self.tree_sampler.groups(model, recs, seed=seed, **kw)
        if f == "concat":
            parts = [self._sample(a, recs, _mix(seed, k)) for k, a in enumerate(call.args)]
            return [sum((p[i] for p in parts), []) for i in range(len(recs))]
        raise RunError(f"sampler {f}(...) is not supported by this runtime yet")

    def _groups_for(self, recs, seed) -> list[list[dict]]:
        if self.sample_call is not None:
            return self._sample(self.sample_call, recs, seed)
        if self.kind == "pairs":
            return [[{"p": self._tok_prompt(r["prompt"]), "c": self._tok_completion(r["chosen"]),
                      "text": r["chosen"], "rec": r},
                     {"p": self._tok_prompt(r["prompt"]), "c": self._tok_completion(r["rejected"]),
                      "text": r["rejected"], "rec": r}] for r in recs]
        from alignspec.dsl import ast
        return self._sample(ast.Call("demonstration", (ast.Name("prompt"),)), recs, seed)

    def _scorer_prompt(self, row: dict):
        """The prompt that scorers (rewards, reward and preference models) get for a row: the
        row's own ``prompt`` (a tree-search prefix), else its data record's -- as written in the
        data, a string or a list of messages, not the chat-templated text the policy saw."""
        if "prompt" in row:
            return row["prompt"]
        rec = row.get("rec") or {}
        if "prompt" in rec:
            return rec["prompt"]
        return self.tokenizer.decode(row["p"], skip_special_tokens=True)

    def _tensors(self, rows: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        B = len(rows)
        P = max(len(r["p"]) for r in rows)
        T = max(1, max(len(r["c"]) for r in rows))
        pid = torch.full((B, P), pad, dtype=torch.long)
        pm = torch.zeros((B, P), dtype=torch.long)
        cid = torch.full((B, T), pad, dtype=torch.long)
        cm = torch.zeros((B, T), dtype=torch.long)
        for i, r in enumerate(rows):
            p, c = r["p"], r["c"]
            if p:
                pid[i, P - len(p):] = torch.tensor(p)
                pm[i, P - len(p):] = 1
            if c:
                cid[i, :len(c)] = torch.tensor(c)
                cm[i, :len(c)] = 1
        d = self.device
        return {"prompt_ids": pid.to(d), "prompt_mask": pm.to(d), "completion_ids": cid.to(d),
                "completion_mask": cm.to(d), "mask": cm.to(d, torch.float32),
                "length": cm.sum(1).to(d, torch.float32)}

    # -- rollout ------------------------------------------------------------------------
    def _rollout(self, times) -> tuple[dict | None, dict]:
        algo = self.current
        G = algo.group_size
        kept_rows, carried, info = [], [], {"refill_rounds": 0, "dropped_groups": 0}
        carried_rows = []  # kept rows per round: tells group-level carried values (one per group) apart
        target = self.local_batch
        rnd = 0
        while True:
            recs = self._next_records()
            t0 = time.perf_counter()
            groups = self._groups_for(recs, _mix(self.cfg.seed, self.step, self.rank, rnd, 11))
            times["time/generation"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            rows = [r for g in groups for r in g]
            stats = self._batch_stats_context(bool(rows), "score")
            if rows:
                batch = self._tensors(rows)
                prompts = [self._scorer_prompt(r) for r in rows]  # as in the data, not templated
                texts = [r["text"] for r in rows]
                rrecs = [r["rec"] for r in rows]
                for name, scorer in self.scorers.items():
                    batch[name] = scorer(prompts, texts, rrecs).to(self.device, torch.float32)
                if getattr(self, "embedder", None) is not None:  # embedding(response), runtime/embedding.py
                    batch["embedding"] = self.embedder(batch, texts)
                with torch.no_grad(), stats:
                    s = algo.score(batch)
                sel = s.pop("rows")
                s.pop("keep")  # the row mask; `rows` already applies it
                n_groups = len(rows) // algo.sample_group_size
                idx = list(range(len(rows))) if sel is None else sel.tolist()
                kept_groups = len(idx) // G
                info["dropped_groups"] += n_groups - kept_groups
                for k, v in list(batch.items()):
                    if k in EXTERNALS:
                        s.setdefault(k, v if sel is None else v[sel])
                kept_rows.extend(rows[i] for i in idx)
                carried.append(s)
                carried_rows.append(len(idx))
            times["time/scoring"] += time.perf_counter() - t0
            have = len(kept_rows) // G
            short = torch.tensor([max(0, target - have)], device=self.device, dtype=torch.float32)
            if self.world > 1:
                short = self.acc.reduce(short, reduction="sum")
            if short.item() == 0:
                break
            if self._refill_capped(info, have, target, rnd):
                break
            rnd += 1
            info["refill_rounds"] = rnd
        if not kept_rows:
            return None, info
        n_keep = min(len(kept_rows) // G, target) * G
        batch = self._tensors(kept_rows[:n_keep])
        for k in carried[0]:
            vals = [c[k] for c in carried if k in c]
            if all(torch.is_tensor(v) and v.dim() > 0 for v in vals):
                per_group = G > 1 and any(carried_rows) and all(v.shape[0] * G == n for v, n in zip(vals, carried_rows))
                batch[k] = torch.cat([v.to(self.device) for v in vals])[:n_keep // G if per_group else n_keep]
            else:
                batch[k] = vals[0]
        info["texts"] = [r["text"] for r in kept_rows[:n_keep]]
        self._batch_rows = kept_rows[:n_keep]  # token ids per row: keys of the reference cache
        return batch, info

    def _forward(self, model, batch, sl, *, grad, entropy=False, value=False):
        """Outputs of ``model`` on rows ``sl`` of ``batch``: with ``grad``, through the wrapped
        training forward (``model`` must be ``self.model``); without, a plain forward of any model
        (old, reference, iterate; runtime/train_forward.py)."""
        args = [batch[k][sl] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
        if grad:
            assert model is self.model
            return self.wrapped(*args, entropy=entropy, value=value)
        fwd = self.train_forward if model is self.model else self._forwarder(model)
        with torch.no_grad():
            return fwd(*args, entropy=entropy, value=value)

    def _micro_slices(self, rows: int, G: int):
        m = self.cfg.micro_batch_size * G
        return [slice(s, min(s + m, rows)) for s in range(0, rows, m)]

    def _batch_stats_context(self, have_rows: bool, stage: str):
        """Batch-wide statistics (whiten, batch_std, means, sums) of ``score`` and ``advantage``
        over all processes' rows (``ops.batch_stats_reduce``). Every process calls this at every
        scoring round and every advantage stage, rows or not (it is a collective). A process
        without rows runs no stage, so when one has none every process keeps its own
        statistics for that stage (said in yellow). Specs without batch statistics skip it."""
        if self.world == 1 or not self.current.batch_statistics:
            return contextlib.nullcontext()
        flag = self.acc.reduce(torch.tensor([0.0 if have_rows else 1.0], device=self.device), reduction="sum")
        if flag.item() > 0:
            self.say(f"[yellow]step {self.step + 1}: a process has no rows for its {stage} stage; that stage's "
                     "batch statistics are per process[/yellow]")
            return contextlib.nullcontext()
        import torch.distributed as dist

        from alignspec import ops

        def all_sum(t):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t
        return ops.batch_stats_reduce(all_sum)

    def _no_grad_forwards(self, batch, times):
        algo = self.current
        G = algo.group_size
        t0 = time.perf_counter()
        rows = batch["mask"].shape[0]
        need_logp = "logp_old" in algo.inputs or self.cfg.force_old_forward
        need_value = "value_old" in algo.inputs
        # with self-play iterations the policy that sampled is the frozen iterate pi_t (iterations.py);
        # the critic (value head) is the current model's
        it = getattr(self, "iterate", None)
        sampler = it if it is not None else self.model
        lo, vo = [], []
        for sl in self._micro_slices(rows, G) if need_logp or need_value else []:
            if need_logp or sampler is self.model:
                o = self._forward(sampler, batch, sl, grad=False, value=need_value and sampler is self.model)
                lo.append(o["logp"])
                if "value" in o:
                    vo.append(o["value"])
            if need_value and sampler is not self.model:
                vo.append(self._forward(self.model, batch, sl, grad=False, value=True)["value"])
        if "logp_old" in algo.inputs:
            batch["logp_old"] = torch.cat(lo)
        if vo:
            batch["value_old"] = torch.cat(vo)
        if "logp_ref" in algo.inputs or (self.cfg.force_reference and self.reference is not None):
            lr = self.ref_cache.logprobs(batch, getattr(self, "_batch_rows", None), self._reference_forward)
            if "logp_ref" in algo.inputs:
                batch["logp_ref"] = lr
        times["time/ref_old_forward"] += time.perf_counter() - t0

    def reference_needed(self) -> bool:
        return "logp_ref" in self.algo.inputs or (self.cfg.force_reference and self.reference is not None)

    def _reference_forward(self, batch) -> torch.Tensor:
        """``[B, T]`` reference log-probs of ``batch`` (no grad, micro-batches of whole groups)."""
        from .fastpath import reference_model_ctx
        ref, ctx = reference_model_ctx(self)
        with ctx:
            return torch.cat([self._forward(ref, batch, sl, grad=False)["logp"]
                              for sl in self._micro_slices(batch["mask"].shape[0], self.current.group_size)])

    # -- one optimizer step ----------------------------------------------------------------
    def _train_step(self) -> dict:
        algo = self.current
        times = {k: 0.0 for k in PHASES}
        t_start, c_start = time.perf_counter(), time.process_time()
        batch, info = self._rollout(times)
        metrics: dict = {}
        if batch is None and self.world == 1:
            self.say(f"[yellow]step {self.step + 1}: no group survived the filters; step skipped[/yellow]")
            return {"loss": float("nan"), "skipped": 1, **times}
        G = algo.group_size
        stats = self._batch_stats_context(batch is not None, "advantage")
        if batch is not None:
            self._no_grad_forwards(batch, times)
            with torch.no_grad(), stats:
                adv = algo.advantage(batch)
            for k, v in adv.pop("metrics", {}).items():
                metrics[k] = float(v)
            batch.update(adv)
            for name in EXTERNALS:
                if name in batch:
                    metrics[f"{name}/mean"] = float(batch[name].float().mean())
            lens = batch["completion_mask"].sum(1).float()  # completion tokens per row
            metrics["length/mean"] = float(lens.mean())
            if self.world == 1:  # (metrics are averaged over processes, which min/max are not)
                metrics.update({"length/min": float(lens.min()), "length/max": float(lens.max())})
        rows = 0 if batch is None else batch["mask"].shape[0]
        n_groups = rows // G
        loss_sum, updates, stat_sums, stat_n, term_sums = 0.0, 0, {}, 0, {}
        grad_norms = []
        for chunk in self._minibatches(algo, n_groups):
            t0 = time.perf_counter()
            ridx = torch.tensor([g * G + j for g in chunk for j in range(G)], dtype=torch.long,
                                device=self.device)
            gidx = torch.tensor(chunk, dtype=torch.long, device=self.device)
            mb = {k: (v[ridx] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else
                      v[gidx] if G > 1 and torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n_groups
                      else v)  # per row, per group (one value per group), or batch-wide
                  for k, v in batch.items()} if batch is not None else None
            slices = self._micro_slices(len(ridx), G) if mb is not None else []
            # global normalizers and the update's micro-batch count, agreed over processes
            local = torch.tensor([0.0 if mb is None else float(mb["mask"].sum()), float(len(ridx)),
                                  float(len(chunk)), float(len(slices))], device=self.device, dtype=torch.float64)
            every = self.acc.gather(local[None]) if self.world > 1 else local[None]
            tot = every[:, :3].sum(0)
            totals = {"tokens": tot[0].clamp(min=1).float(), "responses": tot[1].clamp(min=1).float(),
                      "groups": tot[2].clamp(min=1).float()}
            n_micro = int(every[:, 3].max())
            if n_micro == 0:  # nothing to learn from on any process: no update
                continue
            mb_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            bad = None
            for i in range(n_micro):
                # DDP reduces gradients at the last backward of the update only
                sync = contextlib.nullcontext() if i == n_micro - 1 else self.acc.no_sync(self.wrapped)
                with sync:
                    if i >= len(slices) or bad is not None:  # padding: this process has no more rows
                        dummy = dummy_micro_batch(self.tokenizer.pad_token_id or 0, self.device)
                        fw = self._forward(self.model, dummy, slice(0, 1), grad=True,
                                           entropy="entropy" in algo.inputs, value="value" in algo.inputs)
                        self.acc.backward(zero_loss(fw))
                        continue
                    sl = slices[i]
                    fw = self._forward(self.model, mb, sl, grad=True, entropy="entropy" in algo.inputs,
                                       value="value" in algo.inputs)
                    gsl = slice(sl.start // G, sl.stop // G)  # micro-batches are whole groups
                    micro = {k: (v[sl] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(ridx) else
                                 v[gsl] if G > 1 and torch.is_tensor(v) and v.dim() > 0
                                 and v.shape[0] == len(chunk) else v)
                             for k, v in mb.items()}
                    micro.update(fw)
                    out = algo.step_loss(micro, totals)
                    bad = self._bad_term(out)
                    if bad is not None:
                        self.acc.backward(zero_loss(fw))  # keeps the processes in step; no update follows
                        continue
                    # DDP averages gradients over processes; the losses are shares of one sum
                    self.acc.backward(out.loss * self.world if self.world > 1 else out.loss)
                mb_loss += out.loss.detach().double()
                self._add_metrics(out.metrics, term_sums, stat_sums)
                stat_n += 1
            flag = torch.tensor([0.0 if bad is None else 1.0], device=self.device)
            if self.world > 1:
                flag = self.acc.reduce(flag, reduction="sum")
            if flag.item() > 0:
                raise self._non_finite(f"term '{bad}'" if bad else "a term on another process")
            times["time/policy_fwd_bwd"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if self.world > 1:
                mb_loss = self.acc.reduce(mb_loss, reduction="sum")
            if self.cfg.max_grad_norm and self.parallel_plan.fsdp2:  # parallel: the norm over all shards
                from .parallel.fsdp2 import clip_grad_norm_
                grad_norms.append(clip_grad_norm_(self.wrapped.parameters(), self.cfg.max_grad_norm))
            elif self.cfg.max_grad_norm:
                gn = self.acc.clip_grad_norm_(self.wrapped.parameters(), self.cfg.max_grad_norm)
                grad_norms.append(float(gn))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum += float(mb_loss)
            updates += 1
            times["time/optimizer"] += time.perf_counter() - t0
        metrics.update({k: v / max(1, stat_n) for k, v in stat_sums.items()})
        terms = {k: v / max(1, updates) for k, v in term_sums.items()}  # per update, like `loss`
        if self.world > 1:  # processes may hold different keys (one without rows has none)
            every = self._gather_objects((metrics, terms))
            metrics = {}
            for k in sorted({k for m, _ in every for k in m}):
                vals = [m[k] for m, _ in every if k in m]
                metrics[k] = sum(vals) / len(vals)  # the mean over the processes that report it
            terms = {k: sum(t.get(k, 0.0) for _, t in every) for k in sorted({k for _, t in every for k in t})}
        metrics.update(terms)
        res = self._step_record(loss_sum / max(1, updates), metrics, grad_norms,
                                n_groups * self.world if self.world > 1 else n_groups, info, times, t_start,
                                extra=getattr(getattr(self, "tree_sampler", None), "stats", None))  # search/*
        res["step_cpu_time"] = time.process_time() - c_start  # all threads; less sensitive to other load
        return res

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> float | None:
        if self.task is None:
            return None
        from .parallel.fsdp2 import gathered
        with gathered(self):  # parallel: whole weights for generation under FSDP2
            return self.task.eval_score(self.policy, self.tokenizer, self.cfg.eval_size,
                                        prompt_format=self.prompt_format)

    # -- checkpoints and the final model (written by TrainingLoop: runtime/loop.py) ----------
    def _trainable_state(self) -> dict:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.named_parameters() if v.requires_grad}

    def _barrier(self) -> None:
        self.acc.wait_for_everyone()

    # parallel: sharded runs checkpoint with torch.distributed.checkpoint (runtime/parallel/sharded_checkpoint.py)
    def save_checkpoint(self) -> None:
        if self.parallel_plan.fsdp2:
            from .parallel import sharded_checkpoint
            return sharded_checkpoint.save(self)
        super().save_checkpoint()

    def load_checkpoint(self) -> bool:
        if self.parallel_plan.fsdp2:
            from .parallel import sharded_checkpoint
            return sharded_checkpoint.load(self)
        return super().load_checkpoint()

    def save_final(self) -> None:
        if self.parallel_plan.fsdp2:
            from .parallel import sharded_checkpoint
            return sharded_checkpoint.save_final(self)
        super().save_final()

    def _save_weights(self, tmp: Path) -> None:
        """``model/`` (the LM, or its LoRA adapters, + tokenizer), the trainable parameters, and
        the reference / iterate when iterations change them."""
        from safetensors.torch import save_file
        lm = unwrap_causal_lm(self.model) if not self.lora else self.policy
        lm.save_pretrained(tmp / "model", safe_serialization=True)
        self.tokenizer.save_pretrained(tmp / "model")
        save_file(self._trainable_state(), str(tmp / "trainable.safetensors"))
        if self.reference is not None and self.current.train.get("reference") == "iterate":
            save_file({k: v.contiguous() for k, v in self.reference.state_dict().items()},
                      str(tmp / "reference.safetensors"))
        from .iterations import separate_iterate
        if separate_iterate(self) is not None:
            save_file({k: v.contiguous() for k, v in separate_iterate(self).state_dict().items()},
                      str(tmp / "iterate.safetensors"))

    def _process_state(self) -> dict:
        """Generators, and the tree-search sampler's pairs found but not yet trained on."""
        st = super()._process_state()
        if getattr(self, "tree_sampler", None) is not None:
            st["tree_buffer"] = self.tree_sampler.buffer
        return st

    def _set_process_state(self, state: dict) -> None:
        super()._set_process_state(state)
        if getattr(self, "tree_sampler", None) is not None and "tree_buffer" in state:
            self.tree_sampler.buffer = state["tree_buffer"]

    def _gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object
        return gather_object([obj])

    def _checkpoint_state(self) -> dict:
        return {"step": self.step, "cursor": self.cursor, "spec": self.algo.name, "world": self.world,
                "seed": self.cfg.seed}

    def _check_checkpoint(self, ck: Path, state: dict) -> None:
        if state.get("spec") != self.algo.name:
            raise RunError(f"{ck} is a checkpoint of {state.get('spec')!r}, not {self.algo.name!r}",
                           hint="use another --out, or run the same spec")

    def _load_weights(self, ck: Path) -> None:
        from safetensors.torch import load_file
        weights = load_file(str(ck / "trainable.safetensors"))
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in weights.items():
                if k not in named:
                    raise RunError(f"{ck}: parameter {k} does not belong to this model (different model or LoRA settings?)")
                named[k].copy_(v.to(named[k].device, named[k].dtype))
        if self.reference is not None and (ck / "reference.safetensors").is_file():
            self.reference.load_state_dict(load_file(str(ck / "reference.safetensors")))
        from .iterations import separate_iterate
        if separate_iterate(self) is not None and (ck / "iterate.safetensors").is_file():
            separate_iterate(self).load_state_dict(load_file(str(ck / "iterate.safetensors")))

    def _restore_position(self, state: dict) -> None:
        self.step, self.cursor = int(state["step"]), int(state["cursor"])

    def _write_model(self, tmp: Path) -> None:
        """The final model: the LM (LoRA merged into it) + tokenizer, and a critic's value head."""
        lm = unwrap_causal_lm(self.model)
        if self.lora:
            import copy
            lm = copy.deepcopy(self.policy).merge_and_unload()
        lm.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        if isinstance(self.model, PolicyWithValueHead):
            from safetensors.torch import save_file
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.value_head.state_dict().items()},
                      str(tmp / "value_head.safetensors"))

    # -- hooks of the run (TrainingLoop.train) -----------------------------------------------
    def _evaluates(self) -> bool:
        return self.task is not None

    def _run_line(self) -> str:
        return (f"run: {self.algo.name} for {self.steps} steps, batch {self.batch_size} "
                f"({self.world} process{'es' if self.world > 1 else ''}), lr {self.lr}, "
                f"builds {', '.join(k for k, v in self.builds.items() if v)}{' +LoRA' if self.lora else ''}")

    def _before_steps(self) -> None:
        if self.cfg.precompute_reference and self.reference_needed():
            self.ref_cache.precompute(self)


def build_engine(spec, *, model=None, data=None, config=None, sets=(), out=None, steps=None, seed=None,
                 save_every=None, resume=False, eval_every=None, profile=False, **extra) -> Engine:
    """Compile ``spec`` (name, path, text, Spec or CompiledAlgorithm), load the config, build."""
    import alignspec
    from alignspec.compiler.api import CompiledAlgorithm
    base = spec if isinstance(spec, CompiledAlgorithm) else alignspec.compile(spec)
    cfg = load_config(config, sets, spec_params=base.params, model=model, data=data, out=out, steps=steps,
                      seed=seed, save_every=save_every, eval_every=eval_every,
                      profile=True if profile else None, **extra)
    algo = base
    if cfg.params:
        merged = dict(cfg.params)
        if isinstance(spec, CompiledAlgorithm):
            merged = {**{k: v for k, v in spec.params.items()}, **merged}
        algo = alignspec.compile(base.spec, **merged)
    if "flow" in algo.requires:  # the flow-matching policy family has its own engine
        from .parallel import settings  # parallel: refuses the settings the flow engine does not take
        settings.resolve(cfg, algo)
        from .flow_engine import FlowEngine
        return FlowEngine(algo, cfg, resume=resume)
    return Engine(algo, cfg, resume=resume)


def run_from_cli(spec, model=None, data=None, config=None, sets=(), out=None, steps=None, seed=None,
                 save_every=None, resume=False, eval_every=None, profile=False) -> int:
    """Entry point of ``alignspec run``: 0 ok, 2 bad input (spec, config, data, paths), 1 run failure."""
    from alignspec import SpecError
    try:
        from .pipeline import load_pipeline, run_pipeline
        if load_pipeline(spec) is not None:  # a pipeline of stages (runtime/pipeline.py)
            run_pipeline(spec, model=model, data=data, config=config, sets=sets, out=out, steps=steps, seed=seed,
                         save_every=save_every, resume=resume, eval_every=eval_every, profile=profile)
            return 0
        engine = build_engine(spec, model=model, data=data, config=config, sets=sets, out=out, steps=steps,
                              seed=seed, save_every=save_every, resume=resume, eval_every=eval_every,
                              profile=profile)
        engine.train()
        return 0
    except SpecError as e:
        print(e.format() if hasattr(e, "format") else str(e), file=sys.stderr)
        return 2
    except RunFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
