"""alignspec vs TRL, side by side: step time, tokens/s and peak memory on the same model and data.

    .venv/bin/python bench/vs_trl.py [--steps 6] [--reps 2] [--only dpo32k,dpo2k,grpo0,grpo04]
                                     [--skip-trl] [--skip-extras] [--workdir /tmp/alignspec_vs_trl]

TRL (``trl==1.16.*``, the ``bench`` extra) is a bench-only dependency. Everything is built from
seeds, nothing is downloaded (HF_HUB_OFFLINE=1):

* models: Llama architecture from a config (hidden 256, 4 layers, 4 heads, intermediate 688,
  untied output layer) at vocab 32000 and 2000, random init with a fixed seed, float32;
* tokenizer: a ``tokenizers`` WordLevel tokenizer over synthetic words ``w4 .. w{V-1}`` (plus
  ``<pad> <bos> <eos> <unk>``), whitespace split, ``<bos>`` prepended; saved with
  ``save_pretrained`` next to the model, so both frameworks load the same directory;
* DPO data: 8 pairs per step, prompt 64 tokens (``<bos>`` + 63 words), chosen and rejected
  127 words + ``<eos>`` = 128 tokens; ``8 * S`` rows, each used once;
* GRPO data: 4 prompts x 4 completions per step, prompt 64 tokens, exactly 64 new tokens
  (``min_new_tokens = 64`` in the model's generation config and TRL's ``generation_kwargs``,
  checked by the reward function, which records every completion's token count).

Settings shared by both: lr 1e-5 constant, AdamW (weight decay 0), grad-norm clip 1.0, fp32,
gradient checkpointing off, one optimizer step per batch (no accumulation; all rows of a step in
one forward), OMP_NUM_THREADS = MKL_NUM_THREADS = 2 (torch's intra-op threads follow). DPO:
beta 0.1, sigmoid loss. GRPO: group-normalized advantages, ``loss_type="grpo"`` (alignspec's
``grpo.align`` aggregation), eps 0.2, one update per rollout, beta 0 or 0.04, temperature 1.

Each run is its own process; the two frameworks alternate (TRL, alignspec, TRL, alignspec, ...).
Step time: median over steps 2..S (alignspec: ``step_time`` of ``metrics.jsonl``, the rollout
included; TRL: a ``TrainerCallback`` timing ``on_step_begin`` -> ``on_step_end``, which for GRPO
includes the generation); also in CPU seconds (all threads: alignspec's ``step_cpu_time``, TRL's
``time.process_time`` in the same callback), which other processes on a shared machine disturb
less. Peak memory: the run process's ``ru_maxrss`` from ``os.wait4``. Tokens/s: tokens of the
step's batch (prompt + completion) per second. Every run's line says how many cores other
processes kept busy meanwhile (from /proc/stat). ``GOMP_SPINCOUNT=1000`` for every run: with
libgomp's default spinning, a run that loses a core to another process slows down about 10x.

Extras (``--skip-extras`` leaves them out):
* floor: an alignspec DPO step (reference log-probs precomputed, as the step itself then only
  trains) vs a bare forward + backward of the same model over the same 16 x 192 tokens, the
  output layer applied to the completion positions only (``F.cross_entropy``), no optimizer;
  the two alternate in one process, so they see the same machine load;
* memory of the log-prob path alone at vocab 32000 and 1,024 completion tokens: peak RSS above a
  baseline process that builds the same hidden states, alignspec's chunked path vs
  ``log_softmax`` over the full logits (forward + backward), each in its own process;
* the known wins, each measured on its own by flipping one ``bench_*`` knob of the run config
  (see ``runtime/config.py``; the defaults are the fast paths).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HIDDEN, LAYERS, HEADS, INTER = 256, 4, 4, 688
PROMPT, COMPLETION, NEW_TOKENS = 64, 128, 64
DPO_PAIRS, GRPO_PROMPTS, GRPO_N = 8, 4, 4
LR = 1e-5
SEED = 0
THREADS = "2"

WORKLOADS = {
    "dpo32k": dict(kind="dpo", vocab=32000, beta=0.1, label="DPO, vocab 32000"),
    "dpo2k": dict(kind="dpo", vocab=2000, beta=0.1, label="DPO, vocab 2000"),
    "grpo0": dict(kind="grpo", vocab=32000, beta=0.0, label="GRPO, vocab 32000, beta 0"),
    "grpo04": dict(kind="grpo", vocab=32000, beta=0.04, label="GRPO, vocab 32000, beta 0.04"),
}
GOALS = {  # (min speedup TRL/alignspec, max memory ratio alignspec/TRL)
    "dpo32k": (1.5, 0.5), "dpo2k": (1.2, None), "grpo0": (1.5, 0.7), "grpo04": (1.5, 0.7),
}


# --------------------------------------------------------------------------- reward (both frameworks)
def reward(prompts, completions, records=None, completion_ids=None, **kwargs):
    """Cheap reward, the same function in both frameworks: the fraction of a completion's words
    whose id is even. When the caller passes the completion token ids (TRL does), their lengths go
    to $VS_TRL_LENGTHS, one JSON line per call (alignspec logs length/min and length/max)."""
    out = []
    for c in completions:
        if not isinstance(c, str):  # conversational format (not used here)
            c = c[-1]["content"] if c else ""
        words = c.split()
        out.append(sum(1 for w in words if w[1:].isdigit() and int(w[1:]) % 2 == 0) / max(1, len(words)))
    path = os.environ.get("VS_TRL_LENGTHS")
    if path and completion_ids is not None:
        with open(path, "a") as f:
            f.write(json.dumps([len(ids) for ids in completion_ids]) + "\n")
    return out


# --------------------------------------------------------------------------- model, tokenizer, data
def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    table = {s: i for i, s in enumerate(specials)}
    table.update({f"w{i}": i for i in range(len(specials), vocab)})
    core = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                        special_tokens=[("<bos>", 1)])
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left",
                                   clean_up_tokenization_spaces=False, model_max_length=4096)


def build_model(dir: Path, vocab: int) -> Path:
    """Llama config (hidden 256, 4 layers) + tokenizer, saved once per vocab size."""
    if (dir / "model.safetensors").is_file() and (dir / "tokenizer.json").is_file():
        return dir
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = model.generation_config
    g.pad_token_id, g.bos_token_id, g.eos_token_id = 0, 1, 2
    g.min_new_tokens = NEW_TOKENS  # exactly NEW_TOKENS new tokens (max_new_tokens is NEW_TOKENS too)
    dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dir, safe_serialization=True)
    build_tokenizer(vocab).save_pretrained(dir)
    return dir


def _words(rng, vocab: int, n: int) -> str:
    return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(n))


def build_data(path: Path, kind: str, vocab: int, rows: int) -> Path:
    import random
    rng = random.Random(SEED * 1000 + vocab + (1 if kind == "grpo" else 0))
    with open(path, "w") as f:
        for _ in range(rows):
            rec = {"prompt": _words(rng, vocab, PROMPT - 1)}  # + <bos> = PROMPT tokens
            if kind == "dpo":  # leading space: the completion starts at a word boundary for TRL's concat
                rec["chosen"] = " " + _words(rng, vocab, COMPLETION - 1)  # + <eos> = COMPLETION tokens
                rec["rejected"] = " " + _words(rng, vocab, COMPLETION - 1)
            f.write(json.dumps(rec) + "\n")
    return path


# --------------------------------------------------------------------------- workers (own processes)
def _env() -> dict:
    env = dict(os.environ)
    # GOMP_SPINCOUNT=1000: an idle OpenMP thread (torch's libgomp) spins briefly, then sleeps. With
    # the default (300,000 spins) a run that loses a core to another process turns every barrier
    # into a scheduler wait (about 10x slower); with OMP_WAIT_POLICY=PASSIVE (no spinning) every
    # small op pays a wake-up, which costs the framework with more, smaller ops (alignspec) ~10%.
    env.pop("OMP_WAIT_POLICY", None)
    env.update(OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, GOMP_SPINCOUNT="1000", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               WANDB_DISABLED="true", DISABLE_MLFLOW_INTEGRATION="TRUE")
    return env


def run_process(cmd: list[str], log: Path, env_extra: dict | None = None, timeout: float = 900) -> dict:
    """Run ``cmd`` in its own process; return rc, wall seconds and its peak RSS (MB)."""
    env = _env()
    env.update(env_extra or {})
    t0 = time.perf_counter()
    busy0 = _busy_seconds()
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        deadline = time.time() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    own = ru.ru_utime + ru.ru_stime
    others = max(0.0, _busy_seconds() - busy0 - own) / wall if busy0 is not None else float("nan")
    return {"rc": p.returncode, "wall": wall, "peak_mb": ru.ru_maxrss / 1024, "cpu_s": own, "others": others}


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all cores, from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def trl_worker(args) -> None:
    """``python vs_trl.py _trl KIND MODEL DATA OUT STEPS BETA``: one TRL run, step times to OUT."""
    kind, model_dir, data, out, steps, beta = args
    steps, beta = int(steps), float(beta)
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    times, cpu, t = [], [], {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            t["b"], t["c"] = time.perf_counter(), time.process_time()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - t["b"])
            cpu.append(time.process_time() - t["c"])

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    ds = load_dataset("json", data_files=data, split="train")
    common = dict(output_dir=out, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=1.0, gradient_accumulation_steps=1, bf16=False, fp16=False,
                  gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                  logging_steps=steps, seed=SEED, dataloader_num_workers=0, disable_tqdm=True)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer
        cfg = DPOConfig(per_device_train_batch_size=DPO_PAIRS, beta=beta, max_length=None, **common)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
    else:
        from trl import GRPOConfig, GRPOTrainer
        cfg = GRPOConfig(per_device_train_batch_size=GRPO_PROMPTS * GRPO_N, num_generations=GRPO_N,
                         max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
                         temperature=1.0, top_p=1.0, top_k=0, beta=beta, epsilon=0.2, loss_type="grpo",
                         scale_rewards="group", num_iterations=1, shuffle_dataset=True, **common)
        trainer = GRPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, reward_funcs=reward,
                              callbacks=[StepTimer()])
    trainer.train()
    Path(out, "times.json").write_text(json.dumps({"wall": times, "cpu": cpu}))


# --------------------------------------------------------------------------- one run of each framework
def alignspec_config(w: dict, out: Path, steps: int, extra: dict | None = None) -> Path:
    cfg = {"out": str(out), "steps": steps, "seed": SEED, "lr": LR, "lr_schedule": "constant",
           "weight_decay": 0.0, "max_grad_norm": 1.0, "dtype": "float32", "threads": 0, "eval_every": 0}
    if w["kind"] == "dpo":
        cfg.update(batch_size=DPO_PAIRS, micro_batch_size=DPO_PAIRS, params={"beta": w["beta"]})
    else:
        cfg.update(batch_size=GRPO_PROMPTS, micro_batch_size=GRPO_PROMPTS, max_new_tokens=NEW_TOKENS,
                   rewards=["vs_trl:reward"], params={"beta": w["beta"], "n": GRPO_N, "eps": 0.2})
    cfg.update(extra or {})
    path = out.with_suffix(".json")
    path.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    return path


def run_alignspec(w, model, data, out: Path, steps: int, extra=None) -> dict:
    cfg = alignspec_config(w, out, steps, extra)
    exe = str(Path(sys.executable).with_name("alignspec"))
    cmd = [exe, "run", w["kind"], "--model", str(model), "--data", str(data), "--config", str(cfg)]
    r = run_process(cmd, out.with_suffix(".log"))
    if r["rc"] != 0:
        raise SystemExit(f"alignspec run failed (rc {r['rc']}); see {out.with_suffix('.log')}")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    recs = [x for x in recs if "step_time" in x]
    r["times"] = [x["step_time"] for x in recs]
    r["cpu"] = [x.get("step_cpu_time", float("nan")) for x in recs]
    r["phases"] = {k: statistics.median(x.get(k, 0.0) for x in recs[1:]) for k in recs[0] if k.startswith("time/")}
    r["lengths"] = {int(x[k]) for x in recs for k in ("length/min", "length/max") if k in x}
    return r


def run_trl(w, model, data, out: Path, steps: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    lengths = out.with_suffix(".lengths")
    lengths.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_trl", w["kind"], str(model), str(data), str(out),
           str(steps), str(w["beta"])]
    r = run_process(cmd, out.with_suffix(".log"), {"VS_TRL_LENGTHS": str(lengths)})
    if r["rc"] != 0:
        raise SystemExit(f"TRL run failed (rc {r['rc']}); see {out.with_suffix('.log')}")
    tj = json.loads((out / "times.json").read_text())
    r["times"], r["cpu"] = tj["wall"], tj["cpu"]
    r["lengths"] = _lengths(lengths)
    return r


def _lengths(path: Path) -> set:
    if not path.is_file():
        return set()
    return {n for ln in path.read_text().splitlines() if ln.strip() for n in json.loads(ln)}


def med(times: list[float]) -> float:
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


# --------------------------------------------------------------------------- floor and memory workers
def floor_worker(args) -> None:
    """``_floor MODEL DATA OUT STEPS``: in one process, alternately, an alignspec DPO step (the
    engine of ``alignspec run``, same configuration, reference log-probs precomputed) and a bare
    forward + backward of another copy of the model over the same kind of batch (8 pairs, prompt 64 +
    completion 128 tokens, one forward: body over all 192 positions, output layer at the completion
    positions only, ``F.cross_entropy``, ``backward``; no optimizer). Alternating in one process
    exposes both to the same machine load."""
    model_dir, data, out, steps = args
    steps = int(steps)
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignspec.runtime.engine import build_engine
    work = Path(out).parent
    cfg = alignspec_config(WORKLOADS["dpo32k"], work / "floor_engine", steps + 1, {"precompute_reference": True})
    eng = build_engine("dpo", model=model_dir, data=data, config=str(cfg))
    eng.state.out.mkdir(parents=True, exist_ok=True)
    eng._start_iteration(0, replace=False)
    eng.state.ref_cache.precompute(eng)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model.train()
    rows = [json.loads(ln) for ln in Path(data).read_text().splitlines()[:DPO_PAIRS]]
    seqs = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        for c in (r["chosen"], r["rejected"]):
            seqs.append(p + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    ids = torch.tensor(seqs)
    assert ids.shape == (2 * DPO_PAIRS, PROMPT + COMPLETION), ids.shape
    ours, bare = [], []
    for _ in range(steps):
        res = eng._train_step()
        eng.state.step += 1
        ours.append(res["step_time"])
        t0 = time.perf_counter()
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, PROMPT - 1:-1]
        loss = F.cross_entropy(model.lm_head(h).reshape(-1, model.config.vocab_size), ids[:, PROMPT:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        bare.append(time.perf_counter() - t0)
    Path(out).write_text(json.dumps({"alignspec": ours, "bare": bare}))


MEM_N, MEM_V = 1024, 32000


def mem_worker(args) -> None:
    """``_mem MODE OUT``: peak RSS of the log-prob path alone (hidden [1024, 256] -> per-token
    log-probs at vocab 32000, forward + backward into the hidden states and the output weight).
    MODE baseline builds the same inputs and a weight-gradient-sized buffer (the parameter
    gradient both paths end with, which the optimizer needs anyway) and stops."""
    mode, out = args
    import resource

    import torch
    from alignspec.runtime.models.logprobs import linear_logprobs
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(MEM_V, HIDDEN, generator=g) * 0.02)
    h = torch.randn(MEM_N, HIDDEN, generator=g).requires_grad_()
    t = torch.randint(0, MEM_V, (MEM_N,), generator=g)
    buf = torch.zeros_like(W)
    before = _status_mb("VmRSS")  # inputs + the gradient's storage
    del buf
    _reset_peak()  # the peak so far (imports) is not the path's
    if mode == "chunked":
        lp, _ = linear_logprobs(h, W, None, t)
        lp.sum().backward()
    elif mode == "full":
        lp = (h @ W.t()).log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
        lp.sum().backward()
    peak = _status_mb("VmHWM")
    Path(out).write_text(json.dumps({"before": before, "peak": peak,
                                     "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _status_mb(field: str) -> float:
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith(field + ":"):
            return int(ln.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --------------------------------------------------------------------------- main
# The known wins, one switch at a time: (name, workload, run-config switch). Each workload's
# switched runs sit between two default runs, and each is compared with their mean.
WINS = [
    ("chunked log-probs vs full logits", "dpo32k", {"logprobs_path": "full_logits"}),
    ("chosen + rejected in one forward vs two", "dpo32k", {"pair_forwards": 2}),
    ("reference log-probs precomputed once vs every step", "dpo32k", {"precompute_reference": True}),
    ("prompt shared by its group (one prompt pass per group) vs per row", "grpo0", {"share_prompt": False}),
    ("no reference model when beta = 0 vs building and running one", "grpo0", {"force_reference": True}),
    ("no old forward when each rollout is used once vs one", "grpo0", {"force_old_forward": True}),
    ("lean KV-cached sampler vs model.generate", "grpo0", {"fast_sampling": False}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="steps per run (S >= 3); median over steps 2..S")
    ap.add_argument("--reps", type=int, default=2, help="runs of each framework per workload, alternating")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument("--skip-trl", action="store_true", help="alignspec only (no TRL runs, no ratios)")
    ap.add_argument("--skip-extras", action="store_true", help="no floor / memory / known-wins sections")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "alignspec_vs_trl"))
    ap.add_argument("--threads", default=THREADS, help="OMP_NUM_THREADS of every run (both frameworks)")
    a = ap.parse_args(argv)
    globals()["THREADS"] = str(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    S = max(3, a.steps)
    t_all = time.perf_counter()
    print(f"alignspec vs TRL: {S} steps per run, {a.reps} runs each, alternating; OMP_NUM_THREADS={THREADS}, "
          f"GOMP_SPINCOUNT=1000; work dir {work}", flush=True)
    inputs, results = {}, {}
    for key in a.only.split(","):
        w = WORKLOADS[key]
        model = build_model(work / f"llama_v{w['vocab']}", w["vocab"])
        rows = (DPO_PAIRS if w["kind"] == "dpo" else GRPO_PROMPTS) * S
        data = build_data(work / f"{w['kind']}_v{w['vocab']}.jsonl", w["kind"], w["vocab"], rows)
        inputs[key] = (w, model, data)
        res = {"trl": [], "alignspec": []}
        for rep in range(a.reps):
            if not a.skip_trl:
                r = run_trl(w, model, data, work / f"{key}_trl_{rep}", S)
                res["trl"].append(r)
                _say(f"{key} TRL #{rep}", r)
            r = run_alignspec(w, model, data, work / f"{key}_as_{rep}", S)
            res["alignspec"].append(r)
            _say(f"{key} alignspec #{rep}", r, "  " + " ".join(f"{k[5:]}={v:.2f}" for k, v in r["phases"].items()))
        results[key] = res
    extras = {}
    if not a.skip_extras:
        extras = run_extras(work, S, inputs, results)
    print()
    print(table(results))
    if extras:
        print(extras_report(extras, results))
    (work / "results.json").write_text(json.dumps({"results": results, "extras": extras}, default=list, indent=1))
    print(f"\ntotal bench time {time.perf_counter() - t_all:.0f}s (results: {work / 'results.json'})")
    return 0


def _say(what: str, r: dict, more: str = "") -> None:
    print(f"  {what}: {med(r['times']):.3f} s/step, peak {r['peak_mb']:.0f} MB, other processes "
          f"{r['others']:.1f} cores busy{more}", flush=True)


def run_extras(work: Path, S: int, inputs: dict, results: dict) -> dict:
    ex = {"wins": {}, "defaults": {}}
    me = str(Path(__file__).resolve())
    for key in ("dpo32k", "grpo0"):
        if key not in inputs:
            continue
        w, model, data = inputs[key]
        defaults = [run_alignspec(w, model, data, work / f"win_{key}_default_0", S)]
        _say(f"wins {key}: default", defaults[0])
        for name, k, switch in WINS:
            if k != key:
                continue
            tag = "_".join(f"{a}-{b}" for a, b in switch.items())
            r = run_alignspec(w, model, data, work / f"win_{key}_{tag}", S, switch)
            _say(f"wins {key}: {tag}", r)
            ex["wins"][name] = {"key": key, "switch": switch, "run": r}
            if switch.get("precompute_reference"):  # the floor, right after the precomputed run
                out = work / "floor.json"
                b = run_process([sys.executable, me, "_floor", str(model), str(data), str(out), str(S)],
                                work / "floor.log")
                if b["rc"] != 0:
                    raise SystemExit(f"floor run failed; see {work / 'floor.log'}")
                fl = json.loads(out.read_text())
                ex["floor"] = {"alignspec": med(fl["alignspec"]), "bare": med(fl["bare"]), "others": b["others"]}
                print(f"  floor: alignspec step (reference precomputed) {ex['floor']['alignspec']:.3f} s, bare "
                      f"forward+backward {ex['floor']['bare']:.3f} s, other processes {b['others']:.1f} cores busy",
                      flush=True)
        defaults.append(run_alignspec(w, model, data, work / f"win_{key}_default_1", S))
        _say(f"wins {key}: default", defaults[1])
        ex["defaults"][key] = defaults
    # memory of the log-prob path alone, each mode in its own process
    mem = {}
    for mode in ("baseline", "chunked", "full"):
        out = work / f"mem_{mode}.json"
        r = run_process([sys.executable, me, "_mem", mode, str(out)], work / f"mem_{mode}.log",
                        {"MALLOC_MMAP_THRESHOLD_": "65536"})
        if r["rc"] != 0:
            raise SystemExit(f"memory run failed; see {work / f'mem_{mode}.log'}")
        mem[mode] = json.loads(out.read_text())
    ex["memory"] = mem
    return ex


def tokens_per_step(key: str) -> int:
    w = WORKLOADS[key]
    if w["kind"] == "dpo":
        return 2 * DPO_PAIRS * (PROMPT + COMPLETION)
    return GRPO_PROMPTS * GRPO_N * (PROMPT + NEW_TOKENS)


def _agg(runs: list[dict]) -> tuple[float, float]:
    """(median over runs of each run's median step time, max peak RSS in MB)."""
    return statistics.median(med(r["times"]) for r in runs), max(r["peak_mb"] for r in runs)


def table(results: dict) -> str:
    out = ["| workload | TRL s/step | alignspec s/step | speedup (TRL/alignspec) | TRL tokens/s | alignspec tokens/s "
           "| TRL peak RSS | alignspec peak RSS | memory ratio (alignspec/TRL) | goal |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for key, res in results.items():
        tok = tokens_per_step(key)
        a_s, a_m = _agg(res["alignspec"])
        lens = set().union(*(r["lengths"] for r in res["alignspec"] + res["trl"]))
        if WORKLOADS[key]["kind"] == "grpo":
            if lens != {NEW_TOKENS} or any(not r["lengths"] for r in res["alignspec"] + res["trl"]):
                notes.append(f"{key}: completion lengths {sorted(lens)} (expected exactly {NEW_TOKENS})")
            else:
                notes.append(f"{key}: every completion of every run has exactly {NEW_TOKENS} tokens in both "
                             f"frameworks (TRL: the completion ids its reward call gets; alignspec: length/min, "
                             f"length/max of metrics.jsonl)")
        if res["trl"]:
            t_s, t_m = _agg(res["trl"])
            sp, mr = t_s / a_s, a_m / t_m
            g_s, g_m = GOALS[key]
            ok = sp >= g_s and (g_m is None or mr <= g_m)
            goal = f"≥ {g_s}×" + (f", ≤ {g_m}" if g_m else "") + (": met" if ok else ": MISSED")
            out.append(f"| {WORKLOADS[key]['label']} | {t_s:.2f} | {a_s:.2f} | {sp:.2f}× | {tok / t_s:,.0f} | "
                       f"{tok / a_s:,.0f} | {t_m / 1024:.2f} GB | {a_m / 1024:.2f} GB | {mr:.2f} | {goal} |")
        else:
            out.append(f"| {WORKLOADS[key]['label']} | - | {a_s:.2f} | - | - | {tok / a_s:,.0f} | - | "
                       f"{a_m / 1024:.2f} GB | - | - |")
    if any(res["trl"] for res in results.values()):
        out += ["", "The same runs in CPU seconds per step (all threads of the run's process, median of steps 2..S; "
                "less sensitive than wall time to other processes on the machine):", "",
                "| workload | TRL CPU s/step | alignspec CPU s/step | ratio (TRL/alignspec) |", "|---|---|---|---|"]
        for key, res in results.items():
            if res["trl"]:
                t_c = statistics.median(med(r["cpu"]) for r in res["trl"])
                a_c = statistics.median(med(r["cpu"]) for r in res["alignspec"])
                out.append(f"| {WORKLOADS[key]['label']} | {t_c:.2f} | {a_c:.2f} | {t_c / a_c:.2f}× |")
    loads = [r["others"] for res in results.values() for r in res["trl"] + res["alignspec"]]
    out.append("")
    out.append(f"s/step: median over runs of each run's median of steps 2..S; peak RSS: max over runs. "
               f"Other processes kept {statistics.mean(loads):.1f} of {os.cpu_count()} cores busy on average "
               f"during the runs (max {max(loads):.1f}).")
    out.extend(notes)
    return "\n".join(out)


def extras_report(ex: dict, results: dict) -> str:
    out = []
    if "floor" in ex:
        f = ex["floor"]
        ratio = f["alignspec"] / f["bare"]
        out += ["", "Floor (DPO, vocab 32000): alignspec step with reference log-probs precomputed vs a bare "
                "forward + backward of the same model over the same 16 x 192 tokens (output layer at the "
                "completion positions only, cross-entropy, no optimizer), alternating in one process, "
                "median of steps 2..S:",
                f"  alignspec {f['alignspec']:.3f} s/step, bare {f['bare']:.3f} s -> {ratio:.2f}x "
                f"(goal <= 1.2x: {'met' if ratio <= 1.2 else 'MISSED'})"]
    if "memory" in ex:
        m = ex["memory"]
        base = m["baseline"]["before"]
        dc, df = m["chunked"]["peak"] - base, m["full"]["peak"] - base
        out += ["", f"Memory of the log-prob path alone (vocab {MEM_V}, {MEM_N} completion tokens, hidden {HIDDEN}, "
                "forward + backward, each in its own process, peak RSS above a baseline process that builds the "
                "same inputs and the weight gradient's storage):",
                f"  alignspec tiled path {dc:.0f} MB, log_softmax over full logits {df:.0f} MB -> "
                f"{100 * dc / df:.1f}% (goal <= 10%: {'met' if dc <= 0.1 * df else 'MISSED'})"]
    if ex.get("wins"):
        out += ["", "Known wins, one switch at a time (alignspec; each switched run sits between two default runs "
                "of the same workload and is compared with their mean; CPU time = all threads, less sensitive "
                "to other processes):",
                "| win | workload | switch | default s/step | switched s/step | time saved | CPU time saved | "
                "default peak RSS | switched peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
        for name, key, switch in WINS:
            if name not in ex["wins"]:
                continue
            r = ex["wins"][name]["run"]
            ds = ex["defaults"][key]
            d_s = statistics.mean(med(x["times"]) for x in ds)
            d_m = max(x["peak_mb"] for x in ds)
            s_s, s_m = med(r["times"]), r["peak_mb"]
            d_c, s_c = statistics.mean(med(x["cpu"]) for x in ds), med(r["cpu"])
            fast_s, slow_s = (s_s, d_s) if switch.get("precompute_reference") else (d_s, s_s)
            fast_c, slow_c = (s_c, d_c) if switch.get("precompute_reference") else (d_c, s_c)
            sw = ", ".join(f"{k}={v}" for k, v in switch.items())
            out.append(f"| {name} | {key} | {sw} | {d_s:.2f} | {s_s:.2f} | {100 * (1 - fast_s / slow_s):.0f}% "
                       f"({slow_s / fast_s:.2f}x) | {100 * (1 - fast_c / slow_c):.0f}% ({slow_c / fast_c:.2f}x) | "
                       f"{d_m / 1024:.2f} GB | {s_m / 1024:.2f} GB |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_trl":
        trl_worker(sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        floor_worker(sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_mem":
        mem_worker(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
