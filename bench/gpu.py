"""alignspec vs TRL 1.16 at scale on one GPU: a Qwen2-architecture model of about 0.5B parameters
(Qwen2.5-0.5B's shape) from a config, bf16 mixed precision, activation checkpointing; one DPO
workload and one GRPO workload (generation included); step time, tokens/s, peak GPU memory.

    python bench/gpu.py [--steps 4] [--only dpo,grpo] [--skip-trl] [--workdir /tmp/alignspec_gpu]
    python bench/gpu.py --tiny     # the same runs on a tiny Qwen2 config: a CPU check that it all works

``bench/gpu.sh`` runs it on a GPU machine. Nothing is downloaded: the model is built from a
``Qwen2Config`` (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936,
tied embeddings: 494M parameters), random init with a fixed seed, saved in float32 with the
synthetic word-level tokenizer of bench/vs_trl.py; both frameworks load that directory.

Workloads (same model, data and settings in both frameworks): lr 1e-5 constant, AdamW, grad-norm
clip 1.0, float32 weights with bf16 autocast / mixed precision, non-reentrant gradient
checkpointing, one optimizer step per batch.
- DPO: 8 pairs a step, prompt 128 tokens, chosen and rejected 256 tokens each, beta 0.1;
- GRPO: 4 prompts x 8 samples a step, prompt 128 tokens, exactly 128 new tokens
  (``min_new_tokens``), temperature 1, beta 0.04 (a reference model), eps 0.2.

Each run is its own process. Step time: median over steps 2..S (GRPO: generation included).
Tokens/s: the step's tokens (prompt + completion of every row) over the step time. Peak memory:
``torch.cuda.max_memory_allocated`` (on a CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vs_trl  # noqa: E402  (tokenizer, reward and data helpers shared with the CPU comparison)

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=True, rope_theta=1e6,
            max_position_embeddings=1024)
PROMPT, COMPLETION, NEW = 128, 256, 128
PAIRS, PROMPTS, N = 8, 4, 8
LR, SEED = 1e-5, 0


def _sizes(tiny: bool) -> tuple[int, int, int]:
    return (16, 32, 16) if tiny else (PROMPT, COMPLETION, NEW)


def build(work: Path, tiny: bool) -> tuple[Path, Path, Path]:
    """The model directory, DPO pairs and GRPO prompts (built once per shape)."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    shape = TINY if tiny else QWEN_05B
    prompt, completion, new = _sizes(tiny)
    model = work / ("qwen2_tiny" if tiny else "qwen2_0.5b")
    if not (model / "config.json").is_file():
        cfg = Qwen2Config(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(SEED)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        g = m.generation_config
        g.pad_token_id, g.bos_token_id, g.eos_token_id = 0, 1, 2
        g.min_new_tokens = new
        model.mkdir(parents=True, exist_ok=True)
        m.save_pretrained(model, safe_serialization=True)
        vs_trl.build_tokenizer(shape["vocab_size"]).save_pretrained(model)
    rng = random.Random(SEED)
    V = shape["vocab_size"]
    pairs, prompts = work / f"pairs_{model.name}.jsonl", work / f"prompts_{model.name}.jsonl"
    with open(pairs, "w") as f:
        for _ in range(PAIRS * 32):
            f.write(json.dumps({"prompt": vs_trl._words(rng, V, prompt - 1),
                                "chosen": " " + vs_trl._words(rng, V, completion - 1),
                                "rejected": " " + vs_trl._words(rng, V, completion - 1)}) + "\n")
    with open(prompts, "w") as f:
        for _ in range(PROMPTS * 32):
            f.write(json.dumps({"prompt": vs_trl._words(rng, V, prompt - 1)}) + "\n")
    return model, pairs, prompts


def _peak() -> float:
    """Peak memory in GB: the GPU's allocator peak, or the process's peak RSS on a CPU."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def alignspec_worker(kind: str, model: str, data: str, out: str, steps: int, tiny: bool) -> None:
    from alignspec.runtime.engine import build_engine
    _, _, new = _sizes(tiny)
    sets = [f"lr={LR}", "lr_schedule=constant", "max_grad_norm=1.0", "mixed_precision=bf16",
            "gradient_checkpointing=true", "eval_every=0", "threads=0", f"seed={SEED}"]
    if kind == "dpo":
        sets += [f"batch_size={PAIRS}", f"micro_batch_size={PAIRS}", "beta=0.1"]
    else:
        sets += [f"batch_size={PROMPTS}", f"micro_batch_size={PROMPTS}", f"max_new_tokens={new}", f"n={N}",
                 "beta=0.04", "eps=0.2", "rewards=[vs_trl:reward]"]
    eng = build_engine(kind, model=model, data=data, out=out, steps=steps, sets=sets)
    eng._start_iteration(0)
    times = []
    for _ in range(steps):  # the engine's optimizer steps, without its checkpoint and model writes
        t0 = time.perf_counter()
        eng._train_step()
        times.append(time.perf_counter() - t0)
        eng.state.step += 1
    Path(out, "result.json").write_text(json.dumps({"times": times, "peak_gb": _peak()}))


def trl_worker(kind: str, model: str, data: str, out: str, steps: int, tiny: bool) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    _, _, new = _sizes(tiny)
    times, t = [], {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            t["b"] = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t["b"])

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, local_files_only=True)
    ds = load_dataset("json", data_files=data, split="train")
    common = dict(output_dir=out, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                  max_grad_norm=1.0, gradient_accumulation_steps=1, bf16=True, fp16=False,
                  gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                  use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", logging_steps=steps,
                  seed=SEED, dataloader_num_workers=0, disable_tqdm=True)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer
        cfg = DPOConfig(per_device_train_batch_size=PAIRS, beta=0.1, max_length=None, **common)
        trainer = DPOTrainer(model=m, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
    else:
        from trl import GRPOConfig, GRPOTrainer
        cfg = GRPOConfig(per_device_train_batch_size=PROMPTS * N, num_generations=N, max_completion_length=new,
                         generation_kwargs={"min_new_tokens": new}, temperature=1.0, top_p=1.0, top_k=0, beta=0.04,
                         epsilon=0.2, loss_type="grpo", scale_rewards="group", num_iterations=1, **common)
        trainer = GRPOTrainer(model=m, args=cfg, train_dataset=ds, processing_class=tok, reward_funcs=vs_trl.reward,
                              callbacks=[StepTimer()])
    trainer.train()
    Path(out, "result.json").write_text(json.dumps({"times": times, "peak_gb": _peak()}))


def _run(framework: str, kind: str, model: Path, data: Path, out: Path, steps: int, tiny: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", WANDB_DISABLED="true",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, str(Path(__file__).resolve()), f"_{framework}", kind, str(model), str(data), str(out),
           str(steps), "tiny" if tiny else "full"]
    log = out.parent / f"{out.name}.log"  # beside OUT: a run refuses a non-empty folder it did not write
    with open(log, "w") as lf:
        rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"{framework} {kind} failed (rc {rc}):\n" + log.read_text()[-3000:])
    return json.loads((out / "result.json").read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_alignspec", "_trl"):
        w = alignspec_worker if sys.argv[1] == "_alignspec" else trl_worker
        kind, model, data, out, steps, size = sys.argv[2:8]
        return w(kind, model, data, out, int(steps), size == "tiny")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", default="dpo,grpo")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen2 config (a CPU check of the script)")
    ap.add_argument("--workdir", default="/tmp/alignspec_gpu")
    a = ap.parse_args()
    import torch
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, pairs, prompts = build(work, a.tiny)
    prompt, completion, new = _sizes(a.tiny)
    tokens = {"dpo": PAIRS * 2 * (prompt + completion), "grpo": PROMPTS * N * (prompt + new)}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    rows = []
    for kind in a.only.split(","):
        data = pairs if kind == "dpo" else prompts
        for fw in ["alignspec"] + ([] if a.skip_trl else ["trl"]):
            r = _run(fw, kind, model, data, work / f"{fw}_{kind}", a.steps, a.tiny)
            step = statistics.median(r["times"][1:]) if len(r["times"]) > 1 else r["times"][0]
            rows.append((kind, fw, step, tokens[kind] / step, r["peak_gb"]))
            print(f"  {kind} {fw}: {step:.3f} s/step, peak {r['peak_gb']:.2f} GB", file=sys.stderr, flush=True)
    print(f"{device}; {'tiny Qwen2 config' if a.tiny else 'Qwen2 0.5B (494M) from a config'}, bf16 mixed "
          f"precision, activation checkpointing, {a.steps} steps (median of 2..S)\n")
    print("| workload | framework | step s | tokens/s | peak GB | TRL / alignspec time | alignspec / TRL memory |")
    print("|---|---|---:|---:|---:|---:|---:|")
    by = {(k, f): (s, tps, p) for k, f, s, tps, p in rows}
    for k, f, s, tps, p in rows:
        ratio = ""
        if f == "alignspec" and (k, "trl") in by:
            ts, _, tp = by[(k, "trl")]
            ratio = f"| {ts / s:.2f} | {p / tp:.2f} "
        print(f"| {k} | {f} | {s:.3f} | {tps:.0f} | {p:.2f} {ratio or '| | '}|")


if __name__ == "__main__":
    main()
