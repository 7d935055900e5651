"""FSDP2 (``parallel=fsdp2``) on 2 processes (torchrun, gloo on CPU) against unsharded runs.

- dpo (pairs, offline): 2 FSDP2 processes reach the weights of 1 process with the whole batch
  (1e-5), with activation checkpointing off (``--set parallel=fsdp2``, launched as 2 nodes x
  1 process on 127.0.0.1, the multi-node launch of the README) and on (launched by
  ``accelerate launch --config_file`` with accelerate's own FSDP2 config, fsdp_version 2);
- grpo (generation, sequence-mean loss, a KL term to the reference), dapo (token-mean
  over the whole update, dynamic sampling) and ampo (embeddings of responses from the
  policy's hidden states): 2 FSDP2 processes reach the
  weights of 2 DDP processes (samples are drawn per process, so a 1-process run samples other
  completions; DDP = 1 process is tests/test_distributed.py's), with activation checkpointing off and on;
- a 2-process FSDP2 grpo run killed with SIGKILL in the middle of step 3 and resumed from its
  sharded checkpoint of step 2 ends with the uninterrupted run's weights;
- the parameters really are sharded (DTensors), and so is the frozen reference's (no
  gradients); checkpoints are written per process with
  torch.distributed.checkpoint, the final model is an ordinary HF directory.

Runs are shared between the tests of this file (a module-scoped cache), so each launch happens once.
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
from test_distributed import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCRIPT = r"""
import json, os, signal, sys
os.environ["HF_HUB_OFFLINE"] = "1"
from alignspec.runtime.engine import build_engine
a = json.loads(sys.argv[1])
eng = build_engine(a["spec"], model=a.get("model"), data=a.get("data"), out=a["out"], steps=a["steps"],
                   resume=a.get("resume", False), sets=a["sets"])
if a.get("kill_at") is not None:  # SIGKILL in the middle of a step: after its rollout, before its update
    forwards = eng._no_grad_forwards
    def killing(*args, **kw):
        if eng.state.step == a["kill_at"] and eng.state.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return forwards(*args, **kw)
    eng._no_grad_forwards = killing
import torch
compute = set()  # the dtype of a projection's output in the training forwards
proj = next(m for n, m in eng.state.model.named_modules() if n.endswith("q_proj"))
proj.register_forward_hook(lambda m, i, o: compute.add(str(o.dtype)) if torch.is_grad_enabled() else None)
eng.train()
p = next(eng.state.wrapped.parameters())
adam = {str(st["exp_avg"].dtype) for st in eng.state.optimizer.state.values() if "exp_avg" in st}
ref = eng.state.reference
ref_param = None if ref is None else sorted({type(q).__name__ for q in ref.parameters()})
ref_grad = None if ref is None else any(q.requires_grad or q.grad is not None for q in ref.parameters())
with open(os.path.join(a["out"], f"info{eng.state.rank}.json"), "w") as f:
    plan = eng.state.parallel_plan
    json.dump({"wrapped": type(eng.state.wrapped).__name__, "param": type(p).__name__, "world": eng.state.world,
               "plan": [plan.parallel, plan.gradient_checkpointing, plan.mixed_precision],
               "compute": sorted(compute), "master": str(p.dtype), "adam": sorted(adam),
               "ref_param": ref_param, "ref_grad": ref_grad}, f)
"""

ACCELERATE_FSDP2 = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_activation_checkpointing: {ac}
mixed_precision: 'no'
num_machines: 1
num_processes: 2
"""

SETS = ["batch_size=4", "micro_batch_size=1", "lr=1e-3", "eval_every=0"]


def _cmd(script: Path, nproc: int, args: dict, nodes: tuple[int, int] | None = None, port: str | None = None):
    run = [sys.executable, str(script), json.dumps(args)]
    if nproc == 1 and nodes is None:
        return [sys.executable, str(script), json.dumps(args)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nodes is None:
        return [*launch, "--master_port", port or free_port(), *run[1:]]
    node, count = nodes
    return [*launch, "--nnodes", str(count), "--node_rank", str(node), "--master_addr", "127.0.0.1",
            "--master_port", port, *run[1:]]


class Runs:
    """Launches runs of SCRIPT once per name; ``get(name)`` -> the run's output directory."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Path] = {}
        self.script = root / "run.py"
        self.script.write_text(SCRIPT)
        self.env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                        ALIGNSPEC_CACHE=str(root / "cache"),
                        PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        from alignspec.runtime.models.tiny import build_tiny_model
        self.model = build_tiny_model(root / "m", "llama", seed=3)
        self.data = root / "rows.jsonl"
        # chosen != rejected in every pair: a pair of equal rows has a gradient of float noise only, which
        # Adam's first steps (update ~ lr * sign) blow up to ~1e-4 differences between any two summation orders
        self.data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "response": a, "chosen": a,
                                                 "rejected": "9" + a[1:]}) + "\n"
                                     for i, a in enumerate(["1", "22", "333", "4444"])))

    def args(self, name: str, spec: str, sets: list[str], steps: int = 2, **kw) -> dict:
        a = {"spec": spec, "out": str(self.root / name), "steps": steps, "sets": SETS + sets, **kw}
        if spec not in ("grpo", "dapo", "ampo"):  # these: the built-in task and model
            a.update(model=self.model, data=str(self.data))
        if spec in ("dpo", "ampo"):
            # Adam's first steps move each weight by about lr * sign(gradient), so a gradient element
            # at float-noise level moves by up to lr whatever its size: at lr 1e-3 one element of the
            # output layer differed by 2e-5 after 2 steps, because FSDP2 computes the output layer
            # per vocabulary slice (parallel/vocab_parallel.py), another rounding than one process's
            # whole-layer tiles; every other weight was within 3e-7. ampo (the built-in preset's
            # lr 1e-3) differed by 2.9e-5 on an AVX2-only processor, for the same reason
            a["sets"] = a["sets"] + ["lr=2e-4"]
        return a

    def launch(self, name: str, nproc: int, args: dict, ok: bool = True) -> Path:
        if name in self.done:
            return self.done[name]
        r = subprocess.run(_cmd(self.script, nproc, args), env=self.env, capture_output=True, text=True,
                           timeout=300, cwd=self.root)
        assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]
        self.done[name] = Path(args["out"])
        return self.done[name]

    def accelerate_fsdp2(self, name: str, args: dict, activation_checkpointing: bool) -> Path:
        """2 processes from `accelerate launch --config_file fsdp2.yaml` (FSDP, fsdp_version 2)."""
        if name in self.done:
            return self.done[name]
        config = self.root / f"{name}.yaml"
        config.write_text(ACCELERATE_FSDP2.format(ac=str(activation_checkpointing).lower()))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", free_port(), str(self.script), json.dumps(args)]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300, cwd=self.root)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        self.done[name] = Path(args["out"])
        return self.done[name]

    def two_nodes(self, name: str, args: dict) -> Path:
        """2 nodes x 1 process on 127.0.0.1 (two torchrun launches with --nnodes 2)."""
        if name in self.done:
            return self.done[name]
        port = free_port()
        procs = [subprocess.Popen(_cmd(self.script, 1, args, nodes=(node, 2), port=port), env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.root)
                 for node in (0, 1)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
        self.done[name] = Path(args["out"])
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("parallel"))


def _info(out: Path, rank: int) -> dict:
    return json.loads((out / f"info{rank}.json").read_text())


def _assert_sharded(out: Path, reference: bool = True) -> None:
    for rank in (0, 1):
        info = _info(out, rank)
        assert info["world"] == 2 and info["wrapped"] == "FSDPTrainForward" and info["param"] == "DTensor", info
        if reference:  # the frozen reference is sharded too, without gradients
            assert info["ref_param"] == ["DTensor"] and info["ref_grad"] is False, info
    ck = out / "checkpoint"
    assert json.loads((ck / "state.json").read_text())["sharded"] is True
    assert len(list((ck / "sharded").glob("*.distcp"))) == 2  # each process wrote its shards


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = read_weights(a / "model"), read_weights(b / "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wb[k].dtype == torch.float32
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), (k, (wa[k] - wb[k]).abs().max())
    ma, mb = ([r for r in read_metrics(o) if "loss" in r] for o in (a, b))
    assert len(ma) == len(mb)
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def _assert_trained(runs: Runs, out: Path) -> None:
    from alignspec.runtime.models.loaders import load_policy
    model, _ = load_policy(runs.model)
    w0 = {k: v.detach() for k, v in model.state_dict().items()}
    w = read_weights(out / "model")
    assert any(not torch.allclose(w0[k], w[k]) for k in w), "no update happened"


@pytest.mark.parametrize("ac", [False, True], ids=["no_ac", "activation_checkpointing"])
def test_dpo_fsdp2_two_processes_match_one_process(runs, ac):
    # a checkpointed layer keeps no KV cache, so with it the pair's prompt runs once per row: the same
    # math as share_prompt=false, whose float rounding differs from the shared prompt's
    one = runs.launch(f"dpo_one_{ac}", 1, runs.args(f"dpo_one_{ac}", "dpo", [f"share_prompt={str(not ac).lower()}"]))
    name = f"dpo_fsdp2_{ac}"
    if not ac:  # 2 nodes x 1 process, --set parallel=fsdp2
        two = runs.two_nodes(name, runs.args(name, "dpo", ["parallel=fsdp2"]))
    else:  # accelerate's own FSDP2 config, with its activation checkpointing
        two = runs.accelerate_fsdp2(name, runs.args(name, "dpo", []), activation_checkpointing=True)
    assert _info(two, 0)["plan"] == ["fsdp2", ac, "no"]
    _assert_sharded(two)
    _assert_trained(runs, two)
    _assert_same_weights(one, two)


GRPO = ["save_every=1", "n=4"]


@pytest.mark.parametrize("ac", [False, True], ids=["no_ac", "activation_checkpointing"])
def test_grpo_fsdp2_matches_ddp(runs, ac):
    ddp = runs.launch("grpo_ddp", 2, runs.args("grpo_ddp", "grpo", GRPO, steps=3))
    fsdp = runs.launch(f"grpo_fsdp2_{ac}", 2, runs.args(f"grpo_fsdp2_{ac}", "grpo", GRPO + [
        "parallel=fsdp2", f"gradient_checkpointing={str(ac).lower()}"], steps=3))
    _assert_sharded(fsdp)
    assert _info(ddp, 0)["wrapped"] == "DistributedDataParallel"
    _assert_same_weights(ddp, fsdp)


def test_dapo_token_mean_fsdp2_matches_ddp(runs):
    """dapo's loss is token_mean_all: a sum over every completion token of the update, divided by
    the number of those tokens over every micro-batch and process (and its dynamic sampling
    refills filtered groups). 2 FSDP2 processes reach the weights of 2 DDP processes."""
    sets = ["n=4"]
    ddp = runs.launch("dapo_ddp", 2, runs.args("dapo_ddp", "dapo", sets))
    fsdp = runs.launch("dapo_fsdp2", 2, runs.args("dapo_fsdp2", "dapo", sets + ["parallel=fsdp2"]))
    _assert_sharded(fsdp, reference=False)  # dapo has no KL term, so no reference
    assert _info(ddp, 0)["wrapped"] == "DistributedDataParallel"
    steps = [r for r in read_metrics(fsdp) if "loss" in r]
    assert len(steps) == 2 and all(r["grad_norm"] > 0 for r in steps), steps  # groups kept, an update made
    _assert_same_weights(ddp, fsdp)


def test_ampo_embeddings_fsdp2_matches_ddp(runs):
    """ampo selects its rejected responses with coreset(r, embedding(response), k): the policy's
    own hidden states, computed under FSDP2 with the policy gathered. 2 FSDP2 processes reach
    the weights of 2 DDP processes."""
    sets = ["n=4", "k=2"]
    ddp = runs.launch("ampo_ddp", 2, runs.args("ampo_ddp", "ampo", sets))
    fsdp = runs.launch("ampo_fsdp2", 2, runs.args("ampo_fsdp2", "ampo", sets + ["parallel=fsdp2"]))
    _assert_sharded(fsdp, reference=False)
    _assert_same_weights(ddp, fsdp)


def test_fsdp2_killed_and_resumed_reproduces_the_uninterrupted_run(runs):
    """SIGKILL of rank 0 in the middle of step 3 (after its rollout); --resume from the sharded
    checkpoint of step 2 ends with the weights of the uninterrupted 3-step run."""
    sets = GRPO + ["parallel=fsdp2"]
    full = runs.launch("grpo_fsdp2_False", 2, runs.args("grpo_fsdp2_False", "grpo", sets, steps=3))
    runs.launch("grpo_killed", 2, runs.args("grpo_resumed", "grpo", sets, steps=3, kill_at=2), ok=False)
    ck = runs.root / "grpo_resumed" / "checkpoint"
    assert json.loads((ck / "state.json").read_text())["step"] == 2
    assert not (runs.root / "grpo_resumed" / "model").exists()
    resumed = runs.launch("grpo_resumed", 2, runs.args("grpo_resumed", "grpo", sets, steps=3, resume=True))
    _assert_sharded(resumed)
    wa, wb = read_weights(full / "model"), read_weights(resumed / "model")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    steps = [r["step"] for r in read_metrics(resumed) if "loss" in r]
    assert steps == [1, 2, 3]  # the killed step was cut from metrics.jsonl and run again


def test_fsdp2_bf16_mixed_precision_keeps_float32_master_weights(runs):
    """FSDP2's MixedPrecisionPolicy: bf16 compute, float32 shards and AdamW moments, float32 saved
    weights, and a loss within bf16 rounding of the float32 run's."""
    out = runs.launch("dpo_fsdp2_bf16", 2, runs.args("dpo_fsdp2_bf16", "dpo", ["parallel=fsdp2",
                                                                                "mixed_precision=bf16"]))
    _assert_sharded(out)
    info = _info(out, 0)
    assert info["compute"] == ["torch.bfloat16"] and info["master"] == "torch.float32", info
    assert info["adam"] == ["torch.float32"], info
    _assert_trained(runs, out)
    assert {v.dtype for v in read_weights(out / "model").values()} == {torch.float32}
    fp32 = runs.launch("dpo_one_False", 1, runs.args("dpo_one_False", "dpo", ["share_prompt=true"]))
    for x, y in zip(*([r["loss"] for r in read_metrics(o) if "loss" in r] for o in (fp32, out))):
        assert y == pytest.approx(x, rel=2e-2) and y != x
