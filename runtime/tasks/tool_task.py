"""The built-in agentic task: sums of three 3-digit numbers, with a calculator tool.

A spec that samples episodes (``rollout(prompt, env = env, ...)``, e.g. ``grpo_tools``) runs,
on the built-in default (no ``--data``, and no ``env`` or ``tools`` configured), on this
task. The tiny model cannot add 3-digit numbers itself (it has about 100k parameters); it
can call ``calc``, our own built-in calculator (not user code: registered for this task
only, never imported by name), and copy its result. One episode, as text::

    123+456+789=                     the prompt
    call calc(123+456+789)=          turn 1: a tool call (tool_call_tags "call ", "=")
    ?1368?                           the observation (tool_result_tags "?", "?"): no gradient
    1368<eos>                        turn 2: the answer; no call, so the episode ends

The character tokenizer has no ``<``, ``>``, ``,`` or capitals, so the task sets its own
call and result markers (``RUN_DEFAULTS``; applied to what the user did not set and printed).
All problems ``a+b+c`` (a, b, c in 100..999) are drawn by a fixed seed: 4,000 training
problems and 50 held-out ones, disjoint. The task provides

- ``records(kind)``: ``{"prompt", "answer"}`` rows (``demonstrations`` add the episode as
  ``segments``: the policy's turns trained, the observation not; ``demonstrations(f)``: only a
  fraction ``f`` of them call the tool, the others answer at once);
- ``final_answer(prompts, completions, answer)`` (the run's ``reward(response)`` unless the
  user configures rewards): 1 if the episode's final answer -- the text after its last tool
  result, or the whole text when it called no tool -- is the sum, else 0;
- ``eval_score(model, tokenizer)``: greedy episodes (temperature 0, at most ``MAX_TURNS``
  turns, the calculator answering) on the held-out problems, exact final answer;
- ``builtin_model_dir(warm=...)``: the tiny Llama after a short SFT warm-up on training
  episodes, cached under ``$ALIGNSPEC_CACHE`` in ``tiny-toolwarm-<hash of every setting>``.
  The warm-up first trains on episodes that all call the calculator (the call format, and
  copying the expression into the call and the result into the answer), then briefly on
  demonstrations of which only one in ten calls it and the others answer at once. The warm
  model can use the tool but seldom does (greedy episodes answer from memory, and wrongly:
  held-out accuracy starts near 0); GRPO on episodes has to find that calling pays.

Why this warm-up (seed 0, greedy held-out accuracy during the first phase): copying the
result into the answer appears abruptly, 0.00 at step 550, 0.84 at 600, 1.00 at 650 (lr 6e-3
and 1e-2 are no faster). A warm-up stopped before that leaves GRPO almost no correct episodes
to learn from; one after it starts at 1.0. So the first phase runs past it, and the second
makes calling the tool rare: the warm model calls it in about 4% of sampled episodes.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

from .tasks import sft_warmup

TERMS = 3
LOW, HIGH = 100, 999
TRAIN_SIZE = 4000
HELDOUT = 50
SPLIT_SEED = 2468
MAX_TURNS = 4                     # the greedy episodes of eval_score (grpo_tools samples with 4 too)
MAX_NEW_TOKENS = 28               # a turn: "call calc(123+456+789)=" is 23 tokens
CALL_TAGS = ("call ", "=")
RESULT_TAGS = ("?", "?")
RUN_DEFAULTS = {"tool_call_tags": CALL_TAGS, "tool_result_tags": RESULT_TAGS}
# the warm-up: first every demonstration calls the tool (the call format and copying its
# result), then only one in ten does and the others answer from memory (a model that knows
# how to call the calculator but seldom does); see the module docstring
WARMUP_SETTINGS = {"steps": 650, "batch": 16, "lr": 3e-3, "seed": 0,
                   "then": {"steps": 100, "tool_fraction": 0.1, "seed": 1}}


def calc(expression: str) -> int:
    """Evaluate an arithmetic expression of whole numbers.

    Args:
        expression: whole numbers joined by +, - and *, with parentheses, e.g. 123+456*2
    """
    text = str(expression).strip()
    if len(text) > 200:
        raise ValueError("the expression is longer than 200 characters")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {text!r}") from None
    return _value(tree)


def _value(node) -> int:
    """The value of an expression tree of whole numbers with + - * (nothing else is evaluated)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
        a, b = _value(node.left), _value(node.right)
        return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
    raise ValueError("only whole numbers, +, -, * and parentheses")


def answer_of(text: str, result_close: str = RESULT_TAGS[1]) -> str:
    """The episode's answer: the text after its last tool result (all of it without a call)."""
    return text.rpartition(result_close)[2].strip()


def _problems():
    rng = random.Random(SPLIT_SEED)
    seen, probs = set(), []
    while len(probs) < TRAIN_SIZE + HELDOUT:
        xs = tuple(rng.randint(LOW, HIGH) for _ in range(TERMS))
        if xs not in seen:
            seen.add(xs)
            probs.append(xs)
    return probs[HELDOUT:], probs[:HELDOUT]


class BuiltinToolTask:
    """Three-term sums of 3-digit numbers with a calculator tool (see the module docstring)."""

    name = "builtin:tool_addition"
    max_new_tokens = MAX_NEW_TOKENS
    run_defaults = RUN_DEFAULTS       # settings the task needs, applied where the user set none
    reward_name = "final_answer"      # the run's reward(response) unless rewards are configured

    def __init__(self):
        self.train_problems, self.eval_problems = _problems()
        self.call_tags, self.result_tags = CALL_TAGS, RESULT_TAGS
        self.timeout, self.max_chars = 5.0, 400

    @staticmethod
    def _row(xs) -> dict:
        return {"prompt": "+".join(map(str, xs)) + "=", "answer": str(sum(xs))}

    def records(self, kind: str) -> list[dict]:
        """Training rows; ``demonstrations``: every one the episode that calls the calculator."""
        return self.demonstrations(1.0) if kind == "demonstrations" else [self._row(xs) for xs in self.train_problems]

    def demonstrations(self, tool_fraction: float, seed: int = 0) -> list[dict]:
        """Training rows with ``segments``: the episode that calls the calculator (its result,
        the observation, not trained on) for a ``tool_fraction`` of them, drawn by ``seed``;
        the others answer at once (from memory: the tiny model cannot add these numbers)."""
        rng = random.Random(seed)
        rows = []
        for xs in self.train_problems:
            r = self._row(xs)
            expr, ans = r["prompt"][:-1], r["answer"]
            if rng.random() < tool_fraction:
                call = f"{CALL_TAGS[0]}calc({expr}){CALL_TAGS[1]}"
                r["segments"] = [(call, True), (f"{RESULT_TAGS[0]}{ans}{RESULT_TAGS[1]}", False), (ans, True)]
            else:
                r["segments"] = [(ans, True)]
            rows.append(r)
        return rows

    def eval_records(self, size: int | None = None) -> list[dict]:
        rows = [self._row(xs) for xs in self.eval_problems]
        return rows[:size] if size else rows

    # -- the tool, the reward, the score --------------------------------------------------------
    def configure(self, cfg) -> None:
        """Take the run's markers and tool limits (the task's own markers unless the user set others)."""
        self.call_tags, self.result_tags = tuple(cfg.tool_call_tags), tuple(cfg.tool_result_tags)
        self.timeout, self.max_chars = float(cfg.tool_timeout), int(cfg.tool_max_chars)

    def toolbox(self):
        """The calculator behind the run's markers (a fresh ToolBox: its own counts)."""
        from ..rollout.tools import ToolBox
        return ToolBox([], timeout=self.timeout, max_chars=self.max_chars, call_tags=self.call_tags,
                       result_tags=self.result_tags, builtin=[calc])

    def final_answer(self, prompts, completions, completion_ids=None, answer=None, **kwargs) -> list[float]:
        """The run's reward (TRL's signature): 1 for the right final answer, else 0."""
        close = self.result_tags[1]
        return [float(answer_of(str(c), close) == str(a)) for c, a in zip(completions, answer)]

    def eval_score(self, model, tokenizer, size: int | None = None, prompt_format=None) -> float:
        """Greedy episodes on the held-out problems (the calculator answering calls): the
        fraction whose final answer is the sum."""
        from ..models.loaders import unwrap_causal_lm
        from ..rollout.envs import Episode
        from ..rollout.episodes import Turns, play
        lm = unwrap_causal_lm(model)
        box = self.toolbox()
        rows = self.eval_records(size)
        if prompt_format is not None:
            prompts = [prompt_format.ids(r["prompt"]) for r in rows]
        else:
            prompts = [list(tokenizer(r["prompt"])["input_ids"]) for r in rows]
        turns = Turns(lm, tokenizer, temperature=0.0, top_p=1.0, max_tokens=self.max_new_tokens, seed=0,
                      stops=box.stops)
        eps = [Episode(None, box, self.name) for _ in rows]
        out = play(turns, prompts, eps, max_turns=MAX_TURNS,
                   context=getattr(lm.config, "max_position_embeddings", None))
        close = self.result_tags[1]
        return sum(answer_of(o["text"], close) == r["answer"] for o, r in zip(out, rows)) / len(rows)

    # -- the warm model ---------------------------------------------------------------------------
    def builtin_model_dir(self, warm: bool = True, seed: int = 0, model: dict | None = None) -> tuple[str, dict]:
        from .tasks import MODEL_SETTINGS, cache_key, builtin_model_dir, cache_root, cached_model_dir, copy_init_model
        if not warm:
            return builtin_model_dir(warm=False, seed=seed, model=model)
        settings = {"model": model or MODEL_SETTINGS, "init_seed": seed, "task": self.name, "terms": TERMS,
                    "range": [LOW, HIGH], "train_size": TRAIN_SIZE, "heldout": HELDOUT, "split_seed": SPLIT_SEED,
                    "tags": [CALL_TAGS, RESULT_TAGS], "warmup": WARMUP_SETTINGS, "version": 1}
        target = cache_root() / f"tiny-toolwarm-{cache_key(settings)}"

        def build(tmp: Path) -> None:
            copy_init_model(tmp, seed, model)
            w = {k: v for k, v in WARMUP_SETTINGS.items() if k != "then"}
            sft_warmup(tmp, self.demonstrations(1.0), **w)
            then = WARMUP_SETTINGS["then"]
            sft_warmup(tmp, self.demonstrations(then["tool_fraction"], then["seed"]),
                       **{**w, "steps": then["steps"], "seed": then["seed"]})

        return cached_model_dir(target, settings, build), settings
