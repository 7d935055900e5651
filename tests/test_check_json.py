"""`alignspec check --format json`: the problems as a JSON array on stdout, one record per problem,
with exactly the position, kind, message and hint of the text report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from alignspec.editor.diagnostics import FIELDS

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "tests" / "bad").glob("*.align"))
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "alignspec", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_json_matches_the_text_report_for_every_bad_spec():
    rels = [p.relative_to(ROOT) for p in BAD]
    text = cli("check", *rels)
    js = cli("check", "--format", "json", *rels)
    assert text.returncode == js.returncode == 2
    assert js.stderr == ""
    records = json.loads(js.stdout)
    firsts = [r for i, r in enumerate(records) if i == 0 or records[i - 1]["file"] != r["file"]]
    assert len(firsts) == len(BAD)
    heads = [l for l in text.stderr.splitlines() if l.startswith("tests/bad/")]
    hints = [l[len("hint: "):] for l in text.stderr.splitlines() if l.startswith("hint: ")]
    assert len(heads) == len(firsts)
    for rec, head in zip(firsts, heads):
        assert tuple(rec) == FIELDS
        assert rec["severity"] == "error"
        where = f"{rec['file']}:{rec['line']}:{rec['column']}: " if rec["line"] else f"{rec['file']}: "
        assert head == where + rec["message"].splitlines()[0], (head, rec)
        assert (rec["end_line"], rec["end_column"]) >= (rec["line"], rec["column"])
    assert [r["hint"] for r in firsts if r["hint"]] == hints
    for rec in records:
        assert tuple(rec) == FIELDS


TWO_PROBLEMS = """\
algorithm two
data pairs

params
  beta = 0.1

loss
  h = beta * sum_tokens(logp - lgp_ref)
  g = clip(h, 0)
  both = h + g
  minimize -mean(logsigmoid(h[chosen] - h[rejected]))
"""


def test_json_reports_each_independent_problem_and_text_the_first(tmp_path):
    path = tmp_path / "two.align"
    path.write_text(TWO_PROBLEMS)
    js = cli("check", "--format", "json", path)
    text = cli("check", path)
    assert js.returncode == text.returncode == 2
    records = json.loads(js.stdout)
    # `both` and the minimize line only repeat the problems of h and g: each is reported once
    assert [(r["line"], r["column"], r["kind"]) for r in records] == [(8, 32, "unknown-name"), (9, 7, "arity")]
    assert "did you mean 'logp_ref'?" == records[0]["hint"]
    assert text.stderr.splitlines()[0] == f"{path}:8:32: unknown name 'lgp_ref'"
    assert text.stderr.count("\nhint: ") == 1          # the text format still stops at the first


def test_json_for_good_specs_is_an_empty_array():
    r = cli("check", "--format", "json", "grpo", "algorithms/dpo.align")
    assert r.returncode == 0 and r.stderr == ""
    assert json.loads(r.stdout) == []


def test_json_caret_range():
    r = cli("check", "--format", "json", "tests/bad/unknown_name_quantity.align", "grpo")
    assert r.returncode == 2
    assert json.loads(r.stdout) == [{
        "file": "tests/bad/unknown_name_quantity.align", "line": 7, "column": 30, "end_line": 7, "end_column": 33,
        "severity": "error", "kind": "unknown-name", "message": "unknown name 'lgp'",
        "hint": "did you mean 'logp'?"}]


def test_unknown_format_is_refused():
    r = cli("check", "--format", "xml", "grpo")
    assert r.returncode == 2 and "--format must be text or json" in r.stderr
