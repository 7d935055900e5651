"""The built-in task: single-digit addition, ``"3+4="`` -> ``"7"`` + EOS.

All 100 problems ``a+b`` (a, b in 0..9) are split once, by a fixed seed, into 75 training
problems and 25 held-out evaluation problems (each held-out ``a+b`` has its mirror ``b+a``
in the training set). The task provides

- ``records(kind)``: training rows for a spec's data kind -- ``prompts`` (prompt + answer),
  ``demonstrations`` (prompt + response), ``pairs`` (prompt + chosen + rejected: one row per
  training problem and per nearby wrong sum ``a+b-2 .. a+b+2`` in 0..18, 293 rows; these are
  the warm model's typical mistakes, so every pair says something about the answers it
  actually confuses -- with one fixed wrong sum per problem, DPO rarely sees the model's own
  mistake and does not lift held-out accuracy); ``unpaired`` (prompt + completion + label, for
  KTO): the same answers as labelled rows, each right answer as often as the wrong ones;
- ``eval_score(model, tokenizer)``: greedy exact-match accuracy on the held-out problems;
- ``builtin_model_dir(warm=...)``: the tiny built-in Llama (about 100k parameters), either
  freshly initialized or after a short SFT warm-up on the training problems. Both are cached
  under ``$ALIGNSPEC_CACHE`` (default ``~/.cache/alignspec``) in a directory named by a hash
  of every setting that produced it, so changing a setting never reuses a stale model.

The warm-up is deliberately short: it teaches the answer format (digits, then EOS) and only
part of the table, so that held-out accuracy starts low and an RL spec has room to lift it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

TRAIN_SIZE = 75
SPLIT_SEED = 1234
MODEL_SETTINGS = {"arch": "llama", "hidden": 64, "layers": 2, "heads": 4}
# the built-in model with use_vllm: the same weight shapes in 2 heads of 32 (vLLM's CPU attention
# supports head sizes 32, 64, 80, ... but not the default's 16); `alignspec vllm-serve` serves it
ENGINE_MODEL_SETTINGS = {**MODEL_SETTINGS, "heads": 2}
WARMUP_SETTINGS = {"steps": 100, "batch": 16, "lr": 3e-3, "seed": 0}
MAX_NEW_TOKENS = 3


def _problems():
    """75 training / 25 held-out problems. Held-out problems have a > b and their mirror
    b + a is a training problem: they test whether what is learned carries over to
    unseen prompts through the structure of addition, not a lookup of seen prompts."""
    probs = [(a, b) for a in range(10) for b in range(10)]
    mirrored = [(a, b) for a, b in probs if a > b]
    random.Random(SPLIT_SEED).shuffle(mirrored)
    held = set(mirrored[:100 - TRAIN_SIZE])
    train = [p for p in probs if p not in held]
    random.Random(SPLIT_SEED + 2).shuffle(train)
    return train, sorted(held)


def _nearby_wrong(a: int, b: int) -> list[str]:
    """The wrong sums within 2 of ``a + b`` that are sums of two digits (0..18)."""
    s = a + b
    return [str(x) for x in (s - 2, s - 1, s + 1, s + 2) if 0 <= x <= 18]


class ArithmeticTask:
    """Single-digit addition (see the module docstring)."""

    name = "builtin:addition"
    max_new_tokens = MAX_NEW_TOKENS

    def __init__(self):
        self.train_problems, self.eval_problems = _problems()

    def records(self, kind: str) -> list[dict]:
        rows = []
        for a, b in self.train_problems:
            row = {"prompt": f"{a}+{b}=", "answer": str(a + b)}
            if kind == "pairs":
                rows.extend({**row, "chosen": row["answer"], "rejected": w} for w in _nearby_wrong(a, b))
                continue
            if kind == "unpaired":  # KTO: the pairs' answers as labelled rows, as many right as wrong
                for w in _nearby_wrong(a, b):
                    rows += [{**row, "completion": row["answer"], "label": True},
                             {**row, "completion": w, "label": False}]
                continue
            if kind == "demonstrations":
                row["response"] = row["answer"]
            rows.append(row)
        return rows

    def eval_records(self, size: int | None = None) -> list[dict]:
        rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in self.eval_problems]
        return rows[:size] if size else rows

    def eval_score(self, model, tokenizer, size: int | None = None, prompt_format=None) -> float:
        """Greedy exact-match accuracy on the held-out problems (prompts through ``prompt_format``,
        runtime/data/prompts.py, as in training; None: the raw text)."""
        return greedy_accuracy(model, tokenizer, self.eval_records(size), self.max_new_tokens,
                               lambda row, text: text.strip() == row["answer"], prompt_format)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, correct, prompt_format=None) -> float:
    """The fraction of ``rows`` whose greedy completion ``correct(row, text)`` accepts."""
    from ..rollout.generation import generate_groups
    ro = generate_groups(model, tokenizer, [r["prompt"] for r in rows], 1,
                         max_new_tokens=max_new_tokens, do_sample=False, prompt_format=prompt_format)
    return sum(bool(correct(r, t)) for t, r in zip(ro.texts, rows)) / len(rows)


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNSPEC_CACHE") or Path.home() / ".cache" / "alignspec")


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def builtin_model_dir(warm: bool, seed: int = 0, model: dict | None = None) -> tuple[str, dict]:
    """Path of the cached built-in model (building it if needed) and the settings behind it;
    ``model``: other model settings than ``MODEL_SETTINGS`` (``ENGINE_MODEL_SETTINGS``)."""
    from ..models.tiny import build_tiny_model
    model = model or MODEL_SETTINGS
    settings = {"model": model, "init_seed": seed, "task": ArithmeticTask.name,
                "train_size": TRAIN_SIZE, "split_seed": SPLIT_SEED, "version": 2}
    if warm:
        settings["warmup"] = WARMUP_SETTINGS
    target = cache_root() / f"tiny-{'warm' if warm else 'init'}-{cache_key(settings)}"

    def build(tmp: Path) -> None:
        cfg = dict(model)
        arch = cfg.pop("arch")
        build_tiny_model(tmp, arch, seed=seed, **cfg)
        if warm:
            _warmup(tmp, settings)

    return cached_model_dir(target, settings, build), settings


def copy_init_model(tmp: Path, seed: int = 0, model: dict | None = None) -> None:
    """The freshly initialized built-in model's files (not its settings record) into ``tmp``:
    where another built-in task's warm-up starts (tasks/step_task.py, tasks/tool_task.py)."""
    init_dir, _ = builtin_model_dir(warm=False, seed=seed, model=model)
    for f in Path(init_dir).iterdir():
        if f.is_file() and f.name != "alignspec_builtin.json":
            shutil.copy2(f, tmp / f.name)


def cached_model_dir(target: Path, settings: dict, build) -> str:
    """`target` if a model is cached there; else `build(tmp)` and rename it into place atomically."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        build(tmp)
        (tmp / "alignspec_builtin.json").write_text(json.dumps(settings, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _warmup(path: Path, settings: dict) -> None:
    """A short SFT on the training problems (plain cross-entropy on the answer + EOS)."""
    w = WARMUP_SETTINGS
    sft_warmup(path, ArithmeticTask().records("demonstrations"), w["steps"], w["batch"], w["lr"], w["seed"])


def _sequence(tok, row: dict) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + EOS and their labels (-100: not trained). A row with
    ``segments`` (``[(text, trained), ...]``, an episode's turns and observations) in place of
    ``response`` trains only on the segments marked trained, and on the final EOS."""
    ids = list(tok(row["prompt"])["input_ids"])
    lab = [-100] * len(ids)
    for text, trained in row.get("segments") or [(row["response"], True)]:
        part = list(tok(text, add_special_tokens=False)["input_ids"])
        ids += part
        lab += part if trained else [-100] * len(part)
    return ids + [tok.eos_token_id], lab + [tok.eos_token_id]


def sft_warmup(path: Path, rows: list[dict], steps: int, batch: int, lr: float, seed: int) -> None:
    """Plain cross-entropy on response + EOS (see ``_sequence``) for ``steps`` random batches;
    saved in place."""
    from ..models.loaders import load_policy
    model, tok = load_policy(path)
    rng = random.Random(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            seqs = [_sequence(tok, r) for r in rng.sample(rows, batch)]
            L = max(len(s) for s, _ in seqs)
            ids = torch.full((len(seqs), L), tok.pad_token_id, dtype=torch.long)
            att = torch.zeros((len(seqs), L), dtype=torch.long)
            lab = torch.full((len(seqs), L), -100, dtype=torch.long)
            for i, (s, sl) in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                att[i, :len(s)] = 1
                lab[i, :len(s)] = torch.tensor(sl)
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
