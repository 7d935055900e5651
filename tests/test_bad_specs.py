"""Malformed specs: every problem is a SpecError with the right kind, at the right place.

The corpus in tests/bad/ holds one malformed spec per file. Each file says what it expects in
its leading comments:

    # <what is wrong>
    # expect: KIND LINE:COL          (required: the error kind and where it points)
    # message: TEXT                  (optional: a substring of the message)
    # hint: TEXT                     (optional: a substring of the hint)
    # xfail: REASON                  (optional: a known bug; the test is xfail(strict=True))

Beyond the corpus: `extends` cycles (written to a temp dir), parameter overrides, robustness
(empty, binary, non-UTF-8, absurd nesting and line lengths, directories, missing files,
CRLF and CR-only line ends), the same inputs through `alignspec check`, and a hypothesis fuzz
test: any text is either a spec or a SpecError, never another exception.
"""

from __future__ import annotations

import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignspec
from alignspec import SpecError

ROOT = Path(__file__).resolve().parents[1]
BAD = Path(__file__).resolve().parent / "bad"
CORPUS = sorted(BAD.glob("*.align"))
BUILTIN_TEXTS = [p.read_text() for p in sorted((ROOT / "algorithms").glob("*.align"))]

_HEADER = re.compile(r"#\s*(expect|message|hint|xfail):\s*(.*?)\s*$")


def expectations(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = _HEADER.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    kind, pos = out["expect"].split()
    line, col = pos.split(":")
    out["kind"], out["line"], out["col"] = kind, int(line), int(col)
    return out


def _corpus_params():
    params = []
    for p in CORPUS:
        exp = expectations(p)
        marks = [pytest.mark.xfail(strict=True, reason=exp["xfail"])] if "xfail" in exp else []
        params.append(pytest.param(p, exp, id=p.stem, marks=marks))
    return params


def cli(*args, cwd=None, timeout=60):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "alignspec", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ================================================================ the corpus
def test_corpus_size_and_headers():
    assert len(CORPUS) >= 45, f"only {len(CORPUS)} malformed specs in {BAD}"
    kinds = {expectations(p)["kind"] for p in CORPUS}
    for needed in ("syntax", "unknown-name", "unknown-function", "arity", "duplicate", "reserved", "level",
                   "phase", "section", "missing-minimize", "cycle", "unknown-spec", "type", "linearity"):
        assert needed in kinds, f"no corpus file expects kind {needed!r}"


@pytest.mark.parametrize("path, exp", _corpus_params())
def test_corpus(path: Path, exp: dict):
    with pytest.raises(SpecError) as info:
        alignspec.load(str(path))
    e = info.value
    report = e.format()
    assert (e.kind, e.line, e.col) == (exp["kind"], exp["line"], exp["col"]), report
    assert Path(e.file).name == path.name, report
    if "message" in exp:
        assert exp["message"] in e.message, report
    if "hint" in exp:
        assert e.hint and exp["hint"] in e.hint, report
    # The report: `file:line:col: message`, the offending line, a caret under the column.
    head, *rest = report.splitlines()
    assert head.startswith(f"{e.file}:{exp['line']}:{exp['col']}: "), report
    src_line = path.read_text().splitlines()[exp["line"] - 1]
    assert e.source_line is not None and e.source_line.rstrip("\r\n") == src_line, report
    assert rest and rest[0] == "    " + src_line, report
    caret = rest[1]
    assert caret.strip() and set(caret.strip()) == {"^"}, report
    assert caret.index("^") == 4 + exp["col"] - 1, report


def test_corpus_through_cli():
    """`alignspec check` on every (non-xfail) corpus file: exit 2, one located report per file."""
    files = [p for p in CORPUS if "xfail" not in expectations(p)]
    r = cli("check", *[str(p.relative_to(ROOT)) for p in files])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    for p in files:
        exp = expectations(p)
        assert f"{p.relative_to(ROOT)}:{exp['line']}:{exp['col']}: " in r.stderr, p.name
    assert r.stdout == ""


# ================================================================ extends cycles (temp files)
def _write(dirpath: Path, name: str, text: str) -> Path:
    p = dirpath / name
    p.write_text(text)
    return p


LOSS = "loss\n  minimize -mean(mean_tokens(logp))\n"


def test_extends_cycle_of_two(tmp_path):
    a = _write(tmp_path, "a.align", "# a\nalgorithm a extends b\n" + LOSS)
    _write(tmp_path, "b.align", "algorithm b extends a\n")
    with pytest.raises(SpecError) as info:
        alignspec.load(str(a))
    e = info.value
    assert e.kind == "cycle", e.format()
    assert (Path(e.file).name, e.line, e.col) == ("a.align", 2, 1), e.format()
    assert "cycle" in e.message and "a" in e.message and "b" in e.message
    r = cli("check", str(a))
    assert r.returncode == 2 and f"{a.name}:2:1: " in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_extends_itself(tmp_path):
    c = _write(tmp_path, "c.align", "algorithm c extends c\n" + LOSS)
    with pytest.raises(SpecError) as info:
        alignspec.load(str(c))
    assert info.value.kind == "cycle" and (info.value.line, info.value.col) == (1, 1)


def test_extends_cycle_message_order(tmp_path):
    a = _write(tmp_path, "a.align", "algorithm a extends b\n" + LOSS)
    _write(tmp_path, "b.align", "algorithm b extends a\n")
    with pytest.raises(SpecError) as info:
        alignspec.load(str(a))
    assert "a → b → a" in info.value.message, info.value.message


def test_extends_cycle_of_three(tmp_path):
    d = _write(tmp_path, "d.align", "algorithm d extends e\n" + LOSS)
    _write(tmp_path, "e.align", "algorithm e extends f\n")
    _write(tmp_path, "f.align", "algorithm f extends d\n")
    with pytest.raises(SpecError) as info:
        alignspec.load(str(d))
    assert info.value.kind == "cycle" and Path(info.value.file).name == "d.align"


def test_extends_builtin_of_same_name(tmp_path):
    p = _write(tmp_path, "my_grpo.align", "algorithm grpo extends grpo\nparams\n  beta = 0.0\n")
    spec = alignspec.load(str(p))
    assert spec.params["beta"].value == 0.0


def test_extends_relative_file_ok(tmp_path):
    """Control: a valid chain through a relative file resolves (so the cycle tests test cycles)."""
    _write(tmp_path, "base.align", "algorithm base\n" + LOSS)
    child = _write(tmp_path, "child.align", "algorithm child extends base\nparams\n  beta = 0.1\n")
    assert alignspec.load(str(child)).name == "child"


# ================================================================ parameter overrides
def test_override_unknown_param():
    with pytest.raises(SpecError) as info:
        alignspec.load("grpo", bogus=1)
    e = info.value
    assert e.kind == "unknown-param", e.format()
    for valid in ("beta", "eps", "n"):
        assert valid in e.message
    assert "bogus" in e.message


def test_override_unknown_param_did_you_mean():
    with pytest.raises(SpecError) as info:
        alignspec.load("grpo", bta=0.1)
    assert info.value.kind == "unknown-param" and "did you mean 'beta'" in (info.value.hint or "")


@pytest.mark.parametrize("overrides, needle", [
    ({"beta": "high"}, "'beta' is a float, got the string 'high'"),
    ({"n": 2.5}, "'n' is an int, got 2.5"),
    ({"beta": True}, "'beta' is a number"),
    ({"n": [8]}, "'n' is a number"),
])
def test_override_wrong_type(overrides, needle):
    with pytest.raises(SpecError) as info:
        alignspec.load("grpo", **overrides)
    e = info.value
    assert e.kind == "type", e.format()
    assert needle in e.message, e.message
    assert Path(e.file).name == "grpo.align" and e.line > 0  # points at the param's declaration


def test_override_numeric_string_is_coerced():
    assert alignspec.load("grpo", n="4").params["n"].value == 4
    assert alignspec.load("grpo", beta="0").params["beta"].value == 0.0


# ================================================================ robustness
def _nested_over_lines(depth: int, per_line: int = 100) -> str:
    opens = "\n".join("(" * per_line for _ in range(depth // per_line))
    closes = "\n".join(")" * per_line for _ in range(depth // per_line))
    return f"algorithm x\nloss\n  minimize (\n{opens}\nlogp\n{closes}\n)\n"


ROBUST = {
    # name: (bytes, kind or None for "parses fine", (line, col) or None)
    "empty": (b"", "empty", (1, 1)),
    "whitespace_and_comments": (b"\n   \n# only a comment\n\t\n  # another\n\n", "empty", (1, 1)),
    "binary": (bytes(random.Random(0).randrange(256) for _ in range(300)) + b"\x00\x00" +
               bytes(random.Random(1).randrange(256) for _ in range(300)), "encoding", None),
    "nul_in_utf8_text": (b"algorithm x\nlo\x00ss\n", "encoding", (2, 3)),
    "latin1": ("algorithm café\nloss\n  minimize -mean(mean_tokens(logp))\n".encode("latin-1"),
               "encoding", (1, 14)),
    "parens_10000_one_line": (("algorithm x\nloss\n  minimize " + "(" * 10_000 + "logp" + ")" * 10_000
                               + "\n").encode(), "too-long", (3, 10_000)),
    "parens_10000_over_lines": (_nested_over_lines(10_000).encode(), "too-deep", (4, 100)),
    "unary_minus_5000": (("algorithm x\nloss\n  minimize " + "-" * 5000 + "token_mean_all(logp)\n").encode(),
                         "too-deep", (3, 268)),
    "line_of_200kb": (("algorithm x\nloss\n  minimize token_mean_all(logp)" + " + 1" * 50_000 + "\n").encode(),
                    "too-long", (3, 10_000)),
    "power_chain": (("algorithm x\nloss\n  minimize token_mean_all(logp" + " ** 1" * 1000 + ")\n").encode(),
                    "too-deep", None),
    "not_chain": (("algorithm x\nfilter\n  keep groups where " + "not " * 2000 + "true\n" + LOSS).encode(),
                  "too-deep", None),
    "crlf": (b"# a CRLF file\r\nalgorithm x\r\nimport common\r\n\r\nparams\r\n  beta = 0.1  \"doc\"\r\n\r\n"
             b"loss\r\n  kl = k3(logp, logp_ref)\r\n  minimize -mean(mean_tokens(logp - beta * kl))\r\n", None, None),
    "crlf_with_error": (b"algorithm x\r\nloss\r\n  minimize -mean(mean_tokens(lgp))\r\n", "unknown-name", (3, 30)),
    "cr_only": (b"# an old Mac file\ralgorithm x\rimport common\r\rparams\r  beta = 0.1  \"doc\"\r\r"
                b"loss\r  kl = k3(logp, logp_ref)\r  minimize -mean(mean_tokens(logp - beta * kl))\r", None, None),
    "cr_only_with_error": (b"algorithm x\rloss\r  minimize -mean(mean_tokens(lgp))\r", "unknown-name", (3, 30)),
    "cr_only_latin1": ("algorithm x\rloss\r  r = caf\u00e9\r".encode("latin-1"), "encoding", (3, 10)),
    "crlf_latin1": ("algorithm x\r\nloss\r\n  r = caf\u00e9\r\n".encode("latin-1"), "encoding", (3, 10)),
    "utf8_then_latin1": ("algorithm x\nloss\n  r = \u00e9\u00e9 + caf".encode() + b"\xe9\n", "encoding", (3, 15)),
    "utf8_bom": (b"\xef\xbb\xbfalgorithm x\nloss\n  minimize -mean(mean_tokens(logp))\n", None, None),
}


def _robust_file(tmp_path: Path, name: str) -> Path:
    data, _, _ = ROBUST[name]
    p = tmp_path / f"{name}.align"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_inputs(tmp_path, name):
    _, kind, pos = ROBUST[name]
    p = _robust_file(tmp_path, name)
    if kind is None:
        spec = alignspec.load(str(p))
        assert spec.name == "x"
        return
    with pytest.raises(SpecError) as info:
        alignspec.load(str(p))
    e = info.value
    assert e.kind == kind, e.format()
    if pos is not None:
        assert (e.line, e.col) == pos, e.format()
    report = e.format()
    assert report.startswith(f"{e.file}:{e.line}:{e.col}: ")
    assert all(len(l) < 400 for l in report.splitlines()), "the report of a long line must stay readable"
    assert "\r" not in report


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_inputs_cli(tmp_path, name):
    _, kind, pos = ROBUST[name]
    p = _robust_file(tmp_path, name)
    r = cli("check", str(p), timeout=60)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-2000:]
    if kind is None:
        assert r.returncode == 0 and f"{p}: ok" in r.stdout, r.stdout + r.stderr
        return
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(rf"^{re.escape(str(p))}:\d+:\d+: ", r.stderr, re.M), r.stderr[-2000:]
    if pos is not None:
        assert f"{p}:{pos[0]}:{pos[1]}: " in r.stderr


def test_directory_as_spec(tmp_path):
    d = tmp_path / "adir.align"
    d.mkdir()
    with pytest.raises(SpecError) as info:
        alignspec.load(str(d))
    assert info.value.kind == "io" and "directory" in info.value.message
    r = cli("check", str(d))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # No line to point at: the report is `file: message` (line 0 is not printed).
    assert r.stderr.startswith(f"{d}: ") and "is a directory" in r.stderr, r.stderr


def test_missing_file(tmp_path):
    m = tmp_path / "nope.align"
    with pytest.raises(SpecError) as info:
        alignspec.load(str(m))
    assert info.value.kind == "unknown-spec"
    r = cli("check", str(m))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{m}: ") and "no spec file or built-in named" in r.stderr, r.stderr


def test_unknown_builtin_name_suggests():
    with pytest.raises(SpecError) as info:
        alignspec.load("grpx")
    assert info.value.kind == "unknown-spec" and "did you mean 'grpo'" in (info.value.hint or "")


# ---------------------------------------------------------------- known crashes (bugs)
CRASHES = {
    "int_literal_5000_digits": (
        "algorithm x\nparams\n  a: int = " + "9" * 5000 + "\n" + LOSS,
        "parser: int(text) raises ValueError (Python's 4300-digit limit for int parsing)"),
    "float_param_400_digit_int": (
        "algorithm x\nparams\n  a: float = " + "9" * 400 + "\n" + LOSS,
        "check.coerce: float(value) raises OverflowError for an int too large for a float"),
    "recursive_def": (
        "algorithm x\ndef f(x) = f(x)\nloss\n  minimize token_mean_all(f(logp))\n",
        "check._inline: RecursionError (the self-call check compares 'f' with 'def:f' and never matches)"),
    "long_name": (
        "a" * 300,
        "load.locate: Path.exists() raises OSError ENAMETOOLONG for a 300-character reference"),
    "extends_long_name": (
        "algorithm x extends " + "a" * 300 + "\n" + LOSS,
        "load.locate: Path.exists() raises OSError ENAMETOOLONG for a 300-character base name"),
}


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_known_crashes_raise_spec_error(name):
    with pytest.raises(SpecError):  # any other exception propagates and fails the test
        alignspec.load(CRASHES[name][0])


@pytest.mark.parametrize("name", ["int_literal_5000_digits", "float_param_400_digit_int", "recursive_def"])
def test_known_crashes_cli(tmp_path, name):
    p = tmp_path / f"{name}.align"
    p.write_text(CRASHES[name][0])
    r = cli("check", str(p))
    assert r.returncode == 2 and "internal error" not in r.stderr, r.stderr


# ---------------------------------------------------------------- line ends
# "\r\n" (Windows) and a lone "\r" (old Mac) are line ends like "\n", as in Python source: such
# files parse, and errors point at the right line and column and show that line, caret below.
def test_cr_only_line_ends_parse():
    spec = alignspec.load("algorithm x\rloss\r  minimize -mean(mean_tokens(logp))\r")
    assert spec.name == "x"
    crlf = alignspec.load("algorithm x\r\nloss\r\n  minimize -mean(mean_tokens(logp))\r\n")
    assert crlf.graph.number_of_nodes() == spec.graph.number_of_nodes()


# (line ends, error) → the same report for every kind of line end
_LINE_END_ERRORS = {
    # unknown name on line 3: a position from the checker, the line from load's source lines
    "unknown-name": ("algorithm x\nloss\n  minimize -mean(mean_tokens(lgp))\n", "unknown-name", 3, 30, 3,
                     "  minimize -mean(mean_tokens(lgp))"),
    # a syntax error on line 3: a position from lark, the line from the parser's lines
    "syntax": ("algorithm x\nloss\n  ratio = exp(logp) $ 2\n  minimize -mean(mean_tokens(logp))\n",
               "syntax", 3, 21, 1, "  ratio = exp(logp) $ 2"),
    # unexpected end of file: the last line
    "eof": ("algorithm x\nloss\n  minimize -mean(mean_tokens(logp)\n", "syntax", 3, 35, 1,
            "  minimize -mean(mean_tokens(logp)"),
}


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("case", sorted(_LINE_END_ERRORS))
def test_line_ends_error_position_and_report(tmp_path, eol, case):
    text, kind, line, col, width, src_line = _LINE_END_ERRORS[case]
    p = tmp_path / "eol.align"
    p.write_bytes(text.replace("\n", eol).encode())
    for ref in (str(p), text.replace("\n", eol)):  # a file, and the same text given directly
        with pytest.raises(SpecError) as info:
            alignspec.load(ref)
        e = info.value
        report = e.format()
        assert (e.kind, e.line, e.col) == (kind, line, col), report
        assert "'?'" not in e.message and "\r" not in report, report
        head, shown, caret, *_ = report.splitlines()
        assert head.startswith(f"{e.file}:{line}:{col}: "), report
        assert e.source_line == src_line and shown == "    " + src_line, report
        assert caret == " " * (4 + col - 1) + "^" * width, report


def test_crlf_error_on_line_3_report(tmp_path):
    p = tmp_path / "crlf.align"
    p.write_bytes(b"algorithm x\r\nloss\r\n  minimize -mean(mean_tokens(lgp))\r\n")
    with pytest.raises(SpecError) as info:
        alignspec.load(str(p))
    assert info.value.format().splitlines()[:3] == [
        f"{info.value.file}:3:30: unknown name 'lgp'",
        "      minimize -mean(mean_tokens(lgp))",
        "                                 ^^^",
    ]
    r = cli("check", str(p))
    assert r.returncode == 2 and r.stderr.startswith(f"{p}:3:30: unknown name 'lgp'\n"), r.stderr
    assert "\n      minimize -mean(mean_tokens(lgp))\n                                 ^^^\n" in r.stderr, r.stderr


def test_form_feed_is_not_a_line_end():
    # str.splitlines splits at "\f" but the lexer does not (it is blank space inside a line)
    with pytest.raises(SpecError) as info:
        alignspec.load("algorithm x\nloss\n  y = 1 \f+ 2\n  minimize -mean(mean_tokens(lgp))\n")
    e = info.value
    assert (e.line, e.col) == (4, 30) and e.source_line == "  minimize -mean(mean_tokens(lgp))", e.format()


# ================================================================ fuzz
def _load_or_spec_error(text: str):
    try:
        alignspec.load(text)
    except SpecError as e:
        e.format()  # formatting the report must not fail either
        assert isinstance(e.kind, str) and e.kind


_PRINTABLE = string.printable  # letters, digits, punctuation, whitespace incl. \n \r \t


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=_PRINTABLE, max_size=400))
def test_fuzz_random_text(text):
    # A trailing line end makes load() read the string as spec text rather than as a path.
    _load_or_spec_error(text + "\n")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=_PRINTABLE, max_size=400).map(lambda t: "algorithm fuzz\n" + t))
def test_fuzz_random_body(text):
    _load_or_spec_error(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=string.ascii_letters + string.digits + "_-./ ", max_size=60))
def test_fuzz_random_reference(ref):
    """Without a line end the string is a path or a built-in name: never anything but SpecError."""
    _load_or_spec_error(ref)


_EDIT_CHARS = _PRINTABLE + "()[]=#\"" * 3


@st.composite
def mutated_builtin(draw):
    text = draw(st.sampled_from(BUILTIN_TEXTS))
    chars = list(text)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["delete", "insert", "swap", "delete_line", "duplicate_line"]))
        if not chars:
            break
        i = draw(st.integers(0, len(chars) - 1))
        if op == "delete":
            del chars[i: i + draw(st.integers(1, 4))]
        elif op == "insert":
            chars[i:i] = list(draw(st.text(alphabet=_EDIT_CHARS, min_size=1, max_size=4)))
        elif op == "swap":
            j = draw(st.integers(0, len(chars) - 1))
            chars[i], chars[j] = chars[j], chars[i]
        else:
            lines = "".join(chars).split("\n")
            k = i % len(lines)
            if op == "delete_line":
                del lines[k]
            else:
                lines.insert(k, lines[draw(st.integers(0, len(lines) - 1))])
            chars = list("\n".join(lines))
    return "".join(chars)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_builtin())
def test_fuzz_mutated_builtins(text):
    _load_or_spec_error(text)


def test_builtins_unmutated_load():
    """Control for the fuzz test: every built-in spec text loads as given."""
    for text in BUILTIN_TEXTS:
        alignspec.load(text)


# ---------------------------------------------------------------- determinism
def test_error_position_does_not_depend_on_hash_seed(tmp_path):
    p = tmp_path / "two.align"
    p.write_text("algorithm x\nloss\n  minimize token_mean_all(logp) * token_mean_all(logp)\n")
    heads = set()
    for seed in range(4):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED=str(seed))
        r = subprocess.run([sys.executable, "-m", "alignspec", "check", str(p)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        heads.add(r.stderr.split(": ", 1)[0])
    assert heads == {f"{p}:3:12"}, heads  # one answer, the first offending reduction in source order
