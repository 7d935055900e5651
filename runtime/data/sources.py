"""Where a run's rows come from: ``data`` as a file, a glob, a folder or a hub data set name.

``open_parts(source, config, split, streaming)`` resolves ``source`` into an ordered list of
``Part``s, each a label for error messages (a file, or a folder and its split) and a function
that yields its rows (dicts) one at a time:

- a file: ``.jsonl`` (read line by line here, so errors name the line), ``.parquet`` (read
  in record batches with pyarrow, never whole), ``.json`` and ``.csv`` (through
  ``datasets``);
- a glob (``data/train-*.parquet``, ``data/*.jsonl``): its files in sorted order;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: the split
  ``split`` of a ``DatasetDict`` (memory-mapped Arrow, iterated lazily);
- a hub-style folder (``data/train-*.parquet``, ``train.jsonl``, ``data/test.csv``, ...):
  the files of split ``split``, found by the hub's own file-name rules
  (``datasets.data_files.get_data_patterns``);
- anything else that looks like ``name`` or ``owner/name``: a hub data set, through
  ``datasets.load_dataset(name, config, split=split)`` (``streaming=True`` when streaming),
  which reads the user's cache; offline (``HF_HUB_OFFLINE=1``) a data set that is not cached
  is a ``RunError`` saying so.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import RunError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Part:
    label: str                          # names the rows in errors: "<label>: row <i>"
    rows: Callable[[], Iterator[dict]]  # a fresh iterator over the part's rows


def open_parts(source, config: str | None = None, split: str = "train", streaming: bool = False) -> list[Part]:
    """The parts of ``source`` (see the module docstring), in order."""
    text = os.path.expanduser(str(source))
    p = Path(text)
    if p.is_file():
        return [_file_part(p)]
    if p.is_dir():
        return _folder_parts(p, split)
    if any(c in text for c in "*?["):
        files = sorted(f for f in globlib.glob(text, recursive=True) if Path(f).is_file())
        if not files:
            raise RunError(f"no data files match {text}")
        return [_file_part(Path(f)) for f in files]
    if _HUB_NAME.match(str(source)) and not p.suffix.lower() in SUFFIXES:
        return [_hub_part(str(source), config, split, streaming)]
    raise RunError(f"data file not found: {p}")


def _file_part(p: Path) -> Part:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return Part(str(p), lambda: _jsonl_rows(p))
    if suffix == ".parquet":
        return Part(str(p), lambda: _parquet_rows(p))
    if suffix in (".json", ".csv"):
        return Part(str(p), lambda: iter(_datasets_file(p)))
    raise RunError(f"unknown data format for {p} (suffix {p.suffix!r})",
                   hint="use .jsonl, .json, .parquet, .csv, a glob of them, a folder of them, a "
                        "Dataset.save_to_disk directory or a hub data set name")


def _jsonl_rows(path: Path) -> Iterator[dict]:
    """The rows of a JSON-lines file, read line by line (a huge line costs its own size, not
    an Arrow block's worth of buffers), with errors that name the line and the row."""
    row = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RunError(f"{path}: row {row} (line {n}): byte 0x{raw[e.start]:02x} at column "
                               f"{e.start + 1} is not UTF-8", hint="save the data file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                raise RunError(f"could not read {path}: row {row} (line {n}) is not valid JSON: {e}") from None
            except RecursionError:
                raise RunError(f"{path}: row {row} (line {n}) is nested too deep to read",
                               hint="a row is an object of fields: text, or lists of messages") from None
            if not isinstance(value, dict):
                raise RunError(f"{path}: row {row} (line {n}) is a JSON {type(value).__name__}, not an object "
                               "of fields", hint='each line holds one row, e.g. {"prompt": "..."}')
            if "\\u" in line:  # JSON escapes may spell a lone surrogate ("\\ud800"): no text to tokenize
                bad = _surrogate_field(value)
                if bad is not None:
                    raise RunError(f"{path}: row {row} (line {n}): field {bad!r} holds a lone surrogate (a "
                                   "\\ud800-\\udfff escape without its pair), not text",
                                   hint="write the character itself, or both halves of its pair") from None
            row += 1
            yield value


def _surrogate_field(row: dict) -> str | None:
    """The first field of ``row`` whose text (anywhere inside it) holds a lone surrogate."""
    for k, v in row.items():
        try:
            json.dumps({k: v}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return k
        except (ValueError, RecursionError):
            return None
    return None


def _parquet_rows(path: Path, batch_rows: int = 1024) -> Iterator[dict]:
    import pyarrow.parquet as pq
    try:
        f = pq.ParquetFile(str(path))
    except Exception as e:
        raise RunError(f"could not read {path} as parquet: {_root_cause(e)}") from e
    for batch in f.iter_batches(batch_size=batch_rows):
        yield from batch.to_pylist()


def _datasets_file(p: Path):
    import datasets
    builder = "json" if p.suffix.lower() == ".json" else "csv"
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as e:
        raise RunError(f"could not read {p} as {p.suffix[1:]}: {_root_cause(e)}") from e


def _root_cause(e: BaseException) -> str:
    """The innermost exception's message (``datasets`` wraps parser errors)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"


def _folder_parts(p: Path, split: str) -> list[Part]:
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        return [_saved_part(p, split)]
    from datasets.data_files import DataFilesDict, get_data_patterns
    try:
        patterns = get_data_patterns(str(p))
        files = DataFilesDict.from_patterns(patterns, base_path=str(p))
    except Exception as e:  # datasets.data_files.EmptyDatasetError: no data files
        raise RunError(f"{p} is a folder with no data files and no Dataset.save_to_disk data set "
                       f"({type(e).__name__})",
                       hint="a data folder holds e.g. train.jsonl or data/train-*.parquet "
                            "(the hub's layout), or is written by save_to_disk") from None
    if split not in files:
        raise RunError(f"{p} has no split {split!r}; its splits: {', '.join(sorted(files))}",
                       hint="set data_split to one of them")
    return [_file_part(Path(f)) for f in files[split]]


def _saved_part(p: Path, split: str) -> Part:
    import datasets
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise RunError(f"could not read data directory {p}: {type(e).__name__}: {e}",
                       hint="a data directory must be written by Dataset.save_to_disk") from e
    label = str(p)
    if isinstance(ds, datasets.DatasetDict):
        if split in ds:
            ds = ds[split]
        elif len(ds) == 1 and split == "train":
            ds = next(iter(ds.values()))
        else:
            raise RunError(f"{p} has no split {split!r}; its splits: {', '.join(sorted(ds))}",
                           hint="set data_split to one of them")
        label = f"{p} (split {split})"
    return Part(label, lambda: iter(ds))


def _hub_part(name: str, config: str | None, split: str, streaming: bool) -> Part:
    import datasets
    label = f"hub data set {name}" + (f" ({config})" if config else "") + f", split {split}"
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:
        why = _root_cause(e)
        hint = ("download it once online (datasets.load_dataset), or give a local file or folder"
                if offline else "check the name, config and split")
        cached = " (HF_HUB_OFFLINE=1 and it is not in the cache)" if offline else ""
        raise RunError(f"could not load {label}{cached}: {why[:400]} (and there is no file or folder "
                       f"{os.path.abspath(name)})", hint=hint) from None
    return Part(label, lambda: iter(ds))
