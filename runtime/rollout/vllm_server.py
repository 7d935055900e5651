"""Server mode: a fleet of vLLM servers (``alignspec vllm-serve``) that the trainer sends token ids
to and pushes weights to, through vLLM's own HTTP endpoints. The engine interface of
vllm_engine.py (``generate``, ``load_weights``, ``version``, ``close``).

**Generation.** Each prompt is one request to ``POST /inference/v1/generate`` (vLLM's token-in,
token-out endpoint, on with ``--enable-scale-out``): ``{"token_ids": prompt, "sampling_params":
{n, temperature, ..., logprobs: 0, seed, detokenize: false}}``; the answer's choices carry the
sampled ``token_ids`` and each token's processed log-prob (``--logprobs-mode
processed_logprobs``). The prompts of a call are spread over the servers (prompt ``i`` to server
``i mod S``) and sent concurrently, a thread per request, so each server's continuous batching
sees them all at once.

**Weights.** ``load_weights`` pauses every server (``/pause?mode=keep``), opens an update
(``/start_weight_update``), writes the weights in chunks of whole layers (about 256 MB) as
safetensors files in ``/dev/shm`` and has every server load each chunk (``/update_weights``
with the ``alignspec_shm`` transfer engine, vllm_transfer.py), then ``/finish_weight_update``
with the new version and ``/resume``. The version is what issue 20's asynchronous loop tags each
response with (the generate endpoint answers the weight versions a completion was sampled with).

**Faults.** ``check_servers`` (before anything loads): every URL answers ``GET /health``, or a
RunError names it. A request that fails on the way (connection refused or reset, a timeout, an
HTTP 5xx) is retried with exponential backoff (``RETRIES`` tries, 1 s doubling: 15 s of waiting
in all); then a RunError names the URL and what it answered last, and the run stops (the loop keeps
its last checkpoint). A malformed or short answer is a RunError that says what was missing.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import RunError
from .vllm_engine import Completion, SamplingSpec, repeat, request_seed

RETRIES = 5          # tries of a failing request (then a RunError)
BACKOFF_S = 1.0      # the first wait; doubles each retry
TIMEOUT_S = 600.0    # one request's wait for its answer


class ServerError(Exception):
    """One try of a request failed in a way worth retrying."""


def _call(url: str, path: str, body=None, *, method: str = "POST", timeout: float = TIMEOUT_S):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")[:300]
        if e.code >= 500:
            raise ServerError(f"HTTP {e.code}: {text}") from e
        raise RunError(f"vLLM server {url}{path} refused the request: HTTP {e.code}: {text}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        raise ServerError(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise RunError(f"vLLM server {url}{path} answered something that is not JSON: {raw[:200]!r}") from e


def call(url: str, path: str, body=None, *, method: str = "POST", retries: int | None = None,
         timeout: float = TIMEOUT_S):
    """``_call`` retried with exponential backoff; a RunError naming ``url`` when every try failed."""
    tries = RETRIES if retries is None else retries
    wait, last = BACKOFF_S, ""
    for k in range(tries):
        try:
            return _call(url, path, body, method=method, timeout=timeout)
        except ServerError as e:
            last = str(e)
            if k + 1 < tries:
                time.sleep(wait)
                wait *= 2
    raise RunError(f"vLLM server {url} stopped answering ({path}: {last}, {tries} tries)",
                   hint="restart it (alignspec vllm-serve ...) and continue with --resume")


def check_servers(urls: list[str]) -> None:
    """Every server answers ``GET /health``; else a RunError that names the URL (before anything loads)."""
    for url in urls:
        try:
            _call(url, "/health", method="GET", timeout=5.0)
        except (ServerError, RunError) as e:
            raise RunError(f"vllm_mode: server, but no vLLM server answers at {url} ({e})",
                           hint="start one with `alignspec vllm-serve --port PORT` (it prints the URL), or set "
                                "vllm_server_base_url") from None


def parse_choices(url: str, answer, n: int, prompt_len: int) -> list[Completion]:
    """The ``n`` completions of a ``/inference/v1/generate`` answer (a RunError that names what is wrong)."""
    where = f"vLLM server {url}/inference/v1/generate"
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        raise RunError(f"{where} answered without choices: {str(answer)[:200]}")
    choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise RunError(f"{where} answered {len(choices)} completions for n={n}")
    out = []
    for c in choices:
        ids = c.get("token_ids")
        content = (c.get("logprobs") or {}).get("content")
        if not isinstance(ids, list) or not isinstance(content, list) or len(content) != len(ids):
            raise RunError(f"{where} answered a completion without token ids or with {len(content or [])} "
                           f"log-probs for {len(ids or [])} tokens (is the server alignspec vllm-serve's?)")
        lps = []
        for t, lp in zip(ids, content):
            if lp.get("token_id", t) != t:
                raise RunError(f"{where}: the log-prob of token {t} came as token {lp.get('token_id')}")
            lps.append(float(lp["logprob"]))
        spans = c.get("weight_versions")
        versions = [(str(v.get("version")), int(v.get("start", 0)), int(v.get("end", len(ids)))) for v in spans] \
            if isinstance(spans, list) else None
        out.append(Completion([int(t) for t in ids], lps, str(c.get("finish_reason") or ""), versions))
    return out


class ServerFleet:
    """vLLM servers at ``urls`` (see the module docstring)."""

    def __init__(self, urls: list[str]):
        self.urls = list(urls)
        check_servers(self.urls)
        for url in self.urls:
            call(url, "/init_weight_transfer_engine", {"init_info": {}})
        self.version = 0
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="vllm-request")
        self.shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

    def generate(self, prompts: list[list[int]], n: int, spec: SamplingSpec, seed: int | None) -> list[list[Completion]]:
        def one(i):
            url = self.urls[i % len(self.urls)]
            body = {"token_ids": list(prompts[i]), "stream": False,
                    "sampling_params": spec.vllm_kwargs(n, None if seed is None else request_seed(seed, i))}
            return repeat(parse_choices(url, call(url, "/inference/v1/generate", body), spec.draws(n), len(prompts[i])), n)
        return list(self.pool.map(one, range(len(prompts))))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from .vllm_transfer import send_in_chunks
        version = self.version + 1
        for url in self.urls:
            call(url, "/pause?mode=keep")
            call(url, "/start_weight_update")

        def send(path):
            for url in self.urls:
                call(url, "/update_weights", {"update_info": {"path": path}})
        send_in_chunks(weights, send, self.shm)
        for url in self.urls:
            call(url, "/finish_weight_update", {"weight_version": str(version)})
            call(url, "/resume")
        self.version = version

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

