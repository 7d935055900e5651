"""The built-in step-structured task for tree-search specs: multi-step sums, one step a line.

A spec whose sampler is ``tree_search(...)`` runs, on the built-in default (no
``--model`` / ``--data``), on ``tree_search.StepTask`` with three terms: the prompt is
``"2+3+4=\\n"``, a solution is ``"5+4=\\n9"`` (each line adds the first two terms; the last
line is the answer, ended by EOS). All 1000 problems ``a+b+c`` (digits) are split once by a
fixed seed into 100 held-out and 900 training problems.

- ``records(kind)``: training rows ``{"prompt", "answer"}`` (``demonstrations`` add the
  full solution as ``response``);
- ``eval_score(model, tokenizer)``: greedy full-solution accuracy on the held-out prompts
  (every step the right partial sum and the final answer right, ``StepTask.is_correct``);
- ``reward(prompts, completions, records)``: 1 for a correct full solution, else 0 (the
  value of terminal nodes and of rollouts in the search);
- ``builtin_model_dir(warm=...)``: the same tiny Llama as the arithmetic task, after a short
  SFT warm-up on full solutions of the training problems, cached under ``$ALIGNSPEC_CACHE``
  in ``tiny-stepwarm-<hash of every setting>`` (built once, atomically). The warm-up is
  short on purpose: it teaches the format and part of the tables, so held-out accuracy
  starts low and search-guided training has room to lift it.
"""

from __future__ import annotations

import random
from pathlib import Path

from .tasks import sft_warmup
from ..rollout.tree_search import StepTask

TERMS = 3
HELDOUT = 100
SPLIT_SEED = 4321
MAX_NEW_TOKENS = 12          # "18+9=\n27" + EOS is 9 tokens
STEP_TOKENS = 8              # one step: "18+9=\n" is 6 tokens
WARMUP_SETTINGS = {"steps": 200, "batch": 16, "lr": 3e-3, "seed": 0}


def _problems():
    probs = [(a, b, c) for a in range(10) for b in range(10) for c in range(10)]
    random.Random(SPLIT_SEED).shuffle(probs)
    return probs[HELDOUT:], sorted(probs[:HELDOUT])


class BuiltinStepTask:
    """Three-term sums solved one partial sum per line (see the module docstring)."""

    name = "builtin:step_addition"
    max_new_tokens = MAX_NEW_TOKENS
    step_tokens = STEP_TOKENS

    def __init__(self):
        self.steps = StepTask(terms=TERMS)
        self.train_problems, self.eval_problems = _problems()

    def _row(self, xs) -> dict:
        prompt = StepTask.prompt(list(xs))
        return {"prompt": prompt, "answer": str(sum(xs))}

    def solution(self, prompt: str) -> str:
        return "".join(self.steps.solution(prompt))

    def records(self, kind: str) -> list[dict]:
        rows = []
        for xs in self.train_problems:
            row = self._row(xs)
            if kind == "demonstrations":
                row["response"] = self.solution(row["prompt"])
            elif kind == "pairs":
                sol = self.steps.solution(row["prompt"])
                wrong = list(sol)
                wrong[-1] = str(int(sol[-1]) + 1)
                row["chosen"], row["rejected"] = "".join(sol), "".join(wrong)
            rows.append(row)
        return rows

    def eval_records(self, size: int | None = None) -> list[dict]:
        rows = [self._row(xs) for xs in self.eval_problems]
        return rows[:size] if size else rows

    def is_correct(self, prompt: str, completion: str) -> bool:
        return self.steps.is_correct(prompt + completion)

    def reward(self, prompts, completions, records) -> list[float]:
        return [float(self.is_correct(p, c)) for p, c in zip(prompts, completions)]

    def eval_score(self, model, tokenizer, size: int | None = None, prompt_format=None) -> float:
        """Greedy full-solution accuracy on the held-out problems (prompts through ``prompt_format``,
        runtime/data/prompts.py, as in training; None: the raw text)."""
        from .tasks import greedy_accuracy
        return greedy_accuracy(model, tokenizer, self.eval_records(size), self.max_new_tokens,
                               lambda row, text: self.is_correct(row["prompt"], text), prompt_format)

    def builtin_model_dir(self, warm: bool = True, seed: int = 0) -> tuple[str, dict]:
        from .tasks import MODEL_SETTINGS, cache_key, builtin_model_dir, cache_root, cached_model_dir, copy_init_model
        if not warm:
            return builtin_model_dir(warm=False, seed=seed)
        settings = {"model": MODEL_SETTINGS, "init_seed": seed, "task": self.name, "terms": TERMS,
                    "heldout": HELDOUT, "split_seed": SPLIT_SEED, "warmup": WARMUP_SETTINGS, "version": 1}
        target = cache_root() / f"tiny-stepwarm-{cache_key(settings)}"

        def build(tmp: Path) -> None:
            copy_init_model(tmp, seed)
            sft_warmup(tmp, self.records("demonstrations"), **WARMUP_SETTINGS)

        return cached_model_dir(target, settings, build), settings


