"""Environments of multi-turn episodes (the ``rollout`` sampler, episodes.py).

An environment is a Python class named in the run configuration (``env: module:Class``),
imported only because the configuration names it, and built once per episode with no
arguments. Its protocol::

    class MyEnv:
        def reset(self, row: dict) -> str | None:
            '''The episode's first observation (appended to the prompt), or None.'''
        def step(self, text: str) -> tuple[str | None, float, bool]:
            '''The policy's turn (decoded text) -> (observation, reward, done).'''

The observation goes into the context (its tokens carry no gradient); the rewards of an
episode add up to ``env_reward(response)``. With ``tools:`` configured, a turn that calls
tools gets their results as its observation (tools.py) and the episode goes on; a turn
without a call is the environment's (``step``); with tools and no ``env``, a turn without
a call ends the episode with reward 0. An episode also ends after ``max_turns`` turns (EOS
ends a turn, not the episode: the environment answers it).
"""

from __future__ import annotations

import math

from ..errors import RunError, RunFailure
from ..user_code import import_named


def resolve_env_class(name: str):
    cls = import_named(name, "env", "class", "env: my_envs:Calculator")
    for m in ("reset", "step"):
        if not callable(getattr(cls, m, None)):
            raise RunError(f"env {name!r}: the class has no {m}(...) method",
                           hint="an environment has reset(row) -> observation and step(text) -> "
                                "(observation, reward, done)")
    return cls


class Episode:
    """One episode: the user's environment (if any) and the tools, behind one ``step``."""

    def __init__(self, env_cls, toolbox, name: str, max_chars: int = 2000):
        self.env = env_cls() if env_cls is not None else None
        self.max_chars = int(max_chars)
        self.truncated = 0  # observations cut (at max_chars here, at the context in episodes.play)
        self.tools = toolbox
        self.name = name
        self.reward = 0.0
        self.turns = 0
        self.tool_calls = 0
        self.first = None  # the first observation (reset's), appended to the prompt

    def reset(self, row: dict) -> str | None:
        if self.env is not None:
            self.first = self._text(self._user("reset", row), "reset")
        return self.first

    def step(self, text: str) -> tuple[str | None, bool]:
        """(observation, done) after the policy's turn ``text``; rewards accumulate."""
        self.turns += 1
        if self.tools is not None:
            before = self.tools.counts["calls"]
            obs = self.tools.observe(text)
            self.tool_calls += self.tools.counts["calls"] - before
            if obs is not None:
                return obs, False
            if self.env is None:
                return None, True
        if self.env is None:
            return None, True
        out = self._user("step", text)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise RunFailure(f"env {self.name}: step(text) returned {type(out).__name__}, expected "
                             "(observation, reward, done)")
        obs, reward, done = out
        try:
            value = float(reward)
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None or not math.isfinite(value):
            raise RunFailure(f"env {self.name}: step(text) returned the reward {_show(reward)}, expected a finite "
                             "number")
        self.reward += value
        return self._text(obs, "step"), bool(done)

    def _user(self, method: str, arg):
        try:
            return getattr(self.env, method)(arg)
        except Exception as e:
            raise RunFailure(f"env {self.name}: {method}(...) raised {type(e).__name__}: {e}") from e

    def _text(self, obs, method: str) -> str | None:
        if obs is None or isinstance(obs, str):
            if obs and len(obs) > self.max_chars:  # bounded as tool results are (env_max_chars)
                self.truncated += 1
                obs = obs[:self.max_chars] + f"... [truncated, {len(obs)} chars]"
            return obs or None
        raise RunFailure(f"env {self.name}: {method}(...) returned an observation of type {type(obs).__name__}, "
                         "expected a string or None")


def _show(v) -> str:
    try:
        return repr(v)[:80]
    except Exception:  # noqa: BLE001  (the user's __repr__)
        return f"of type {type(v).__name__}"
