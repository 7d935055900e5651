"""Streamed data (runtime/data/stream.py): lazy reading, the seeded shuffle buffer, epochs and
the saved position."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data_fixtures import write_jsonl, write_parquet  # noqa: E402

from alignspec.runtime.data.records import load_records  # noqa: E402
from alignspec.runtime.data.stream import RecordStream  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402

SFT = ["prompt", "response"]
ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]


def _ids(recs):
    return [r["prompt"] for r in recs]


def test_file_order_epochs_and_position(tmp_path):
    write_parquet(tmp_path / "d" / "a.parquet", ROWS[:4])
    write_parquet(tmp_path / "d" / "b.parquet", ROWS[4:])
    s = RecordStream(str(tmp_path / "d" / "*.parquet"), None, SFT, buffer=0)
    assert _ids(s.take(4)) == [f"p{i}" for i in range(4)]
    assert _ids(s.take(8)) == [f"p{i}" for i in range(4, 10)] + ["p0", "p1"]     # the next epoch
    assert s.position() == {"epoch": 1, "offset": 2}


def test_shuffle_buffer_is_seeded_per_epoch_and_a_permutation(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = RecordStream(data, None, SFT, seed=1, buffer=4)
    e0, e1 = _ids(a.take(10)), _ids(a.take(10))
    assert sorted(e0) == sorted(e1) == sorted(_ids(load_records(data, None, SFT)))
    assert e0 != [f"p{i}" for i in range(10)] and e0 != e1                  # shuffled, differently per epoch
    assert _ids(RecordStream(data, None, SFT, seed=1, buffer=4).take(20)) == e0 + e1   # seeded
    assert _ids(RecordStream(data, None, SFT, seed=2, buffer=4).take(10)) != e0


def test_seek_continues_exactly(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    whole = RecordStream(data, None, SFT, seed=5, buffer=3)
    seq = _ids(whole.take(27))
    part = RecordStream(data, None, SFT, seed=5, buffer=3)
    part.take(13)
    pos = part.position()
    again = RecordStream(data, None, SFT, seed=5, buffer=3)
    again.seek(pos)
    assert _ids(again.take(14)) == seq[13:]
    with pytest.raises(RunError, match="past the end of .*the data changed since the checkpoint"):
        RecordStream(data, None, SFT, seed=5, buffer=3).seek({"epoch": 0, "offset": 11})


def test_streaming_reads_lazily(tmp_path):
    """A broken line far into the file: streaming trains on the rows before it; loading it
    whole fails at once (naming the file, row and line)."""
    path = tmp_path / "big.jsonl"
    write_jsonl(path, ROWS)
    with open(path, "a") as f:
        f.write("{not json\n")
    s = RecordStream(str(path), None, SFT, buffer=0)
    assert _ids(s.take(10)) == [f"p{i}" for i in range(10)]
    with pytest.raises(RunError, match=r"big\.jsonl: row 10 \(line 11\) is not valid JSON"):
        s.take(1)
    with pytest.raises(RunError, match=r"row 10 \(line 11\)"):
        load_records(path, None, SFT)


def test_stream_errors_name_file_and_row(tmp_path):
    data = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                              {"prompt": "a", "completion": "b", "label": "maybe"}])
    s = RecordStream(data, None, ["prompt", "completion", "label"], buffer=0)
    with pytest.raises(RunError, match=r"u\.jsonl: row 1's label is 'maybe'"):
        s.take(2)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(RunError, match="has no rows"):
        RecordStream(str(empty), None, SFT)
