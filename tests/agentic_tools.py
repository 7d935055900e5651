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
