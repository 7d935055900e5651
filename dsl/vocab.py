"""The words of the language, read from the grammar and the checker's tables at import time.

Editors' tools (the Pygments lexer, the TextMate grammar, the language server's completion and
hover, the docs) take every word list from here, and this module copies none: keywords and
the section and scope words come from the compiled grammar (`grammar.lark`), functions and
quantities from `builtins.py`, parameter types from the checker. A function added to
`FUNCTIONS` is highlighted, completed and documented without touching any of those tools.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .builtins import DATA_KINDS, FUNCTIONS, PSEUDO, QUANTITIES, REFERENCE_MODES, ROLES, SECTIONS, TRAIN_KEYS, Fn


def _alternatives(pattern: str) -> tuple[str, ...]:
    """`(a|b|c)(?!...)` → ("a", "b", "c"): the words of a keyword-set terminal of the grammar."""
    m = re.match(r"\(([A-Za-z_|]+)\)", pattern)
    if not m:  # pragma: no cover - the grammar writes these terminals this way
        raise ValueError(f"not a word alternation: {pattern!r}")
    return tuple(m.group(1).split("|"))


def _grammar_words() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    from .parser import _parser
    keywords, sections, scopes = [], (), ()
    for t in _parser().terminals:
        if t.pattern.type == "str" and t.pattern.value.isalpha():
            keywords.append(t.pattern.value)
        elif t.name == "SECTION":
            sections = _alternatives(t.pattern.value)
        elif t.name == "SCOPE":
            scopes = _alternatives(t.pattern.value)
    return tuple(sorted(keywords)), sections, scopes


_KEYWORDS, GRAMMAR_SECTIONS, SCOPES = _grammar_words()

#: literal words: the grammar's `true` / `false`
CONSTANTS: tuple[str, ...] = tuple(w for w in _KEYWORDS if w in ("true", "false"))
#: operator words (`and`, `or`, `not`)
OPERATOR_WORDS: tuple[str, ...] = tuple(w for w in _KEYWORDS if w in ("and", "or", "not"))
#: statement and header keywords: algorithm, extends, import, data, def, keep, where, minimize, ...
KEYWORDS: tuple[str, ...] = tuple(w for w in _KEYWORDS if w not in CONSTANTS + OPERATOR_WORDS)
#: section keywords, as the checker lists them (the grammar's SECTION terminal must agree: tested)
SECTION_WORDS: tuple[str, ...] = tuple(SECTIONS)
#: every built-in function, sampler, selector and stage
FUNCTION_WORDS: tuple[str, ...] = tuple(sorted(FUNCTIONS))
#: quantities the runtime provides, and the sampler/scorer pseudo-arguments
QUANTITY_WORDS: tuple[str, ...] = tuple(sorted(QUANTITIES))
PSEUDO_WORDS: tuple[str, ...] = tuple(sorted(PSEUDO))
ROLE_WORDS: tuple[str, ...] = tuple(sorted(ROLES))
#: words that name a kind of thing rather than a value: data kinds, train keys, reference modes, models
DATA_WORDS: tuple[str, ...] = tuple(DATA_KINDS)
TRAIN_WORDS: tuple[str, ...] = tuple(TRAIN_KEYS)
REFERENCE_WORDS: tuple[str, ...] = tuple(REFERENCE_MODES)
MODEL_WORDS: tuple[str, ...] = ("policy", "reference")


def param_types() -> tuple[str, ...]:
    from .check import PARAM_TYPES
    return tuple(PARAM_TYPES)


#: the level rule of each kind of function, for signatures (`group_mean: response → group`)
_KIND_WORDS = {"elementwise": "elementwise", "reduce": "reduction", "group": "group statistic",
               "scan": "sequence scan", "external": "scorer bound by the run", "sampler": "sampler (sample section)",
               "selector": "selector (select section)", "stage": "pipeline stage (pipeline section)"}


@dataclass(frozen=True)
class Signature:
    name: str
    text: str      # `clip(value, lower bound, upper bound)`
    levels: str    # `response → group`
    kind: str      # words for the kind


def signature(fn: Fn) -> Signature:
    """How a built-in function is called and which levels it takes and gives."""
    args = list(fn.args)
    if fn.optional:
        args = args[:len(args) - fn.optional] + [f"[{a}]" for a in args[len(args) - fn.optional:]]
    args += [f"{k} = …" for k in fn.kwargs]
    text = f"{fn.name}({', '.join(args)})"
    if fn.kind == "elementwise":
        levels = "any level → the finest level of its arguments"
    elif fn.kind in ("reduce", "group", "scan"):
        takes = " or ".join(fn.takes) if fn.takes else "any level"
        levels = f"{takes} → {fn.gives or 'the same level'}"
    elif fn.kind == "external":
        levels = f"response → {fn.gives}"
    else:
        levels = ""
    return Signature(fn.name, text, levels, _KIND_WORDS.get(fn.kind, fn.kind))


def describe_function(name: str) -> str | None:
    """Markdown for a built-in function: its signature, level rule and notes."""
    fn = FUNCTIONS.get(name)
    if fn is None:
        return None
    s = signature(fn)
    lines = [f"`{s.text}`", "", f"{s.kind}" + (f": `{s.name}: {s.levels}`" if s.levels else "")]
    notes = []
    if fn.doc:
        notes.append(fn.doc)
    if fn.rollout_only:
        notes.append("rollout phase only (may not read gradient-carrying values)")
    if fn.linear:
        notes.append("a batch-wide sum: may be added to a loss term (exact over micro-batches)")
    if fn.min_group > 1:
        notes.append(f"needs groups of at least {fn.min_group}")
    if notes:
        lines += ["", "; ".join(notes)]
    return "\n".join(lines)


def describe_quantity(name: str) -> str | None:
    """Markdown for a runtime quantity: its meaning, level and what it needs."""
    q = QUANTITIES.get(name)
    if q is None:
        return None
    needs = f"; needs: {', '.join(q.requires)}" if q.requires else ""
    grad = "carries gradients" if q.grad else "no gradient"
    return f"`{q.name}`: {q.level}-level quantity provided by the runtime\n\n{q.doc} ({grad}{needs})"
