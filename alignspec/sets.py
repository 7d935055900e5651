"""The one parser of ``--set KEY=VALUE`` for every command (``compile``, ``run``).

A value is read as a YAML scalar or flow collection (``3``, ``0.5``, ``true``, ``null``,
``[a, b]``, ``{k: v}``), and a plain word that Python reads as a number is that number
(YAML 1.1 reads ``1e-4`` as a string). Anything YAML cannot parse stays the text as written.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class SetError(ValueError):
    """A ``--set`` item that is not ``KEY=VALUE``."""


def parse_value(text: str):
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    import yaml
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def parse_set(item: str) -> tuple[str, object]:
    """``"key=value"`` -> ``(key, parsed value)``."""
    if "=" not in item:
        raise SetError(f"--set {item!r}: expected key=value (e.g. --set lr=1e-4 or --set beta=0.01)")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise SetError(f"--set {item!r}: the key before '=' is empty")
    return key, parse_value(raw)


def parse_sets(items) -> dict:
    """Every ``--set`` item, in order (a later one wins)."""
    return dict(parse_set(i) for i in items)
