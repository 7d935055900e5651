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


class RunInterrupted(RunFailure):
    """SIGTERM or SIGINT stopped the run after a step, with a checkpoint saved: the process
    exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), as a shell reports it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, hint="continue with the same command and --resume")
        self.code = 128 + signum
