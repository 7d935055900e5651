"""The one error type of the language: a message pinned to a place in a spec file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of a spec file. Lines and columns are 1-based; `end_col` is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


NOWHERE = Span("<builtin>", 0, 0, 0, 0)


class SpecError(Exception):
    """A problem with a spec, reported as `file:line:col: message` with the source line and a caret.

    `kind` is a short stable identifier ("syntax", "unknown-name", "level", …) that tests and
    tools can rely on; `hint` says what to do about it.
    """

    def __init__(self, message: str, span: Span | None = None, *, kind: str = "error",
                 hint: str | None = None, source_line: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span or NOWHERE
        self.kind = kind
        self.hint = hint
        self.source_line = source_line

    @property
    def file(self) -> str:
        return self.span.file

    @property
    def line(self) -> int:
        return self.span.line

    @property
    def col(self) -> int:
        return self.span.col

    def format(self) -> str:
        """The full report: location and message, the offending line with a caret, the hint."""
        head = f"{self.span}: {self.message}" if self.span.line else f"{self.span.file}: {self.message}"
        parts = [head]
        if self.source_line is not None and self.span.line:
            text = self.source_line.rstrip("\r\n")
            if len(text) > 200:  # keep a 1 MB line readable: show a window around the column
                start = max(0, self.span.col - 100)
                shown = text[start:start + 200]
                caret_at = self.span.col - 1 - start
                text = ("…" if start else "") + shown + "…"
                caret_at += 1 if start else 0
            else:
                caret_at = self.span.col - 1
            width = 1
            if self.span.end_line == self.span.line and self.span.end_col > self.span.col:
                width = min(self.span.end_col - self.span.col, max(1, len(text) - caret_at))
            parts.append("    " + text)
            parts.append("    " + " " * max(caret_at, 0) + "^" * max(width, 1))
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.format()
