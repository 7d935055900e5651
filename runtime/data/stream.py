"""Streamed data: rows read as training goes, never all in memory (``streaming: true``).

``open_records(cfg, kind)`` is how a run opens its data: ``load_records``'s list, or a ``RecordStream``.

A ``RecordStream`` reads its source's parts in order (runtime/data/sources.py: jsonl line by
line, parquet in record batches, a saved data set memory-mapped, a hub data set with
``datasets``' streaming), turns each row into a record as it comes (formats.py) and passes it
through a shuffle buffer: ``shuffle_buffer`` rows are held, and each next row takes the place
of one drawn at random (seeded by the run's seed and the epoch), as
``datasets.IterableDataset.shuffle(buffer_size=...)`` does. ``shuffle_buffer: 0`` keeps the
file order. The shuffle is only as wide as the buffer: rows far apart in the files stay far
apart in training.

When the source runs out, the next epoch starts over with its own shuffle. The position
``{"epoch", "offset"}`` (rows taken in this epoch) is saved in the checkpoint's state; on
``--resume`` the stream reopens that epoch and reads past ``offset`` rows (reading them, not
turning them into records or tokens: the shuffle buffer holds raw rows), so a resumed run trains on exactly the rows it would have, shuffle
included.
"""

from __future__ import annotations

import random
from typing import Iterator

from ..errors import RunError
from ..seeds import mix as _mix
from .formats import REQUIRED
from .records import check_labels, load_records, raw_rows, to_checked_record
from .sources import open_parts


class RecordStream:
    """The records of ``source``, taken ``n`` at a time over epochs (see the module docstring)."""

    def __init__(self, source, fields, required, *, config=None, split="train", seed=0, buffer=1000):
        self.source, self.fields, self.required = source, dict(fields or {}), list(required)
        self.config, self.split, self.seed, self.buffer = config, split, int(seed), int(buffer)
        self.parts = open_parts(source, config, split, streaming=True)
        self.epoch, self.offset = 0, 0
        self._it = None
        if not self.head(1):
            raise RunError(f"{source} has no rows", hint="a data file holds one row per line (jsonl) or per record")

    def _record(self, item: tuple[str, dict]) -> dict:
        where, row = item
        return to_checked_record(row, where, self.fields, self.required)

    def _epoch_iter(self, epoch: int) -> Iterator[tuple[str, dict]]:
        """The epoch's raw rows ``(where, row)``, through the seeded shuffle buffer."""
        if self.buffer <= 1:
            yield from raw_rows(self.parts)
            return
        g = random.Random(_mix(self.seed, epoch, 11))
        buf: list = []
        for item in raw_rows(self.parts):
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            j = g.randrange(len(buf))
            out, buf[j] = buf[j], item
            yield out
        g.shuffle(buf)
        yield from buf

    def head(self, n: int) -> list[dict]:
        """The first ``n`` records in file order (the stream's position is unchanged)."""
        out = []
        for item in raw_rows(self.parts):
            out.append(self._record(item))
            if len(out) >= n:
                break
        return out

    def take(self, n: int) -> list[dict]:
        """The next ``n`` records, starting a new epoch when the data runs out."""
        out = []
        while len(out) < n:
            if self._it is None:
                self._it = self._epoch_iter(self.epoch)
            item = next(self._it, None)
            if item is None:
                if self.offset == 0:
                    raise RunError(f"{self.source} has no rows")
                self.epoch, self.offset, self._it = self.epoch + 1, 0, None
                continue
            out.append(self._record(item))
            self.offset += 1
        return out

    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def seek(self, position: dict) -> None:
        """Continue after ``offset`` rows of epoch ``epoch`` (a checkpoint's position)."""
        self.epoch, self.offset, self._it = int(position["epoch"]), 0, None
        want = int(position["offset"])
        if want:
            self._it = self._epoch_iter(self.epoch)
            for _ in range(want):
                if next(self._it, None) is None:
                    raise RunError(f"the checkpoint's data position (epoch {self.epoch}, row {want}) is past the "
                                   f"end of {self.source}: the data changed since the checkpoint")
            self.offset = want


def open_records(cfg, kind: str):
    """The run's records: ``load_records``'s list, or a ``RecordStream`` with ``streaming: true``."""
    split = getattr(cfg, "data_split", "train")
    config = getattr(cfg, "data_config", None)
    if getattr(cfg, "streaming", False):
        return RecordStream(cfg.data, cfg.fields, REQUIRED[kind], config=config, split=split, seed=cfg.seed,
                            buffer=cfg.shuffle_buffer)
    recs = load_records(cfg.data, cfg.fields, REQUIRED[kind], config=config, split=split)
    if kind == "unpaired":
        check_labels(recs, cfg.data)
    return recs
