"""Tools an episode's policy may call: plain Python functions named in the run configuration.

``tools: [module:function, ...]`` imports each function only because the configuration
names it (the same opt-in as ``rewards``). A tool is a function with type hints and a
Google-style docstring; its JSON schema comes from ``transformers.utils.get_json_schema``
and goes to the chat template (``apply_chat_template(..., tools=schemas)``) when the
tokenizer has one.

Calls are parsed from the policy's text in two formats:

* the tag format (any tokenizer; the markers are ``tool_call_tags``, default
  ``<call>`` / ``</call>``)::

      <call>add(123, 456)</call>        ->  <result>579</result>

  The arguments are Python literals (``name(1, "a", x=2.5)``); where that does not parse,
  whitespace-separated words (``add(123 456)``: the built-in character tokenizer has no
  comma or quote), each a literal if it is one, else a string. The result is wrapped in
  ``tool_result_tags`` (default ``<result>`` / ``</result>``);
* the JSON format many chat templates ask for (Hermes, Qwen):
  ``<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>``.

A tool never crashes a run: one that raises gives ``error: ValueError: ...``, one that runs
longer than ``tool_timeout`` seconds gives ``error: timed out after 2s`` (it runs in a
daemon thread, which Python cannot stop: it is left to finish on its own, its result
dropped; at most ``tool_max_stuck`` such threads, past which a call is not run), a result
or exception whose text cannot be made is an error observation, a result longer than
``tool_max_chars`` is cut there and marked ``... [truncated, N chars]``; an unknown tool or unparsable arguments say so too. ``ToolBox.counts``
keeps the number of calls, errors and timeouts.
"""

from __future__ import annotations

import ast
import json
import re
import threading
from collections.abc import Callable

from ..errors import RunError
from ..user_code import import_named


def resolve_tool(name: str) -> Callable:
    """The function ``module:function`` (imported because the configuration names it)."""
    return import_named(name, "tool", "function", "tools: [my_tools:calculator]")


def tool_schema(name: str, fn: Callable) -> dict:
    from transformers.utils import get_json_schema
    try:
        return get_json_schema(fn)
    except Exception as e:
        raise RunError(f"tool {name!r}: no JSON schema from its signature and docstring: {e}",
                       hint="give every argument a type hint and describe it under Args: in the docstring") from e


def _literal(word: str):
    try:
        return ast.literal_eval(word)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return word


def parse_args(text: str) -> tuple[list, dict]:
    """Positional and keyword arguments of ``name(ARGS)``: Python literals, else words."""
    text = text.strip()
    if not text:
        return [], {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if isinstance(call, ast.Call):
            return ([ast.literal_eval(a) for a in call.args],
                    {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg})
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    return [_literal(w) for w in text.split()], {}


def _text_of(v) -> str:
    """A tool's result as text: JSON, else its repr (either may raise: the caller guards)."""
    try:
        return json.dumps(v, default=str)
    except (TypeError, ValueError, RecursionError):
        return repr(v)


def _safe(e: BaseException) -> str:
    try:
        return str(e)[:200]
    except BaseException:  # noqa: BLE001
        return "(no text)"


class ToolBox:
    """The configured tools, their schemas, the call parser and the guarded caller."""

    def __init__(self, names: list[str], *, timeout: float = 5.0, max_chars: int = 400,
                 call_tags=("<call>", "</call>"), result_tags=("<result>", "</result>"),
                 builtin: list[Callable] = (), max_stuck: int = 8):
        """``names``: ``module:function`` strings of the run configuration; ``builtin``: our own
        functions (a built-in task's tools, e.g. tasks/tool_task.py's calculator), not imported."""
        self.fns = {}
        self.schemas = []
        for n, fn in [(n, resolve_tool(n)) for n in names] + [(f.__name__, f) for f in builtin]:
            self.fns[fn.__name__] = fn
            self.schemas.append(tool_schema(n, fn))
        self.timeout, self.max_chars = float(timeout), int(max_chars)
        self.call_tags, self.result_tags = tuple(call_tags), tuple(result_tags)
        o, c = (re.escape(t) for t in self.call_tags)
        self._tag = re.compile(o + r"\s*([A-Za-z_]\w*)\s*\((.*?)\)\s*" + c, re.S)
        self._json = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
        self.counts = {"calls": 0, "errors": 0, "timeouts": 0, "truncated": 0}
        self.max_stuck = int(max_stuck)
        self._stuck: list[threading.Thread] = []  # timed-out calls still running (Python cannot stop them)

    @property
    def stops(self) -> tuple[str, ...]:
        """Texts that end a policy turn: the end of a call."""
        return (self.call_tags[1], "</tool_call>")

    def parse(self, text: str) -> list[tuple[str, list, dict] | tuple[str, str]]:
        """The calls in ``text``, in order: ``(name, args, kwargs)``, or ``(name, error)`` for
        a call whose arguments do not parse."""
        found = []
        for m in self._tag.finditer(text):
            try:
                found.append((m.start(), (m.group(1), *parse_args(m.group(2)))))
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                found.append((m.start(), (m.group(1), f"error: arguments do not parse: {e}")))
        for m in self._json.finditer(text):
            try:
                obj = json.loads(m.group(1))
                args = obj.get("arguments", {})
                if isinstance(args, str):
                    args = json.loads(args)
                found.append((m.start(), (str(obj["name"]), [], dict(args))))
            except Exception as e:
                found.append((m.start(), ("?", f"error: the call is not JSON with name and arguments: {e}")))
        return [c for _, c in sorted(found, key=lambda x: x[0])]

    def call(self, call) -> str:
        """The observation text of one parsed call (never raises)."""
        self.counts["calls"] += 1
        name = call[0]
        if len(call) == 2:
            self.counts["errors"] += 1
            return call[1]
        fn = self.fns.get(name)
        if fn is None:
            self.counts["errors"] += 1
            return f"error: unknown tool {name!r} (tools: {', '.join(self.fns) or 'none'})"
        self._stuck = [t for t in self._stuck if t.is_alive()]
        if len(self._stuck) >= self.max_stuck:  # a thread per call would pile up without bound
            self.counts["errors"] += 1
            return (f"error: not run: {len(self._stuck)} earlier timed-out tool calls are still running "
                    f"(tool_max_stuck {self.max_stuck})")
        box: dict = {}

        def target():
            try:
                box["value"] = fn(*call[1], **call[2])
            except BaseException as e:  # noqa: BLE001  (a tool's failure is an observation)
                box["error"] = e

        t = threading.Thread(target=target, daemon=True, name=f"tool-{name}")
        t.start()
        t.join(self.timeout)
        if t.is_alive():
            self._stuck.append(t)
            self.counts["errors"] += 1
            self.counts["timeouts"] += 1
            return f"error: timed out after {self.timeout:g}s"
        try:  # the conversion is the user's code too (__repr__, __str__) and may fail on any value
            if "error" in box:
                self.counts["errors"] += 1
                e = box["error"]
                return self._cut(f"error: {type(e).__name__}: {e}")
            v = box.get("value")
            return self._cut(v if isinstance(v, str) else _text_of(v))
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if "error" not in box:
                self.counts["errors"] += 1
            what = "the exception's text" if "error" in box else "the result"
            return self._cut(f"error: {what} could not be converted to text: {type(e).__name__}: {_safe(e)}")

    def _cut(self, text: str) -> str:
        if len(text) <= self.max_chars:
            return text
        self.counts["truncated"] += 1
        return text[:self.max_chars] + f"... [truncated, {len(text)} chars]"

    def observe(self, text: str) -> str | None:
        """The observation of the calls in a policy turn (None when it holds no call)."""
        calls = self.parse(text)
        if not calls:
            return None
        o, c = self.result_tags
        return "".join(f"{o}{self.call(x)}{c}" for x in calls)
