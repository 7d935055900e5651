"""Errors the runtime raises for problems a user can fix (bad paths, bad data, ...)."""

from __future__ import annotations


class RunError(Exception):
    """A user-facing error: ``message`` says what went wrong, ``hint`` (optional) how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class RunFailure(RunError):
    """The run itself failed (e.g. a non-finite loss), as opposed to bad input: exit code 1."""
