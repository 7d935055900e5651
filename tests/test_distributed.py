"""Two processes (torchrun, gloo on CPU) against one process with the whole batch.

One optimizer step on 2 processes with the global batch split between them must give the
parameters of 1 process with the whole batch (to 1e-5): a token-mean spec, a sequence-mean
spec, a filter that leaves the processes uneven, whiten over the batch, and ranks and a
quantile over the batch (order statistics gather every process's values).

The engine wraps its training forward in DDP through ``accelerator.prepare``; these tests
check the parts of that which silent bugs hide in: processes that end an update with
different numbers of micro-batches (filters without refill), batch-wide statistics in the
advantage stage (``whiten``), and that every process ends with the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_metrics, read_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKEN_MEAN_SPEC = """\
algorithm tm
data demonstrations
loss
  minimize -token_mean_all(logp)
"""

SEQ_MEAN_SPEC = """\
algorithm sm
data demonstrations
loss
  minimize -mean(mean_tokens(logp))
"""

# reward = number of characters of the response; kept when it is not 4 characters long
REWARD_MODULE = """
def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]
"""

FILTER_SPEC = """\
algorithm filt
data pairs
score
  r = reward(response)
filter
  keep groups where group_max(r) < 4
loss
  minimize -token_mean_all(logp)
"""

WHITEN_SPEC = """\
algorithm wh
data demonstrations
score
  r = reward(response)
advantage
  A = whiten(r)
loss
  minimize -mean(A * mean_tokens(logp))
"""

# ranks and a quantile over both processes' rows (a process alone would rank 0, 1)
ORDER_SPEC = """\
algorithm order
data demonstrations
score
  r = reward(response)
advantage
  A = where(r >= batch_quantile(r, 0.5), 1, -1) * (1 + batch_rank(r))
loss
  minimize -mean(A * mean_tokens(logp))
"""

SCRIPT = r"""
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from alignspec.runtime.engine import build_engine
spec_file, out, data, model = sys.argv[1:5]
eng = build_engine(open(spec_file).read(), model=model, data=data, out=out, steps=2,
                   sets=["batch_size=4", "micro_batch_size=1", "lr=1e-3", "eval_every=0",
                         "max_refill_rounds=0", "rewards=[rewardmod:length]"])
eng.train()
flat = torch.cat([p.detach().reshape(-1) for p in eng.state.model.parameters()])
torch.save({"flat": flat, "wrapped": type(eng.state.wrapped).__name__},
           os.path.join(out, f"rank{eng.state.rank}.pt"))
"""


def free_port() -> str:
    """A TCP port nothing listens on now (for the rendezvous of one launch)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(nproc: int, args: list[str], env: dict, cwd: Path) -> None:
    script = cwd / "run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, str(script), *args]
    if nproc > 1:
        port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", port, str(script), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("spec_text", [TOKEN_MEAN_SPEC, SEQ_MEAN_SPEC, FILTER_SPEC, WHITEN_SPEC, ORDER_SPEC],
                         ids=["token_mean", "seq_mean", "uneven_micro_batches", "whiten", "rank_quantile"])
def test_two_processes_match_one_process(spec_text, tmp_path):
    from alignspec.runtime.models.tiny import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "m", "llama", seed=3)
    data = tmp_path / "rows.jsonl"
    # four rows per step; the pair with a 4-character response is filtered out, so one
    # process ends the update with one micro-batch (one pair) fewer than the other
    answers = ["1", "22", "333", "4444"]
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "response": a, "chosen": a, "rejected": a[:1] if len(a) > 1 else "0"})
                            + "\n" for i, a in enumerate(answers)))  # a pair of equal completions is refused
    (tmp_path / "spec.align").write_text(spec_text)
    (tmp_path / "rewardmod.py").write_text(REWARD_MODULE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(1, [str(tmp_path / "spec.align"), str(one), str(data), model_dir], env, tmp_path)
    _launch(2, [str(tmp_path / "spec.align"), str(two), str(data), model_dir], env, tmp_path)
    r1 = torch.load(one / "rank0.pt")
    r20, r21 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert r20["wrapped"] == "DistributedDataParallel" and r1["wrapped"] == "TrainForward"
    assert torch.equal(r20["flat"], r21["flat"])  # the processes agree
    w0 = torch.cat([p.reshape(-1) for p in _initial_params(model_dir)])
    assert not torch.allclose(w0, r1["flat"])    # a real update happened
    assert torch.allclose(r1["flat"], r20["flat"], atol=1e-5, rtol=0)
    assert json.loads((two / "checkpoint" / "state.json").read_text())["world"] == 2
    w1, w2 = read_weights(one / "model"), read_weights(two / "model")  # what rank 0 saved
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), k
    # Adam's first steps barely depend on the gradient's scale: compare the gradient itself
    m1, m2 = ([r for r in read_metrics(o) if "loss" in r] for o in (one, two))
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    if spec_text is FILTER_SPEC:
        assert all(r.get("refill/cap_hit") == 1 for r in m2)


def _initial_params(model_dir):
    from alignspec.runtime.models.loaders import load_policy
    model, _ = load_policy(model_dir)
    return [p.detach() for p in model.parameters()]


def test_accelerate_launch_runs_two_processes(tmp_path):
    """The README's command: `accelerate launch --multi_gpu --num_processes 2 -m alignspec run`
    (on a CPU-only machine accelerate needs --multi_gpu to start several processes; gloo)."""
    out = tmp_path / "run"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           "-m", "alignspec", "run", "sft", "--out", str(out), "--steps", "2",
           "--set", "batch_size=4", "--set", "eval_every=0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["world"] == 2
    assert "(2 processes)" in r.stdout
    assert len([m for m in read_metrics(out) if "loss" in m]) == 2


RESUME_SCRIPT = r"""
import os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
from alignspec.runtime.engine import build_engine
out, stop_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
eng = build_engine("grpo", out=out, steps=4, resume=resume,
                   sets=["batch_size=4", "eval_every=0", "save_every=1", "n=4"])
step = eng._train_step

def stopping():
    if eng.state.step == stop_at:
        raise SystemExit(3)  # as if killed: the checkpoint of step `stop_at` is on disk
    return step()
eng._train_step = stopping
eng.train()
"""


def test_two_process_resume_reproduces_the_uninterrupted_run(tmp_path):
    """2 processes stopped after step 2 and resumed end with the weights of an uninterrupted
    2-process run: every process's generators come back from its own process_<rank>.json."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def launch(*args, ok=True):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
               str(script), *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]

    launch(str(tmp_path / "a"), "-1", "fresh")
    launch(str(tmp_path / "b"), "2", "fresh", ok=False)
    ck = tmp_path / "b" / "checkpoint"
    assert json.loads((ck / "state.json").read_text())["step"] == 2
    assert (ck / "process_0.json").is_file() and (ck / "process_1.json").is_file()
    launch(str(tmp_path / "b"), "-1", "resume")
    wa, wb = read_weights(tmp_path / "a" / "model"), read_weights(tmp_path / "b" / "model")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


def test_pipeline_on_two_processes(tmp_path):
    """Every stage of a pipeline runs on both processes (the accelerate state is decided once,
    for all stages) and the stages hand their models on; the pipeline reports once."""
    out = tmp_path / "rlhf"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "alignspec", "run", "rlhf", "--out", str(out), "--steps", "2",
           "--set", "batch_size=4", "--set", "eval_every=0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("sft", "rm", "policy"):
        assert json.loads((out / stage / "checkpoint" / "state.json").read_text())["world"] == 2
        assert (out / stage / "model" / "config.json").is_file()
    assert r.stdout.count("pipeline rlhf done") == 1


# process 1's responses all score 4 and are filtered out: it trains on padding micro-batches
RANK_REWARD_MODULE = """
import os
def length(prompts, completions, **kwargs):
    return [4.0 if os.environ.get("RANK") == "1" else float(len(c)) for c in completions]
"""

EMPTY_PROCESS_SPEC = """\
algorithm ep
data pairs
params
  beta = 0.1
score
  r = reward(response)
  s = whiten(r)
filter
  keep groups where group_max(r) < 4
advantage
  A = whiten(s - beta * mean_tokens(logp_ref))
loss
  minimize -mean(A * mean_tokens(logp))
"""


def test_a_process_without_rows_keeps_in_step(tmp_path):
    """One process keeps no rows (score-stage whiten over both, advantage-stage whiten per
    process, said in yellow), trains on padding micro-batches; no hang, same weights on both."""
    from alignspec.runtime.models.tiny import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "m", "llama", seed=3)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "chosen": a, "rejected": a[:1] if len(a) > 1 else "0"}) + "\n"
                            for i, a in enumerate(["1", "22", "333", "4444"])))
    (tmp_path / "spec.align").write_text(EMPTY_PROCESS_SPEC)
    (tmp_path / "rewardmod.py").write_text(RANK_REWARD_MODULE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(script), str(tmp_path / "spec.align"), str(tmp_path / "two"), str(data), model_dir]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no rows for its advantage stage" in r.stdout
    r0, r1 = torch.load(tmp_path / "two" / "rank0.pt"), torch.load(tmp_path / "two" / "rank1.pt")
    assert torch.equal(r0["flat"], r1["flat"])
    assert len([m for m in read_metrics(tmp_path / "two") if "loss" in m]) == 2


def test_tree_search_on_two_processes(tmp_path):
    """mcts: processes whose searches find different numbers of pairs (some none) stay in step."""
    out = tmp_path / "mcts"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "alignspec", "run", "mcts", "--out", str(out), "--steps", "2", "--set", "batch_size=4",
           "--set", "eval_every=0", "--set", "simulations=4", "--set", "branching=2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["world"] == 2
