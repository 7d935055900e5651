"""Highlighting: the Pygments lexer (entry point `alignspec`) and the generated TextMate grammar.

Both take their word lists from alignspec.dsl.vocab, which reads the grammar and the checker's
tables; these tests check that nothing drifts: every built-in spec lexes without an Error token,
every built-in function and quantity gets its own token kind, the checked-in editors/vscode files
are exactly what the tables generate, and the TextMate patterns scope the built-in specs the same
way the lexer does.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import Error, Name, Keyword, Comment, String, Number

from alignspec.dsl import vocab
from alignspec.dsl.builtins import FUNCTIONS, QUANTITIES, SECTIONS
from alignspec.editor import textmate
from alignspec.editor.lexer import AlignspecLexer

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "algorithms").glob("*.align"))


# ================================================================ vocabulary
def test_vocab_agrees_with_the_grammar():
    assert set(vocab.GRAMMAR_SECTIONS) == set(SECTIONS)
    assert {"algorithm", "extends", "library", "import", "data", "def", "keep", "where", "minimize"} <= set(
        vocab.KEYWORDS)
    assert set(vocab.SCOPES) == {"groups", "responses"}
    assert vocab.FUNCTION_WORDS == tuple(sorted(FUNCTIONS)) and vocab.QUANTITY_WORDS == tuple(sorted(QUANTITIES))


def test_signatures_state_level_rules():
    assert "response → group" in vocab.describe_function("group_mean")
    assert "action → response" in vocab.describe_function("sum_tokens")
    assert "clip(value, lower bound, upper bound)" in vocab.describe_function("clip")
    assert "action-level" in vocab.describe_quantity("logp_ref") and "reference" in vocab.describe_quantity("logp_ref")


# ================================================================ Pygments
def test_lexer_is_registered_as_entry_point():
    assert isinstance(get_lexer_by_name("alignspec"), AlignspecLexer)
    assert isinstance(get_lexer_for_filename("x.align"), AlignspecLexer)


def test_pygmentize_highlights_a_builtin():
    r = subprocess.run([sys.executable, "-m", "pygments", "-l", "alignspec", "-f", "html",
                        str(ROOT / "algorithms" / "grpo.align")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '<span class="nb">group_mean</span>' in r.stdout       # Name.Builtin
    assert '<span class="kn">advantage</span>' in r.stdout        # Keyword.Namespace (section)
    assert '<span class="err">' not in r.stdout


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_no_error_token_in_builtin_specs(path):
    text = path.read_text()
    toks = list(AlignspecLexer(stripnl=False).get_tokens(text))
    bad = [(t, v) for t, v in toks if t in Error]
    assert not bad, bad
    assert "".join(v for _, v in toks) == (text if text.endswith("\n") else text + "\n")


def _kinds(text):
    out = {}
    for t, v in AlignspecLexer().get_tokens(text):
        out.setdefault(v, set()).add(t)
    return out


def test_token_kinds():
    k = _kinds((ROOT / "algorithms" / "dapo.align").read_text())
    assert k["dapo"] == {Name.Class} and k["grpo"] == {Name.Class}
    assert k["extends"] == {Keyword.Declaration}
    assert k["common"] == {Name.Namespace}
    assert k["eps_high"] == {Name.Constant}           # declared and read as a parameter
    assert k["int"] == {Keyword.Type}
    assert k["group_std"] == {Name.Builtin}
    assert k["logp_old"] == {Name.Builtin.Pseudo}
    assert k["overlong_penalty"] == {Name.Function}   # a def from the imported library
    assert k["keep"] == {Keyword} and k["filter"] == {Keyword.Namespace}
    assert k["0.28"] == {Number.Float} and k["4096"] == {Number.Integer}
    assert any(t in String.Doc for t in k['"upper clip range (clip-higher); eps is the lower one"'])
    assert any(t in Comment for t in k["# DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization"])
    d = _kinds((ROOT / "algorithms" / "dpo.align").read_text())
    assert d["chosen"] == {Name.Attribute} and d["rejected"] == {Name.Attribute}


def test_every_builtin_function_and_quantity_is_highlighted():
    """A function or quantity added to builtins.py is highlighted with no change to the lexer."""
    for name in FUNCTIONS:
        assert _kinds(f"algorithm x\nloss\n  a = {name}(logp)\n")[name] == {Name.Builtin}, name
    for name in QUANTITIES:
        assert _kinds(f"algorithm x\nloss\n  a = {name} + 1\n")[name] == {Name.Builtin.Pseudo}, name


# ================================================================ TextMate
def test_vscode_files_are_generated_from_the_tables():
    r = subprocess.run([sys.executable, "-m", "alignspec.editor.textmate", "--check"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for rel, text in textmate.files().items():
        assert (ROOT / "editors" / "vscode" / rel).read_text() == text
    manifest = json.loads((ROOT / "editors" / "vscode" / "package.json").read_text())
    assert manifest["contributes"]["grammars"][0]["path"] == "./syntaxes/alignspec.tmLanguage.json"
    conf = textmate.language_configuration()
    assert conf["comments"]["lineComment"] == "#"
    assert re.match(conf["indentationRules"]["increaseIndentPattern"], "loss  # the objective")


def _tm_scan(grammar: dict, text: str) -> list[tuple[str, str]]:
    """A small TextMate interpreter (match/captures/include and one level of begin/end) that
    returns (scope, text) pairs; enough to run this grammar on real specs in Python `re`."""
    repo = grammar["repository"]

    def flat(patterns):
        for p in patterns:
            if "include" in p:
                r = repo[p["include"][1:]]
                yield from flat(r["patterns"]) if "patterns" in r and "begin" not in r else [r]
            else:
                yield p

    top = list(flat(grammar["patterns"]))
    out, stack = [], []
    for line in text.splitlines():
        pos = 0
        while pos <= len(line):
            rules = list(flat(stack[-1]["patterns"])) if stack else top
            if stack:
                m = re.compile(stack[-1]["end"]).match(line, pos)
                if m and pos == 0:
                    stack.pop()
                    continue
            best = None
            for rule in rules:
                rx = re.compile(rule.get("match") or rule["begin"])
                m = rx.search(line, pos)
                if m and (best is None or m.start() < best[0].start()):
                    best = (m, rule)
            if best is None or best[0].end() == best[0].start():
                break
            m, rule = best
            caps = rule.get("captures") or rule.get("beginCaptures") or {}
            if rule.get("name"):
                out.append((rule["name"], m.group(0)))
            for i, c in caps.items():
                if m.group(int(i)) is not None:
                    out.append((c["name"], m.group(int(i))))
            if "begin" in rule:
                stack.append(rule)
            pos = m.end()
    return out


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_textmate_scopes_match_the_lexer(path):
    """Every word the lexer calls a built-in function, quantity, section or parameter gets the
    corresponding TextMate scope."""
    for rx in re.findall(r'"(?:match|begin|end)": "((?:[^"\\]|\\.)*)"', json.dumps(textmate.grammar())):
        re.compile(json.loads(f'"{rx}"'))
    text = path.read_text()
    scopes = {}
    for scope, word in _tm_scan(textmate.grammar(), text):
        scopes.setdefault(word, set()).add(scope.split(".")[0] + "." + scope.split(".")[1])
    want = {Name.Builtin: "support.function", Name.Builtin.Pseudo: "variable.language",
            Keyword.Namespace: "keyword.other", Keyword.Type: "support.type"}
    for tok, word in AlignspecLexer().get_tokens(text):
        if tok in want and word not in ("import",):
            assert want[tok] in scopes.get(word, set()), (word, tok, scopes.get(word))
    for tok, word in AlignspecLexer().get_tokens(text):
        if tok is Name.Constant and re.search(rf"^\s+{word}\s*[:=]", text, re.M):
            assert "variable.other" in scopes.get(word, set()), word
