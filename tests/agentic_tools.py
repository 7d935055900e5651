"""Tools and an environment for tests/test_episodes.py (named in run configurations as
``agentic_tools:...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import time


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def boom(x: int) -> int:
    """A tool that always raises.

    Args:
        x: anything
    """
    raise ValueError("no luck")


def slow(x: int) -> int:
    """A tool that runs past any short timeout.

    Args:
        x: anything
    """
    time.sleep(2.0)
    return x


def huge(x: int) -> str:
    """A tool whose result is very long.

    Args:
        x: anything
    """
    return "9" * 10000


class Count:
    """Rewards 1 for a turn that holds a digit; says "ok" after each turn, done after 2 turns."""

    def reset(self, row):
        self.k = 0
        return None

    def step(self, text):
        self.k += 1
        return "ok", float(any(ch.isdigit() for ch in text)), self.k >= 2


class Other(Count):
    """Another environment (a resumed run may not switch to it unasked)."""


def factorial(n: int) -> int:
    """A result too long for str(): an int over 4,300 digits.

    Args:
        n: the number
    """
    import math
    return math.factorial(n)


def deep(n: int) -> list:
    """A result nested ``n`` deep.

    Args:
        n: the depth
    """
    v: list = []
    for _ in range(n):
        v = [v]
    return v


class _Unprintable:
    def __repr__(self):
        raise RuntimeError("no repr")

    __str__ = __repr__


def unprintable(x: int) -> object:
    """A result whose repr raises.

    Args:
        x: anything
    """
    return _Unprintable()


def bad_error(n: int) -> int:
    """Raises an exception whose text cannot be made (an int over 4,300 digits).

    Args:
        n: the number
    """
    raise ValueError(10 ** n)


def stuck(x: int) -> int:
    """A tool that never returns within a test.

    Args:
        x: anything
    """
    time.sleep(3.0)
    return x


class Flood(Count):
    """Answers each turn with a long observation."""

    def step(self, text):
        self.k += 1
        return "x" * 20000, 1.0, self.k >= 3


class LongReset(Count):
    """A first observation longer than any small model's context."""

    def reset(self, row):
        self.k = 0
        return "y " * 2000


class NanReward(Count):
    """A reward that is not a number."""

    def step(self, text):
        return None, float("nan"), True
