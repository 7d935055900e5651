"""``generate(...)`` and ``rollout(...)`` episodes drawn by a vLLM engine (``use_vllm: true``).

``build_sampler`` (rollout/base.py) takes the class of ``ENGINE_SAMPLERS`` (registered here with
``register(kind, engine="vllm")``) for a kind when the
run sets ``use_vllm``; everything else about the sampler (options, rows, groups, the episodes'
environments and tools) is the lean sampler's. The spec computes the same thing; only where
the tokens are drawn changes.

- ``generate``: each prompt's token ids (through the run's prompt format, as the lean sampler
  encodes them) go to the engine with ``n`` (a group's completions share their prompt; vLLM's
  prefix cache shares its KV cache), seeded per (seed, step, process, round) through the
  round's seed (vllm_engine.request_seed). A completion ends at EOS (kept, as the lean
  sampler keeps it) or after ``max_tokens``; the run's ``stop`` strings cut it afterwards
  (``stops.stop_at``, the lean sampler's definition of where a completion ends).
- ``rollout``: each turn sends each live episode's whole token context (prompt, earlier turns,
  observations) to the engine, which continues it (prefix caching reuses the context's KV
  cache across turns); the turn's tokens and log-probs come back, as ``episodes.Turns`` gives
  them.
- Rows carry ``ls`` (``logp_sampler``): the engine's processed log-prob of each sampled token.

**Weights.** ``EngineHandle.sync`` pushes the policy's weights (LoRA: merged into the base for
the push, then unmerged) to the engine before a rollout when ``weight_sync_steps`` optimizer
steps have passed since the last push, and always before the run's first rollout (a resumed
run's too). The optimizer steps are counted by a post-step hook on the run's optimizer.

**Mismatch.** Each rollout, the trainer's log-probs of the sampled tokens (a no-grad forward of
the policy, the weights ``logp_old`` is read with) are compared with the engine's, as verl's
rollout-correction metrics do, and logged each step: ``vllm/mismatch_k3`` (mean over the
policy's tokens of exp(d) - 1 - d, d = logp_trainer - logp_sampler), ``vllm/ratio_max`` (the
largest exp(d), the largest importance weight a TIS correction sees), ``vllm/logp_diff_max``
(max |d|), and ``vllm/sync_s`` / ``vllm/version`` (the weights' version: pushes so far).
"""

from __future__ import annotations

import time
import weakref

import torch

from ..data import token_rows
from ..models.loaders import unwrap_causal_lm
from .base import ENGINE_SAMPLERS, register
from .episodes import Rollout, Turns
from .generate import Generate
from .generation import _eos_ids
from .stops import stop_at
from .vllm_engine import SamplingSpec


# engines are kept per (mode, model, dtype, ...) for the process's lifetime: a second run on the
# same model (the tests, a pipeline's stages) reuses the engine; its first rollout pushes its weights
_ENGINES: dict[tuple, object] = {}
_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def close_engines() -> None:
    """Free every engine this process holds."""
    for eng in _ENGINES.values():
        eng.close()
    _ENGINES.clear()


def _build_engine(run):
    cfg = run.cfg
    lm = unwrap_causal_lm(run.policy)
    if cfg.vllm_mode == "server":
        from .vllm_server import ServerFleet
        key = ("server", tuple(cfg.vllm_server_base_url))
        if key not in _ENGINES:
            _ENGINES[key] = ServerFleet(cfg.vllm_server_base_url)
        return _ENGINES[key]
    from .vllm_engine import ColocatedVLLM
    max_len = getattr(lm.config, "max_position_embeddings", None)
    key = ("colocate", str(run.model_dir), cfg.dtype, max_len, cfg.vllm_gpu_memory_utilization,
           cfg.vllm_tensor_parallel_size, cfg.vllm_enable_sleep_mode)
    if key not in _ENGINES:
        t0 = time.perf_counter()
        _ENGINES[key] = ColocatedVLLM(run.model_dir, dtype=cfg.dtype, seed=cfg.seed, max_model_len=max_len,
                                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                      tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                                      enable_sleep_mode=cfg.vllm_enable_sleep_mode)
        run.say(f"vLLM: colocated engine on {run.model_dir} ready in {time.perf_counter() - t0:.1f}s")
    return _ENGINES[key]


def policy_weights(model):
    """``(name, tensor)`` of the policy in the Hugging Face checkpoint's names, one at a time; with
    LoRA (a PEFT model) the adapters are merged into the base for the push and unmerged after it."""
    peft = hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")
    if peft:
        model.merge_adapter()
    try:
        lm = unwrap_causal_lm(model)
        for name, t in lm.state_dict().items():
            if peft:
                if "lora_" in name or "original_module" in name:
                    continue
                name = name.replace(".base_layer", "").replace(".modules_to_save.default", "")
            yield name, t.detach()
    finally:
        if peft:
            model.unmerge_adapter()


class EngineHandle:
    """A run's view of its engine: when to push weights, and the step's engine metrics."""

    def __init__(self, run):
        self.engine = _build_engine(run)
        self.updates = 0          # optimizer steps so far (this process's run)
        self.synced_at = None     # self.updates at the last push (None: never pushed for this run)
        self.stats: dict = {}
        opt = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper -> torch's optimizer
        self._hook = opt.register_step_post_hook(self._stepped)

    def _stepped(self, *_):
        self.updates += 1

    def sync(self, run) -> None:
        k = run.cfg.weight_sync_steps
        if self.synced_at is not None and self.updates - self.synced_at < k:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            self.engine.load_weights(policy_weights(run.policy))
        self.synced_at = self.updates
        self.stats["vllm/sync_s"] = time.perf_counter() - t0

    def mismatch(self, run, rows: list[dict]) -> None:
        """The engine/trainer log-prob mismatch of ``rows`` (see the module docstring)."""
        rows = [r for r in rows if r["c"]]
        if not rows:
            return
        pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
        d_all, m_all = [], []
        size = max(1, run.cfg.micro_batch_size) * 8
        for s in range(0, len(rows), size):
            part = rows[s:s + size]
            batch = token_rows.tensors(part, pad, run.device)
            fw = run.family.forward_rows(run, run.model, batch, slice(0, len(part)), grad=False)
            d_all.append((fw["logp"].float() - batch["logp_sampler"]).flatten())
            m_all.append(batch["mask"].flatten())
        d, m = torch.cat(d_all), torch.cat(m_all) > 0
        d = d[m]
        if d.numel() == 0:
            return
        self.stats.update({"vllm/mismatch_k3": float((torch.exp(d) - 1 - d).mean()),
                           "vllm/ratio_max": float(torch.exp(d).max()),
                           "vllm/logp_diff_max": float(d.abs().max()),
                           "vllm/version": float(self.engine.version)})
        run.engine_stats = dict(self.stats)  # logged with the step (models/token_policy.py step_extra)


def engine_handle(run) -> EngineHandle:
    h = _HANDLES.get(run)
    if h is None:
        h = _HANDLES[run] = EngineHandle(run)
    return h


def _spec(sampler, run, ends) -> SamplingSpec:
    return SamplingSpec(max_tokens=int(sampler.option("max_tokens", run.max_new_tokens)),
                        temperature=float(sampler.option("temperature")), top_p=float(sampler.option("top_p")),
                        top_k=int(sampler.option("top_k", 0)), min_p=float(sampler.option("min_p", 0.0)),
                        repetition_penalty=float(sampler.option("repetition_penalty", 1.0)),
                        stop_token_ids=tuple(ends))


@register("generate", engine="vllm")
class EngineGenerate(Generate):
    """``generate(...)`` drawn by the engine (see the module docstring)."""

    def sample(self, recs, seed):
        run = self.run
        h = engine_handle(run)
        h.sync(run)
        tok = run.tokenizer
        eos = _eos_ids(unwrap_causal_lm(run.policy), tok)
        n = int(self.option("n"))
        prompts = [run.tok_prompt(r["prompt"]) for r in recs]  # the prompt format's ids; too long: a RunError
        outs = h.engine.generate(prompts, n, _spec(self, run, eos), seed)
        stop = tuple(run.cfg.stop)
        groups = []
        for rec, p, comps in zip(recs, prompts, outs):
            group = []
            for c in comps:
                ids, lps = c.ids, c.logprobs
                if stop and ids:
                    m = stop_at(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), tok, stop)
                    k = int(m.sum())
                    ids, lps = ids[:k], lps[:k]
                group.append({"p": list(p), "c": list(ids), "text": tok.decode(ids, skip_special_tokens=True),
                              "rec": rec, "ls": list(lps)})
            groups.append(group)
        h.mismatch(run, [r for g in groups for r in g])
        return groups


class EngineTurns(Turns):
    """One turn of a batch of episode contexts, drawn by the engine: the ``Turns`` of
    episodes.py with its sampling replaced (the ends, the end-of-call cut and ``play`` are its)."""

    def __init__(self, engine, lm, tok, *, seed: int, top_k=0, min_p=0.0, repetition_penalty=1.0, **kw):
        super().__init__(lm, tok, seed=seed, **kw)
        self.engine, self.round_seed = engine, int(seed)
        self.extra = dict(top_k=int(top_k), min_p=float(min_p), repetition_penalty=float(repetition_penalty))
        self.turn = 0

    def __call__(self, contexts):
        spec = SamplingSpec(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                            stop_token_ids=tuple(self.ends), **self.extra)
        outs = self.engine.generate([list(c) for c in contexts], 1, spec, self.round_seed * 7919 + self.turn)
        self.turn += 1
        turns = []
        for (c,) in outs:
            ids = list(c.ids)
            cut = next((k + 1 for k, tk in enumerate(ids) if tk in self.ends), len(ids))
            cut = self._stop(ids[:cut])
            turns.append((ids[:cut], list(c.logprobs[:cut])))
        return turns


@register("rollout", engine="vllm")
class EngineRollout(Rollout):
    """``rollout(...)`` episodes whose turns the engine draws (see the module docstring)."""

    def sample(self, recs, seed):
        run = self.run
        h = engine_handle(run)
        h.sync(run)
        self._engine = h.engine
        groups = super().sample(recs, seed)
        h.mismatch(run, [r for g in groups for r in g])
        return groups

    def make_turns(self, lm, tok, **kw):
        kw["logprobs"] = True  # logp_sampler, and the mismatch metrics
        return EngineTurns(self._engine, lm, tok, top_k=int(self.option("top_k", 0)),
                           min_p=float(self.option("min_p", 0.0)),
                           repetition_penalty=float(self.option("repetition_penalty", 1.0)), **kw)


__all__ = ["ENGINE_SAMPLERS", "EngineGenerate", "EngineRollout", "EngineHandle", "close_engines", "policy_weights"]
