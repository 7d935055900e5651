"""Fuzz the spec front end: parse, check, compile and format random and mutated specs.

    python bench/fuzz.py [--examples N] [--seed S]     (make fuzz: 20,000 of each kind)

Every input must give a compiled algorithm or the project's SpecError -- never another
exception -- within a second of CPU time. tests/test_fuzz.py runs the same generators (fewer
examples) in CI. The generators read the language's own tables (dsl/builtins.py), so new
functions and sections are fuzzed without a change here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hypothesis import strategies as st

import alignspec
from alignspec.dsl.builtins import FUNCTIONS, PSEUDO, QUANTITIES, ROLES, SECTIONS, DATA_KINDS, TRAIN_KEYS
from alignspec.dsl.errors import SpecError
from alignspec.dsl.fmt import format_text
from alignspec.dsl.load import builtin_dir

CPU_LIMIT_S = 1.0
LOCALS = ("r", "A", "ratio", "pg", "kl", "h", "w", "x", "with_metrics", "keep", "batch", "mask_", "n")
PARAMS = ("beta", "eps", "n", "k", "gamma", "lam", "tau")
NUMBERS = ("0", "1", "2", "0.5", "1e-4", "-1", "8", "1e999", "1e-999", "123456789012345678901234567890",
           "9" * 400, "0.0", "3.14159", "1_000")
STRINGS = ('""', '"fixed"', '"iterate"', '"a\\"b"', '"\\x00"', '"é"', '"\\N{x}"', '"""', '"\u2028"')


def _warm_up() -> None:
    """One compile before any timing: the first one in a process imports torch and builds the
    parser, a one-time second that is not the input's doing."""
    alignspec.compile("grpo")
    format_text("algorithm w\n", "<warm-up>")


_warm_up()


def _front_end(text: str) -> str:
    """Compile and format ``text``: "ok" or "SpecError" (what the compile gave)."""
    outcome = "ok"
    try:
        alignspec.compile(text)
    except SpecError:
        outcome = "SpecError"
    try:
        format_text(text, "<fuzz>")
    except SpecError:
        pass
    return outcome


def compile_or_spec_error(text: str) -> str:
    """The property: compile (and format) ``text``; only a SpecError may come out, within
    CPU_LIMIT_S of CPU time. An input over the limit is timed once more before it fails: a
    first use of a code path (a lazy import, a cache) or a garbage collection is a one-time
    cost, while an input that is slow to check is slow every time."""
    t0 = time.process_time()
    outcome = _front_end(text)
    spent = time.process_time() - t0
    if spent >= CPU_LIMIT_S:
        t0 = time.process_time()
        _front_end(text)
        spent = time.process_time() - t0
    assert spent < CPU_LIMIT_S, f"{spent:.2f} s of CPU for:\n{text}"
    return outcome


# ----------------------------------------------------------------------------- grammar-aware
def _atoms():
    return st.one_of(
        st.sampled_from(NUMBERS),
        st.sampled_from(sorted(QUANTITIES)),
        st.sampled_from(sorted(PSEUDO | ROLES)),
        st.sampled_from(LOCALS + PARAMS),
        st.sampled_from(STRINGS),
        st.sampled_from(("true", "false")),
    )


def _extend(inner):
    fn = st.sampled_from(sorted(FUNCTIONS))
    call = st.builds(lambda f, args, kw: f"{f}({', '.join(args + kw)})", fn,
                     st.lists(inner, max_size=4),
                     st.lists(st.builds(lambda k, v: f"{k} = {v}",
                                        st.sampled_from(sorted({k for f in FUNCTIONS.values() for k in f.kwargs}
                                                               | {"n", "zz"})), inner), max_size=2))
    binop = st.builds(lambda a, op, b: f"{a} {op} {b}", inner,
                      st.sampled_from(["+", "-", "*", "/", "**", "<", ">=", "==", "!=", "and", "or"]), inner)
    return st.one_of(call, binop,
                     st.builds(lambda a: f"-{a}", inner), st.builds(lambda a: f"not {a}", inner),
                     st.builds(lambda a: f"({a})", inner),
                     st.builds(lambda a, r: f"{a}[{r}]", inner, st.sampled_from(sorted(ROLES) + ["x"])),
                     st.builds(lambda xs: f"[{', '.join(xs)}]", st.lists(inner, max_size=3)))


def expressions():
    return st.recursive(_atoms(), _extend, max_leaves=12)


def _statement(section: str):
    named = st.builds(lambda n, e: f"  {n} = {e}", st.sampled_from(LOCALS), expressions())
    if section == "loss":
        return st.one_of(named, st.builds(lambda e: f"  minimize {e}", expressions()),
                         st.builds(lambda n, e: f"  minimize {n} = {e}", st.sampled_from(LOCALS), expressions()))
    if section == "filter":
        return st.builds(lambda lvl, e: f"  keep {lvl} where {e}", st.sampled_from(["groups", "responses", "x"]),
                         expressions())
    if section == "train":
        return st.builds(lambda k, v: f"  {k} = {v}", st.sampled_from(sorted(TRAIN_KEYS) + ["zz"]), expressions())
    if section == "sample":
        return st.builds(lambda e: f"  responses = {e}", expressions())
    if section == "params":
        return st.builds(lambda n, t, v, d: f"  {n}{t} = {v}{d}", st.sampled_from(PARAMS),
                         st.sampled_from(["", ": int", ": float", ": bool", ": str", ": zz"]),
                         st.one_of(st.sampled_from(NUMBERS + STRINGS), expressions()),
                         st.sampled_from(["", ' "a doc"', ' "x\\"y"']))
    return named


def _section():
    return st.sampled_from(SECTIONS + ("zz",)).flatmap(
        lambda s: st.builds(lambda body: "\n".join([s] + body), st.lists(_statement(s), min_size=0, max_size=4)))


def _defs():
    return st.lists(st.builds(lambda n, ps, e: f"def {n}({', '.join(ps)}) = {e}",
                              st.sampled_from(("f", "g", "clip", "h", "mean")),
                              st.lists(st.sampled_from(("x", "y", "a")), max_size=3), expressions()),
                    max_size=3)


def grammar_specs():
    header = st.one_of(st.just("algorithm fz"), st.just("library fz"),
                       st.builds(lambda b: f"algorithm fz extends {b}",
                                 st.sampled_from(("grpo", "dpo", "ppo", "common", "fz", "nosuch"))))
    imports = st.lists(st.sampled_from(("import common", "import nosuch", "import fz")), max_size=2)
    data = st.one_of(st.just(""), st.builds(lambda d: f"data {d}", st.sampled_from(DATA_KINDS + ("zz",))))
    return st.builds(lambda h, i, d, defs, secs: "\n".join([h, *i, d, *defs, "", *secs]) + "\n",
                     header, imports, data, _defs(), st.lists(_section(), max_size=6))


# ----------------------------------------------------------------------------- mutation-based
_BUILTINS = {p.stem: p.read_text() for p in sorted(builtin_dir().glob("*.align"))}
_TOKENS = ("(", ")", "[", "]", ",", "=", "\n", "\n  ", "  ", "\t", "#", '"', "\r", "\x00", "\u00e9", "\u2028",
           "-", "*", "**", "1e999", "0", "minimize ", "keep groups where ", "def f(x) = x\n", "extends grpo ",
           "import common\n", *SECTIONS, *sorted(FUNCTIONS), *sorted(QUANTITIES), "chosen", "rejected")


def _mutate(text: str, ops: list[tuple[int, int, int, int]]) -> str:
    for kind, a, b, tok in ops:
        if not text:
            text = _TOKENS[tok % len(_TOKENS)]
            continue
        i, j = sorted((a % (len(text) + 1), b % (len(text) + 1)))
        lines = text.split("\n")
        if kind == 0:   # delete a slice (at most 40 characters)
            text = text[:i] + text[min(j, i + 40):]
        elif kind == 1:  # insert a token
            text = text[:i] + _TOKENS[tok % len(_TOKENS)] + text[i:]
        elif kind == 2:  # duplicate a line
            k = a % len(lines)
            text = "\n".join(lines[:k + 1] + [lines[k]] + lines[k + 1:])
        elif kind == 3:  # swap two lines
            x, y = a % len(lines), b % len(lines)
            lines[x], lines[y] = lines[y], lines[x]
            text = "\n".join(lines)
        else:            # replace a character by a token
            text = text[:i] + _TOKENS[tok % len(_TOKENS)] + text[i + 1:]
    return text


def mutated_specs():
    op = st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), st.integers(0, 1 << 16), st.integers(0, 1 << 10))
    return st.builds(_mutate, st.sampled_from(sorted(_BUILTINS.values())), st.lists(op, min_size=1, max_size=6))


def main() -> None:
    from hypothesis import HealthCheck, given, seed, settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts = {}
    for name, strategy in (("grammar-aware", grammar_specs()), ("mutation", mutated_specs())):
        seen = {"ok": 0, "SpecError": 0}

        @seed(args.seed)
        @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(text=strategy)
        def run(text):
            seen[compile_or_spec_error(text)] += 1

        t0 = time.perf_counter()
        run()
        counts[name] = (seen, time.perf_counter() - t0)
    for name, (seen, secs) in counts.items():
        print(f"{name:14s} {sum(seen.values()):7d} inputs: {seen['ok']} compiled, {seen['SpecError']} SpecError, "
              f"0 other exceptions ({secs:.0f} s)")


if __name__ == "__main__":
    main()
