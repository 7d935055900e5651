"""Per-process peak memory and step time of DDP vs FSDP2, activation checkpointing and bf16
mixed precision, on 2 processes (torchrun, gloo on CPU).

    .venv/bin/python bench/scale.py [--seq 1024] [--steps 3] [--hidden 512] [--layers 8]
                                    [--vocab 32000] [--only ddp,fsdp2,...] [--workdir DIR]

A model where weights and optimizer state dominate: a Llama from a config (hidden 512,
8 layers, 8 heads, vocab 32000, untied output layer: 57M parameters, so about 0.9 GB of
float32 weights + gradients + AdamW moments), random init, float32. Each run trains the
built-in ``sft`` spec (token-mean log-likelihood) through the real engine
(``build_engine``) on demonstrations of ``--seq`` tokens (one row per process per step,
micro-batch 1), one thread per process, ``--steps`` optimizer steps; nothing is written
(the bench calls the engine's step directly, no checkpoint or final model).

Memory: the process's resident set (``/proc/self/status``), its high-water mark reset
(``/proc/self/clear_refs``) once the engine is built, read after the steps, minus the
resident set before the engine was built (Python, torch, transformers): what the run's
tensors and allocator need. ``MALLOC_MMAP_THRESHOLD_`` is fixed so that glibc returns large
freed blocks (the whole model loaded before sharding, for one) to the system. The activation
part of a peak is its excess over the same configuration at a sequence of 16 tokens.
Step time: the mean over steps 2..S (step 1 creates the AdamW state).

Every configuration is its own ``torchrun --nproc_per_node 2`` launch; ratios are against the
DDP fp32 run of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {  # name -> run settings
    "ddp": ["parallel=ddp"],
    "ddp+ac": ["parallel=ddp", "gradient_checkpointing=true"],
    "ddp+bf16": ["parallel=ddp", "mixed_precision=bf16"],
    "fsdp2": ["parallel=fsdp2"],
    "fsdp2+ac": ["parallel=fsdp2", "gradient_checkpointing=true"],
    "fsdp2+bf16": ["parallel=fsdp2", "mixed_precision=bf16"],
    "fsdp2+ac+bf16": ["parallel=fsdp2", "gradient_checkpointing=true", "mixed_precision=bf16"],
}
SHORT = 16  # tokens: the runs that measure the non-activation part of a peak


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker(args: dict) -> None:
    """One configuration on this process (run under torchrun)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    # everything the engine imports lazily, and the process group, before the baseline
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    from alignspec.runtime.engine import build_engine
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()
    base = _status("VmRSS")
    eng = build_engine("sft", model=args["model"], data=args["data"], out=args["out"], steps=args["steps"],
                       sets=["batch_size=2", "micro_batch_size=1", "lr=1e-5", "eval_every=0", "threads=1",
                             *args["sets"]])
    eng.state.console.quiet = True
    built = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    eng._start_iteration(0)
    times = []
    for _ in range(args["steps"]):
        t0 = time.perf_counter()
        eng._train_step()
        times.append(time.perf_counter() - t0)
        eng.state.step += 1
    peak = _status("VmHWM") - base
    p = next(eng.state.wrapped.parameters())
    rec = {"rank": eng.state.rank, "peak": peak, "built": built - base, "step_time": sum(times[1:]) / max(1, len(times) - 1),
           "param": type(p).__name__, "wrapped": type(eng.state.wrapped).__name__,
           "params": sum(q.numel() for q in eng.state.model.parameters())}
    with open(Path(args["out"]) / f"rank{eng.state.rank}.json", "w") as f:
        json.dump(rec, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # before exit: gloo's threads otherwise may abort it


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _prepare(work: Path, a) -> tuple[str, dict[int, str]]:
    from alignspec.runtime.models.tiny import build_tiny_model
    model = work / f"model_h{a.hidden}_l{a.layers}_v{a.vocab}"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "llama", seed=0, vocab_size=a.vocab, hidden=a.hidden, layers=a.layers,
                         heads=max(1, a.hidden // 64), max_positions=max(2048, a.seq + 64))
    data = {}
    for seq in (a.seq, SHORT):
        path = work / f"rows_{seq}.jsonl"
        # char tokenizer: one token a character; prompt 4 tokens + response + EOS = `seq` tokens
        n = max(1, seq - 6)
        path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "response": ("0123456789" * (n // 10 + 1))[:n]})
                                + "\n" for i in range(8)))
        data[seq] = str(path)
    return str(model), data


def _launch(work: Path, name: str, seq: int, sets: list[str], model: str, data: str, steps: int) -> dict:
    out = work / f"{name}_{seq}"
    out.mkdir(parents=True, exist_ok=True)
    args = {"model": model, "data": data, "out": str(out), "steps": steps, "seq": seq, "sets": sets}
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_TRIM_THRESHOLD_="65536", GOMP_SPINCOUNT="1000")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           __file__, "--worker", json.dumps(args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} (seq {seq}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    recs = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
    return {"peak": max(r["peak"] for r in recs), "built": max(r["built"] for r in recs), "step_time": max(r["step_time"] for r in recs),
            "param": recs[0]["param"], "params": recs[0]["params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations (ddp is always run)")
    ap.add_argument("--workdir", default="/tmp/alignspec_scale")
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, data = _prepare(work, a)
    names = ["ddp"] + [n for n in a.only.split(",") if n in CONFIGS and n != "ddp"]
    res = {}
    for name in names:
        t0 = time.perf_counter()
        full = _launch(work, name, a.seq, CONFIGS[name], model, data[a.seq], a.steps)
        short = _launch(work, name, SHORT, CONFIGS[name], model, data[SHORT], 2)
        res[name] = {**full, "act": full["peak"] - short["peak"]}
        print(f"  {name}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    base = res["ddp"]
    mb = 1 << 20
    print(f"2 processes, Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab} "
          f"({base['params'] / 1e6:.0f}M parameters), sequence {a.seq}, sft, fp32 weights; CPU, gloo, "
          f"1 thread per process; ratios against DDP fp32\n")
    print("| configuration | peak MB / process | x DDP | activation part MB | x DDP | step s | x DDP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in res.items():
        print(f"| {name} | {r['peak'] / mb:.0f} | {r['peak'] / base['peak']:.2f} | {r['act'] / mb:.0f} | "
              f"{r['act'] / base['act']:.2f} | {r['step_time']:.2f} | {r['step_time'] / base['step_time']:.2f} |")


if __name__ == "__main__":
    main()
