"""The one place where user code is imported: ``module:attribute`` strings that the run
configuration names (``rewards``, ``tools``, ``env``). Nothing in a spec or a data file can
name code; a name reaches ``importlib`` only from the configuration the user wrote."""

from __future__ import annotations

import importlib

from .errors import RunError


def import_named(name: str, what: str, kind: str = "function", example: str = "my_module:name"):
    """The attribute ``module:attr`` named by ``name``, for the ``what`` setting (``reward``,
    ``tool``, ``env``); a RunError that names the setting when it is malformed, the module does
    not import, or the attribute is missing or not callable."""
    mod_name, sep, attr = name.partition(":")
    if not sep or not mod_name or not attr:
        raise RunError(f"{what} {name!r}: expected module:{kind}", hint=f"e.g. {example}")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise RunError(f"{what} {name!r}: could not import module {mod_name!r}: {e}") from e
    obj = getattr(mod, attr, None)
    if obj is None or not callable(obj):
        raise RunError(f"{what} {name!r}: module {mod_name!r} has no {kind} {attr!r}")
    return obj
