"""Fuzzing the language front to back (issue 14): every input gives a compiled algorithm or the
project's SpecError, never another exception, and never more than a second of CPU.

Two generators, both through hypothesis so that a failure shrinks to a small spec:
- grammar-aware: specs assembled from the language's own tables (sections, functions with
  their arities, runtime quantities, params with hostile values, defs, filters);
- mutation-based: the built-in specs with characters and tokens deleted, inserted, duplicated
  and swapped.
`bench/fuzz.py` runs the same generators for longer (`make fuzz`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from fuzz import compile_or_spec_error, grammar_specs, mutated_specs  # noqa: E402

# 2,500 inputs in CI (about a minute); `make fuzz` runs 20,000 of each kind
SCALE = float(os.environ.get("ALIGNSPEC_FUZZ_SCALE", "1"))


def _settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@_settings(500)
@given(text=grammar_specs())
def test_grammar_aware_specs_compile_or_give_a_spec_error(text):
    compile_or_spec_error(text)


@_settings(2000)
@given(text=mutated_specs())
def test_mutated_builtins_compile_or_give_a_spec_error(text):
    compile_or_spec_error(text)
