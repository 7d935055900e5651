"""Hostile but realistic inputs to the language tools (issue 14): files that are not files,
names that shadow built-ins, exponential and deep defs, parsing from several threads, and a
`fmt --write` that fails half-way."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
from typer.testing import CliRunner

import alignspec
from alignspec.cli import app
from alignspec.dsl.fmt import format_text

runner = CliRunner()


def _check(*args):
    return runner.invoke(app, ["check", *args])


def test_a_bare_name_is_the_builtin_even_when_the_folder_has_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grpo").mkdir()                      # e.g. `alignspec run grpo --out grpo` made it
    (tmp_path / "common").write_text("garbage that is no spec\n")
    assert alignspec.load("grpo").name == "grpo"     # imports the built-in common, not ./common
    res = _check("grpo")
    assert res.exit_code == 0, res.output
    res = _check("./grpo")
    assert res.exit_code == 2 and "is a directory" in res.output
    res = _check("./common")
    assert res.exit_code == 2 and "common" in res.output


def test_a_spec_beside_the_file_imports_its_sibling_library(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mylib.align").write_text("library mylib\ndef twice(x) = 2 * x\n")
    (tmp_path / "a.align").write_text("algorithm a\nimport mylib\ndata demonstrations\n"
                                      "loss\n  minimize -token_mean_all(twice(logp))\n")
    assert "2 * logp" in alignspec.compile("a.align").source


def test_devices_fifos_and_huge_files_are_refused_unread(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(alignspec.SpecError, match="not a regular file"):
        alignspec.load("/dev/zero")
    fifo = tmp_path / "pipe.align"
    os.mkfifo(fifo)
    with pytest.raises(alignspec.SpecError, match="not a regular file"):
        alignspec.load(str(fifo))                   # opening it would wait for a writer forever
    big = tmp_path / "big.align"
    big.write_bytes(b"# x\n" * (2 << 20))
    with pytest.raises(alignspec.SpecError, match="larger than"):
        alignspec.load(str(big))
    assert time.monotonic() - t0 < 5
    res = _check("/dev/zero")
    assert res.exit_code == 2 and "not a regular file" in res.output


def _defs(n: int, body) -> str:
    lines = ["algorithm x", "data demonstrations", "def f0(x) = x * 2"]
    lines += [f"def f{i}(x) = {body(i)}" for i in range(1, n + 1)]
    return "\n".join(lines + ["loss", f"  minimize -token_mean_all(f{n}(logp))"]) + "\n"


def test_defs_calling_the_previous_twice_compile_in_linear_time():
    t0 = time.process_time()
    algo = alignspec.compile(_defs(22, lambda i: f"f{i - 1}(x) + f{i - 1}(x)"))
    assert time.process_time() - t0 < 3
    assert len(algo.source) < 20_000


def test_a_chain_of_250_defs_is_a_clear_error():
    with pytest.raises(alignspec.SpecError) as info:
        alignspec.compile(_defs(250, lambda i: f"f{i - 1}(x) + 1"))
    assert info.value.kind == "too-deep" and "deep" in info.value.message


SPECS = [f"algorithm t{i}\n# comment {i} a\ndata demonstrations  # trailing {i}\n\nloss\n"
         f"  # before {i}\n  minimize -token_mean_all(logp * {i})  # term {i}\n" for i in range(8)]


def test_parsing_is_reentrant_across_threads():
    expected = [format_text(s) for s in SPECS]
    wrong = []

    def work(k):
        for j in range(60):
            i = (k + j) % len(SPECS)
            if format_text(SPECS[i]) != expected[i]:
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_fmt_write_on_a_full_disk_leaves_the_spec_whole(tmp_path, monkeypatch):
    spec = tmp_path / "s.align"
    original = "algorithm s\ndata   demonstrations\nloss\n  minimize   -token_mean_all(logp)\n"
    spec.write_text(original)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    res = runner.invoke(app, ["fmt", "--write", str(spec)])
    assert res.exit_code == 2 and "No space left" in res.output and "unchanged" in res.output
    assert spec.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.align"]
    monkeypatch.undo()
    res = runner.invoke(app, ["fmt", "--write", str(spec)])
    assert res.exit_code == 0 and spec.read_text() != original
    assert alignspec.load(str(spec)).name == "s"


def _many_params_spec(n_bytes: int) -> str:
    """A well-formed spec of about ``n_bytes``: grpo with many documented params."""
    lines = ["algorithm big extends grpo", "params"]
    size = sum(len(l) + 1 for l in lines)
    while size < n_bytes:
        lines.append(f'  p{len(lines)} = {len(lines)}.5  "param number {len(lines)} of a spec far larger than any real one"')
        size += len(lines[-1]) + 1
    return "\n".join(lines) + "\n"


def test_a_multi_megabyte_spec_is_refused_at_once_and_one_at_the_cap_checks(tmp_path):
    """A 3.75 MiB spec (a data file saved as .align, say) cost `check` 40 s and ~1 GB under
    the old 4 MiB cap; the cap is now 256 KiB, refused unread, as file or as text."""
    big = tmp_path / "big.align"
    big.write_text(_many_params_spec(int(3.75 * 2**20)))
    t0 = time.monotonic()
    res = _check(str(big))
    assert res.exit_code == 2 and "larger than 256 KiB" in res.output and "big.align" in res.output
    with pytest.raises(alignspec.SpecError, match="larger than 256 KiB"):
        alignspec.load(big.read_text())
    assert time.monotonic() - t0 < 2
    ok = tmp_path / "ok.align"
    ok.write_text(_many_params_spec(200 << 10))
    assert _check(str(ok)).exit_code == 0
