"""Loading user data sets (jsonl, json, parquet, csv, or a ``save_to_disk`` directory).

``load_records`` reads through the ``datasets`` library, renames the user's fields to ours
and checks that every row has the required fields, raising ``RunError`` messages that name
the file and the (0-based) row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import RunError
from .prompts import check_messages, is_conversation

COMPLETIONS = ("response", "chosen", "rejected", "completion")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _read(path: Path, split: str | None = None):
    """The rows of ``path`` as a ``datasets.Dataset`` (``split``: that split of a saved DatasetDict)."""
    import datasets

    if split is not None:  # eval_data naming a split of the training data (loop/evaluation.py)
        try:
            ds = datasets.load_from_disk(str(path)) if path.is_dir() else None
        except Exception:  # not a saved data set: no splits
            ds = None
        if not isinstance(ds, datasets.DatasetDict) or split not in ds:
            have = f"its splits are {sorted(ds)}" if isinstance(ds, datasets.DatasetDict) else "it has no splits"
            raise RunError(f"{path} has no split {split!r}: {have}",
                           hint="give eval_data as a split of the data set, a file, or a hub data set name")
        return ds[split]
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise RunError(f"could not read data directory {path}: {type(e).__name__}: {e}",
                           hint="a data directory must be written by Dataset.save_to_disk") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise RunError(f"{path} holds several splits {sorted(ds)} and none is 'train'",
                               hint="save a single split, or one named 'train'")
        return ds
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise RunError(f"unknown data format for {path} (suffix {path.suffix!r})",
                       hint="use .jsonl, .json, .parquet, .csv or a Dataset.save_to_disk directory")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        where = _bad_json_line(path) if builder == "json" else None
        raise RunError(f"could not read {path} as {path.suffix[1:]}: "
                       f"{where or _root_cause(e)}") from e


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, read line by line (a huge line costs its own size, not
    an Arrow block's worth of buffers), with errors that name the line and the row."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RunError(f"{path}: row {len(rows)} (line {n}): byte 0x{raw[e.start]:02x} at column "
                               f"{e.start + 1} is not UTF-8", hint="save the data file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise RunError(f"could not read {path}: row {len(rows)} (line {n}) is not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise RunError(f"{path}: row {len(rows)} (line {n}) is a JSON {type(row).__name__}, not an object "
                               "of fields", hint='each line holds one row, e.g. {"prompt": "..."}')
            rows.append(row)
    return rows


def _root_cause(e: BaseException) -> str:
    """The innermost exception's message (``datasets`` wraps parser errors)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"


def _bad_json_line(path: Path) -> str | None:
    """For a .jsonl file: 'row i (line n): <json error>' for the first unparsable line."""
    if path.suffix.lower() != ".jsonl":
        return None
    row = 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"row {row} (line {n}) is not valid JSON: {e}"
                row += 1
    except (OSError, UnicodeDecodeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _is_empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict)):
        return len(value) == 0
    return False


def _completion_text(value, where: str) -> str:
    """A conversational completion (TRL's format: one assistant message) as its text."""
    msgs = check_messages(value, where)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in msgs)
        raise RunError(f"{where} is a list of {len(msgs)} message(s) ({roles}); a completion is text or "
                       "one assistant message", hint="put the conversation so far in the prompt")
    return msgs[0]["content"]


def load_records(path: str | os.PathLike, fields: dict[str, str] | None = None,
                 required: list[str] = ("prompt",), split: str | None = None) -> list[dict]:
    """Read ``path`` and return one dict per row with our field names.

    ``fields`` maps our names to the user's (``{"prompt": "question"}``: our ``prompt`` is
    their ``question``); unmapped names are taken as they are, and the row's other fields are
    kept. Every name in ``required`` must be present and not None in every row, and a
    required ``prompt`` must not be empty. A prompt may be a string or a list of
    ``{"role", "content"}`` messages (TRL's conversational format; runtime/data/prompts.py); a
    completion (``response``, ``chosen``, ``rejected``) a string or a list of one assistant
    message, which becomes its text.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise RunError(f"data file not found: {p}")
    fields = dict(fields or {})
    ds = _read(p, split)
    if split is not None:
        p = Path(f"{p}[{split}]")  # named in the row errors below
    if len(ds) == 0:
        raise RunError(f"{p} has no rows", hint="a data file holds one row per line (jsonl) or per record")
    records = []
    for i, row in enumerate(ds):
        rec = dict(row)
        for ours, theirs in fields.items():
            if theirs in row:
                rec[ours] = row[theirs]
        for name in required:
            src = fields.get(name, name)
            via = f" (our '{name}')" if src != name else ""
            if row.get(src) is None:  # columnar formats fill a missing key with null
                present = sorted(k for k, v in row.items() if v is not None)
                raise RunError(
                    f"{p}: row {i} has no field '{src}'{via} (missing or null); the row has fields: "
                    f"{', '.join(present) or '(none)'}",
                    hint=f"map a field with fields={{'{name}': '<their field>'}}")
        for name in ("prompt", *COMPLETIONS):
            if name not in required:
                continue
            value = rec[name]
            if not isinstance(value, (str, list, tuple)):
                raise RunError(f"{p}: row {i}'s {name} is a {type(value).__name__} ({str(value)[:40]!r}), not text",
                               hint=f"{name} must be a string, or a list of {{'role', 'content'}} messages")
        if "prompt" in required and _is_empty(rec["prompt"]):
            raise RunError(f"{p}: row {i} has an empty prompt")
        if is_conversation(rec.get("prompt")):
            rec["prompt"] = check_messages(rec["prompt"], f"{p}: row {i}'s prompt")
        for name in COMPLETIONS:
            if name in required and is_conversation(rec[name]):
                rec[name] = _completion_text(rec[name], f"{p}: row {i}'s {name}")
        records.append(rec)
    return records


def check_labels(records: list[dict], path) -> None:
    """``data unpaired``: every row's ``label`` is a bool (or 0/1): desirable or not."""
    for i, rec in enumerate(records):
        v = rec["label"]
        if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
            rec["label"] = bool(v)
            continue
        raise RunError(f"{path}: row {i}'s label is {v!r}; unpaired data needs true/false (desirable or not)")
    if len({r["label"] for r in records}) < 2:
        raise RunError(f"{path}: every row has label {records[0]['label']}; unpaired data needs desirable "
                       "and undesirable completions")
