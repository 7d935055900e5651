"""SpecError → a plain record for tools: `alignspec check --format json` and the language server.

One record per problem, with the checker's own position and hint:

    {"file": "bad.align", "line": 7, "column": 30, "end_line": 7, "end_column": 33,
     "severity": "error", "kind": "unknown-name", "message": "unknown name 'lgp'",
     "hint": "did you mean 'logp'?"}

Lines and columns are 1-based, as in the text report (`file:line:col`); `end_column` is
exclusive (the caret under the text covers `column .. end_column - 1`). A problem that belongs
to a whole file (one that cannot be read, a missing built-in) has line and column 0. `hint` is
null when the checker has none. A file can give several records (`dsl.check.problems`: the
first problem of each statement, filter and loss term that fails on its own; a syntax or
structure problem ends the file's check); the first is the one the text format prints.
"""

from __future__ import annotations

import json

from alignspec.dsl.errors import SpecError

FIELDS = ("file", "line", "column", "end_line", "end_column", "severity", "kind", "message", "hint")


def record(e: SpecError, severity: str = "error") -> dict:
    """The machine-readable form of one SpecError (keys in FIELDS order)."""
    s = e.span
    end_line, end_col = (s.end_line, s.end_col) if s.end_line else (s.line, s.col)
    if (end_line, end_col) < (s.line, s.col):
        end_line, end_col = s.line, s.col
    return {"file": s.file, "line": s.line, "column": s.col, "end_line": end_line, "end_column": end_col,
            "severity": severity, "kind": e.kind, "message": e.message, "hint": e.hint}


def to_json(errors: list[SpecError]) -> str:
    """The JSON array that `alignspec check --format json` prints (one record per problem)."""
    return json.dumps([record(e) for e in errors], indent=2, ensure_ascii=False)
