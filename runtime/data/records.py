"""Reading a run's data into records: the one entry point for "a data source -> rows".

``load_records(source, fields, required, config=..., split=...)`` reads every row of
``source`` (a file, a glob, a folder, a saved data set or a hub data set name:
runtime/data/sources.py), turns each row of any TRL format into our record for the data kind
that ``required`` names (runtime/data/formats.py) and checks it, raising ``RunError``
messages that name the file and the (0-based) row. ``open_records(cfg, kind)`` (stream.py) is what a run
uses: the list of ``load_records``, or with ``streaming: true`` a ``RecordStream``
(runtime/data/stream.py) that reads the rows as training goes.
"""

from __future__ import annotations

import os
from typing import Iterator

from ..errors import RunError
from .formats import REQUIRED, kind_of, to_record
from .sources import open_parts


def raw_rows(parts) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` of every row of ``parts`` in order, ``where`` naming its file and row."""
    for part in parts:
        for i, row in enumerate(part.rows()):
            yield f"{part.label}: row {i}", row


def to_checked_record(row: dict, where: str, fields: dict, required) -> dict:
    """Our record of one row (formats.py), with every name in ``required`` present."""
    kind = kind_of(required)
    rec = to_record(dict(row), kind, fields, where)
    for name in required:  # other fields a caller needs (e.g. a reward's answer)
        if name in REQUIRED[kind]:
            continue
        src = fields.get(name, name)
        if row.get(src) is None:
            present = sorted(k for k, v in row.items() if v is not None)
            via = f" (our '{name}')" if src != name else ""
            raise RunError(f"{where} has no field '{src}'{via} (missing or null); the row has fields: "
                           f"{', '.join(present) or '(none)'}",
                           hint=f"map a field with fields={{'{name}': '<their field>'}}")
    if kind == "unpaired":
        check_label(rec, where)
    return rec


def iter_records(source, fields: dict[str, str] | None = None, required=("prompt",), *,
                 config: str | None = None, split: str = "train", streaming: bool = False,
                 parts=None) -> Iterator[dict]:
    """Our records of ``source``, one at a time (see ``load_records``)."""
    fields = dict(fields or {})
    for where, row in raw_rows(parts if parts is not None else open_parts(source, config, split, streaming)):
        yield to_checked_record(row, where, fields, required)


def load_records(source: str | os.PathLike, fields: dict[str, str] | None = None,
                 required=("prompt",), *, config: str | None = None, split: str = "train",
                 kind: str | None = None) -> list[dict]:
    """Every record of ``source``, as a list.

    ``fields`` maps our names to the user's (``{"prompt": "question"}``: our ``prompt`` is
    their ``question``); unmapped names are taken as they are, and the row's other fields are
    kept. ``required`` names the fields every record must have: the data kind's (prompts:
    ``prompt``; demonstrations: ``prompt``, ``response``; pairs: ``prompt``, ``chosen``,
    ``rejected``; unpaired: ``prompt``, ``completion``, ``label``) chooses how TRL's formats
    are read (prompt-completion, ``messages``, implicit prompts: formats.py), and any other
    name must be present and not None. ``config`` and ``split`` choose a hub data set's
    configuration and a folder's or data set's split. ``kind`` (prompts, demonstrations,
    pairs, unpaired) may be given instead of ``required``: its fields are required.
    """
    if kind is not None:
        required = REQUIRED[kind]
    parts = open_parts(source, config, split)
    records = list(iter_records(source, fields, required, parts=parts))
    if not records:
        where = parts[0].label if len(parts) == 1 else str(source)
        raise RunError(f"{where} has no rows", hint="a data file holds one row per line (jsonl) or per record")
    return records


def check_label(rec: dict, where) -> None:
    """``data unpaired``: a row's ``label`` is a bool (or 0/1): desirable or not."""
    v = rec["label"]
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        rec["label"] = bool(v)
        return
    raise RunError(f"{where}'s label is {v!r}; unpaired data needs true/false (desirable or not)")


def check_labels(records: list[dict], path) -> None:
    """``data unpaired``: every row's ``label`` is a bool (or 0/1), and both kinds occur."""
    for i, rec in enumerate(records):
        check_label(rec, f"{path}: row {i}")  # (iter_records checked them already; kept for other callers)
    if len({r["label"] for r in records}) < 2:
        raise RunError(f"{path}: every row has label {records[0]['label']}; unpaired data needs desirable "
                       "and undesirable completions")
