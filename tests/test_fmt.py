"""Tests for the expression printer (dsl/unparse.py) and the formatter (dsl/fmt.py).

Properties checked on random expressions, on random spec files and on every
algorithms/*.align file:
  - `parse_expr(unparse(e)) == e`
  - idempotence: `format_text(format_text(s)) == format_text(s)`
  - meaning kept: `parse(format_text(s)) == parse(s)`
  - comments kept: the multiset of comment texts does not change
"""

from __future__ import annotations

import collections
import pathlib
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignspec.dsl import ast as A
from alignspec.dsl.fmt import format_spec, format_text
from alignspec.dsl.parser import parse
from alignspec.dsl.unparse import unparse, unparse_stmt

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALGORITHMS = sorted((ROOT / "algorithms").glob("*.align"))


def parse_expr(text: str) -> A.Expr:
    spec = parse(f"algorithm t\nloss\n  x = {text}\n")
    (section,) = spec.items
    (stmt,) = section.body
    return stmt.value


def comment_texts(spec: A.SpecFile) -> collections.Counter:
    return collections.Counter(text for _, _, text in spec.comments)


def check_format_properties(text: str, path: str = "<string>") -> str:
    spec = parse(text, path)
    out = format_spec(spec)
    assert out.endswith("\n") and not out.endswith("\n\n"), out
    again = parse(out, path)
    assert again == spec, f"meaning changed:\n--- input\n{text}\n--- output\n{out}"
    assert comment_texts(again) == comment_texts(spec), f"comments changed:\n{out}"
    assert format_spec(again) == out, f"not idempotent:\n--- once\n{out}\n--- twice\n{format_spec(again)}"
    return out


# ---------------------------------------------------------------- unparse: precedence
CANONICAL = [
    # (written, canonical)
    ("a - (b - c)", "a - (b - c)"),
    ("(a - b) - c", "a - b - c"),
    ("a - b + c", "a - b + c"),
    ("a - (b + c)", "a - (b + c)"),
    ("a / (b * c)", "a / (b * c)"),
    ("(a / b) * c", "a / b * c"),
    ("a * (b / c)", "a * (b / c)"),
    ("(a + b) * c", "(a + b) * c"),
    ("a + (b * c)", "a + b * c"),
    ("-(a + b)", "-(a + b)"),
    ("-(a * b)", "-(a * b)"),
    ("-a ** 2", "-a ** 2"),
    ("-(a ** 2)", "-a ** 2"),
    ("(-a) ** 2", "(-a) ** 2"),
    ("a ** -b", "a ** -b"),
    ("a ** (-b)", "a ** -b"),
    ("a ** b ** c", "a ** b ** c"),
    ("(a ** b) ** c", "(a ** b) ** c"),
    ("a ** (b * c)", "a ** (b * c)"),
    ("a * -b", "a * -b"),
    ("a - -b", "a - -b"),
    ("- - a", "--a"),
    ("-(-a)", "--a"),
    ("-mean(x)", "-mean(x)"),
    ("not a == b", "not a == b"),
    ("not (a == b)", "not a == b"),
    ("(not a) == b", "(not a) == b"),
    ("not not a", "not not a"),
    ("not (a and b)", "not (a and b)"),
    ("(not a) and b", "not a and b"),
    ("(a or b) and c", "(a or b) and c"),
    ("a or (b and c)", "a or b and c"),
    ("a and (b or c)", "a and (b or c)"),
    ("(a and b) and c", "a and b and c"),
    ("a and (b and c)", "a and (b and c)"),
    ("a or (b or c)", "a or (b or c)"),
    ("(a < b) == c", "(a < b) == c"),
    ("a < (b < c)", "a < (b < c)"),
    ("a + 1 <= b * 2", "a + 1 <= b * 2"),
    ("(a + b) < c", "a + b < c"),
    ("(a < b) + c", "(a < b) + c"),
    ("(f(x))[chosen]", "f(x)[chosen]"),
    ("((x))[chosen]", "x[chosen]"),
    ("(a + b)[chosen]", "(a + b)[chosen]"),
    ("(-a)[chosen]", "(-a)[chosen]"),
    ("-a[chosen]", "-a[chosen]"),
    ("a[chosen] ** 2", "a[chosen] ** 2"),
    ("a ** b[chosen]", "a ** b[chosen]"),
    ("(a ** b)[chosen]", "(a ** b)[chosen]"),
    ("[[1, 2], [3, [4]], []]", "[[1, 2], [3, [4]], []]"),
    ("[ ( a + b ) , -c ]", "[a + b, -c]"),
    ("[a][r]", "[a][r]"),
    ("generate(prompt,n=n,temperature=1.0)", "generate(prompt, n = n, temperature = 1.0)"),
    ("f()", "f()"),
    ("f((a or b), c=(d and e))", "f(a or b, c = d and e)"),
    ("1e-4", "1e-4"),
    ("1E+04", "1E+04"),
    (".5 + 5. + 007", ".5 + 5. + 007"),
    ('"a # not a comment"', '"a # not a comment"'),
    ("true and false", "true and false"),
    ("(r - group_mean(r)) / (group_std(r) + 1e-4)", "(r - group_mean(r)) / (group_std(r) + 1e-4)"),
]


@pytest.mark.parametrize("written,canonical", CANONICAL)
def test_unparse_canonical(written, canonical):
    e = parse_expr(written)
    assert unparse(e) == canonical
    assert parse_expr(canonical) == e


def test_unparse_from_constructors():
    a, b, c = A.Name("a"), A.Name("b"), A.Name("c")
    assert unparse(A.BinOp("-", a, A.BinOp("-", b, c))) == "a - (b - c)"
    assert unparse(A.BinOp("-", A.BinOp("-", a, b), c)) == "a - b - c"
    assert unparse(A.BinOp("/", a, A.BinOp("*", b, c))) == "a / (b * c)"
    assert unparse(A.Neg(A.BinOp("+", a, b))) == "-(a + b)"
    assert unparse(A.Neg(A.BinOp("**", a, A.Number(2)))) == "-a ** 2"
    assert unparse(A.BinOp("**", A.Neg(a), A.Number(2))) == "(-a) ** 2"
    assert unparse(A.BinOp("**", a, A.Neg(b))) == "a ** -b"
    assert unparse(A.Not(A.Compare("==", a, b))) == "not a == b"
    assert unparse(A.Compare("==", A.Not(a), b)) == "(not a) == b"
    assert unparse(A.BoolOp("and", A.BoolOp("or", a, b), c)) == "(a or b) and c"
    assert unparse(A.Index(A.Call("f", (A.Name("x"),)), "chosen")) == "f(x)[chosen]"
    assert unparse(A.ListExpr((A.ListExpr((a,)), A.ListExpr(())))) == "[[a], []]"
    assert unparse(A.Call("generate", (A.Name("prompt"),), (A.Keyword("n", A.Name("n")),))) \
        == "generate(prompt, n = n)"
    # numbers: the written text when known, else the value
    assert unparse(A.Number(0.0001, "1e-4")) == "1e-4"
    assert unparse(A.Number(3)) == "3"
    assert unparse(A.Number(0.5)) == "0.5"
    assert unparse(A.Number(1e-5)) == "1e-05"
    assert parse_expr("1e-05") == A.Number(1e-5)
    assert unparse(A.Str("hi")) == '"hi"'
    assert unparse(A.Bool(False)) == "false"


def test_unparse_stmt():
    v = A.Number(8, "8")
    assert unparse_stmt(A.Assign("n", v)) == "n = 8"
    assert unparse_stmt(A.Assign("n", v, "int")) == "n: int = 8"
    assert unparse_stmt(A.Assign("n", v, "int", "responses")) == 'n: int = 8 "responses"'
    assert unparse_stmt(A.Assign("n", v, None, "")) == 'n = 8 ""'
    cond = A.Compare(">", A.Call("group_std", (A.Name("r"),)), A.Number(0, "0"))
    assert unparse_stmt(A.Keep("groups", cond)) == "keep groups where group_std(r) > 0"
    assert unparse_stmt(A.Minimize(A.Neg(A.Name("x")))) == "minimize -x"
    assert unparse_stmt(A.Minimize(A.Name("x"), "pg")) == "minimize pg = x"
    text = "algorithm t\nfilter\n  keep responses where not a\nloss\n  minimize pg = -x\n  minimize y\n"
    spec = parse(text)
    assert [unparse_stmt(s) for sec in spec.items for s in sec.body] == [
        "keep responses where not a", "minimize pg = -x", "minimize y"]


# ---------------------------------------------------------------- unparse: property
SAFE_NAMES = ["a", "b", "x", "r", "A", "logp", "logp_old", "eps", "n", "_t0", "group_mean", "chosen"]
name_st = st.sampled_from(SAFE_NAMES)


@st.composite
def number_st(draw):
    digits = st.text("0123456789", min_size=1, max_size=4)
    form = draw(st.integers(0, 3))
    d1, d2 = draw(digits), draw(digits)
    mantissa = [d1, f"{d1}.{d2}", f".{d2}", f"{d1}."][form]
    if draw(st.booleans()):
        mantissa += draw(st.sampled_from(["e", "E"])) + draw(st.sampled_from(["", "+", "-"])) \
            + draw(st.text("0123456789", min_size=1, max_size=2))
    value = float(mantissa) if any(ch in mantissa for ch in ".eE") else int(mantissa)
    return A.Number(value, mantissa)


STR_CHARS = string.ascii_letters + string.digits + " #()[]=+-*/'.,:é∑"
leaf_st = st.one_of(
    number_st(),
    name_st.map(A.Name),
    st.booleans().map(A.Bool),
    st.text(STR_CHARS, max_size=6).map(A.Str),
)


def _extend(children):
    return st.one_of(
        st.tuples(st.sampled_from(["+", "-", "*", "/", "**"]), children, children)
        .map(lambda t: A.BinOp(*t)),
        st.tuples(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), children, children)
        .map(lambda t: A.Compare(*t)),
        st.tuples(st.sampled_from(["and", "or"]), children, children).map(lambda t: A.BoolOp(*t)),
        children.map(A.Neg),
        children.map(A.Not),
        st.tuples(children, name_st).map(lambda t: A.Index(*t)),
        st.lists(children, max_size=3).map(lambda xs: A.ListExpr(tuple(xs))),
        st.tuples(name_st, st.lists(children, max_size=3),
                  st.lists(st.tuples(name_st, children), max_size=2))
        .map(lambda t: A.Call(t[0], tuple(t[1]), tuple(A.Keyword(k, v) for k, v in t[2]))),
    )


expr_st = st.recursive(leaf_st, _extend, max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(expr_st)
def test_unparse_roundtrip(e):
    text = unparse(e)
    assert parse_expr(text) == e, text
    assert unparse(parse_expr(text)) == text


# ---------------------------------------------------------------- fmt: layout
def test_doc_example():
    src = '''# Group Relative Policy Optimization
# Shao et al., DeepSeekMath, arXiv:2402.03300, Eq. 3 (outcome supervision)
algorithm grpo
import common

params
  n: int = 8       "responses sampled per prompt (G in the paper)"
  eps = 0.2        "clip range of the importance ratio"
  beta = 0.04      "weight of the k3 KL penalty to the reference"

sample
  responses = generate(prompt, n = n, temperature = 1.0)

score
  r = reward(response)

advantage
  A = (r - group_mean(r)) / (group_std(r) + 1e-4)

loss
  ratio = exp(logp - logp_old)
  pg = min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
  minimize -mean(mean_tokens(pg - beta * k3(logp, logp_ref)))
'''
    expected = src.replace(
        '''  n: int = 8       "responses sampled per prompt (G in the paper)"
  eps = 0.2        "clip range of the importance ratio"
  beta = 0.04      "weight of the k3 KL penalty to the reference"''',
        '''  n: int = 8     "responses sampled per prompt (G in the paper)"
  eps    = 0.2   "clip range of the importance ratio"
  beta   = 0.04  "weight of the k3 KL penalty to the reference"''')
    assert check_format_properties(src) == expected


def test_layout_messy_input():
    src = '''

algorithm   t   extends   grpo


import a
import   b

data pairs
def  f( x,y )=x+y
def g() = 1
    params
n=8
      long_name : float=1e-4 "doc"
  flag: bool = true
loss
    x=(a+
        b)*c



    minimize  pg=-mean( x )
    minimize x'''
    expected = '''algorithm t extends grpo
import a
import b
data pairs

def f(x, y) = x + y

def g() = 1

params
  n                = 8
  long_name: float = 1e-4  "doc"
  flag: bool       = true

loss
  x = (a + b) * c

  minimize pg = -mean(x)
  minimize x
'''
    assert check_format_properties(src) == expected


def test_library_and_empty_sections():
    assert check_format_properties("library lib\ndef k3(a,b)=exp(b-a)-(b-a)-1\n") == \
        "library lib\n\ndef k3(a, b) = exp(b - a) - (b - a) - 1\n"
    assert check_format_properties("algorithm t\nloss\nparams\n") == "algorithm t\n\nloss\n\nparams\n"


def test_params_alignment_without_docs():
    src = "algorithm t\nparams\n  n = 8\n  epsilon: float = 0.2\n"
    assert check_format_properties(src) == \
        "algorithm t\n\nparams\n  n              = 8\n  epsilon: float = 0.2\n"


def test_comments_attach_and_trail():
    src = '''# leading 1

# leading 2
algorithm t # on the header
import common
  # about data
data pairs
# about params

params   # on the keyword
  n = 8 "doc"   # after the doc
  # about eps
  eps = 0.2
loss
  # first
  x = 1
'''
    expected = '''# leading 1

# leading 2
algorithm t  # on the header
import common
# about data
data pairs

# about params

params  # on the keyword
  n   = 8  "doc"  # after the doc
  # about eps
  eps = 0.2

loss
  # first
  x = 1
'''
    assert check_format_properties(src) == expected


def test_wrapped_statement_comments():
    src = '''algorithm t
loss
  # before
  pg = min(ratio * A,   # unclipped
           # and the clipped one
           clip(ratio, 1 - eps,
                1 + eps) * A)  # end
  y = f(a,
        b)  # only one
  z = f(a,  # inside
        b)
'''
    expected = '''algorithm t

loss
  # before
  # unclipped
  # and the clipped one
  pg = min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)  # end
  y = f(a, b)  # only one
  z = f(a, b)  # inside
'''
    assert check_format_properties(src) == expected


def test_blank_lines_and_end_comments():
    src = '''algorithm t
loss

  x = 1



  y = 2
  # still in loss (indented)

  # this too
# the next section's
train
  epochs = 1
  # the end of train


# the end of the file
# really'''
    expected = '''algorithm t

loss
  x = 1

  y = 2
  # still in loss (indented)

  # this too

# the next section's
train
  epochs = 1
  # the end of train

# the end of the file
# really
'''
    assert check_format_properties(src) == expected


def test_strings_with_hash_are_not_comments():
    src = 'algorithm t\nparams\n  tag = "a # b" "doc # c"  # real\n'
    out = check_format_properties(src)
    assert out == 'algorithm t\n\nparams\n  tag = "a # b"  "doc # c"  # real\n'
    assert [c[2] for c in parse(out).comments] == ["# real"]


@pytest.mark.parametrize("eol", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_crlf_and_cr_input(eol):
    # the parser reads "\r\n" and a lone "\r" as line ends; fmt writes "\n" everywhere, and
    # the wrapped statement's end (found in the source text) is right with either
    src = "algorithm t\n# c\nloss\n  x = f(a,\n    b)  # t\n  # end\n".replace("\n", eol)
    out = check_format_properties(src)
    assert out == "algorithm t\n\n# c\nloss\n  x = f(a, b)  # t\n  # end\n"
    assert parse(src).source == src  # the text as given: `fmt --check` sees the line ends


def test_params_section_alignment_is_per_section():
    src = "algorithm t\nparams\n  a = 1 \"x\"\nloss\n  b = 22 \"y\"\nparams\n  long_name = 333 \"z\"\n"
    assert check_format_properties(src) == (
        'algorithm t\n\nparams\n  a = 1  "x"\n\nloss\n  b = 22 "y"\n\nparams\n  long_name = 333  "z"\n')


def test_format_text_path_and_errors():
    from alignspec.dsl.errors import SpecError

    with pytest.raises(SpecError) as info:
        format_text("algorithm t\nloss\n  x = (\n", "bad.align")
    assert info.value.file == "bad.align"


# ---------------------------------------------------------------- fmt: random spec files
STMT_NAMES = ["x", "y", "n", "eps", "beta", "A", "pg", "ratio", "r2", "_k", "epochs", "reference"]
COMMENT_CHARS = string.ascii_letters + string.digits + " #()[]\"'=+-*/:,.é∑\t"
SECTIONS = ["params", "sample", "score", "filter", "select", "advantage", "loss", "train", "pipeline"]


class Messy:
    """Writes an expression the way a person might: extra parentheses, odd spacing, lines
    wrapped inside brackets, comments at the end of wrapped lines."""

    def __init__(self, rng, comments):
        self.rng = rng
        self.comments = comments  # list of comment texts to choose from

    def ws(self, depth, allow_none=True):
        rng = self.rng
        if depth > 0 and rng.random() < 0.15:
            tail = ""
            if rng.random() < 0.4:
                tail = " " * rng.randint(0, 2) + rng.choice(self.comments)
            return tail + "\n" + " " * rng.randint(0, 8)
        return " " * rng.randint(0 if allow_none else 1, 2)

    def expr(self, e, depth=0):
        text = self._bare(e, depth + 1)
        if isinstance(e, (A.BinOp, A.Compare, A.BoolOp, A.Neg, A.Not, A.Index)) or self.rng.random() < 0.15:
            return "(" + self.ws(depth + 1) + text + self.ws(depth + 1) + ")"
        return text

    def _bare(self, e, depth):
        # every operand is parenthesized, so the tree is unambiguous whatever the precedence
        ws = self.ws
        if isinstance(e, (A.BinOp, A.Compare)):
            return self.expr(e.left, depth) + ws(depth) + e.op + ws(depth) + self.expr(e.right, depth)
        if isinstance(e, A.BoolOp):
            return self.expr(e.left, depth) + ws(depth, False) + e.op + ws(depth, False) + self.expr(e.right, depth)
        if isinstance(e, A.Neg):
            return "-" + ws(depth) + self.expr(e.operand, depth)
        if isinstance(e, A.Not):
            return "not" + ws(depth, False) + self.expr(e.operand, depth)
        if isinstance(e, A.Index):
            return self.expr(e.value, depth) + "[" + ws(depth + 1) + e.role + ws(depth + 1) + "]"
        if isinstance(e, A.Call):
            parts = [self.expr(a, depth + 1) for a in e.args]
            parts += [k.name + ws(depth + 1) + "=" + ws(depth + 1) + self.expr(k.value, depth + 1)
                      for k in e.kwargs]
            return e.func + "(" + ws(depth + 1) + ("," + ws(depth + 1)).join(parts) + ws(depth + 1) + ")"
        if isinstance(e, A.ListExpr):
            inner = ("," + ws(depth + 1)).join(self.expr(i, depth + 1) for i in e.items)
            return "[" + ws(depth + 1) + inner + ws(depth + 1) + "]"
        return unparse(e)


@st.composite
def spec_text_st(draw):
    rng = draw(st.randoms(use_true_random=False))
    comments = draw(st.lists(st.text(COMMENT_CHARS, max_size=10).map(lambda s: "#" + s),
                             min_size=1, max_size=6))
    exprs = draw(st.lists(st.recursive(leaf_st, _extend, max_leaves=6), min_size=1, max_size=8))
    messy = Messy(rng, comments)
    lines: list[str] = []

    def noise(indent_hint):
        # blank lines and comment lines, indented anyhow
        for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
            if rng.random() < 0.5:
                lines.append(" " * rng.choice([0, 0, 2, 4]) if rng.random() < 0.3 else "")
            else:
                lines.append(" " * rng.choice([0, indent_hint, indent_hint, 5]) + rng.choice(comments))

    def code(text, indent):
        if rng.random() < 0.3:
            text += " " * rng.randint(0, 3) + rng.choice(comments)
        lines.append(" " * indent + text)

    def expr():
        return messy.expr(rng.choice(exprs))

    noise(0)
    kind = rng.choice(["algorithm", "algorithm", "library"])
    header = "library lib" if kind == "library" else "algorithm t" + rng.choice(["", " extends grpo"])
    code(header, 0)
    for _ in range(rng.randint(0, 5)):
        noise(0)
        what = rng.choice(["import", "data", "def", "section", "section", "section"])
        if what == "import":
            code("import " + rng.choice(["common", "lib2"]), 0)
        elif what == "data":
            code("data " + rng.choice(["pairs", "prompts"]), 0)
        elif what == "def":
            params = rng.sample(SAFE_NAMES, rng.randint(0, 3))
            code(f"def {rng.choice(['f', 'k3'])}({', '.join(params)}) = {expr()}", 0)
        else:
            sec = rng.choice(SECTIONS)
            ind = rng.choice([2, 2, 2, 0, 4])
            code(sec, rng.choice([0, 0, 0, 1]))
            for _ in range(rng.randint(0, 4)):
                noise(ind)
                name = rng.choice(STMT_NAMES)
                form = rng.random()
                if form < 0.15:
                    text = f"keep {rng.choice(['groups', 'responses'])} where {expr()}"
                elif form < 0.3:
                    text = "minimize " + (f"{name} = " if rng.random() < 0.5 else "") + expr()
                else:
                    typ = f": {rng.choice(['int', 'float'])}" if rng.random() < 0.3 else ""
                    doc = f' "{rng.choice(["", "doc", "a # b"])}"' if rng.random() < 0.4 else ""
                    text = f"{name}{typ} = {expr()}{doc}"
                code(text, ind + rng.choice([0, 0, 0, 1]))
    noise(2)
    return "\n".join(lines) + rng.choice(["", "\n", "\n\n"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_text_st())
def test_format_random_specs(text):
    check_format_properties(text)


# ---------------------------------------------------------------- fmt: the shipped algorithms
@pytest.mark.parametrize("path", ALGORITHMS, ids=[p.name for p in ALGORITHMS])
def test_format_algorithm_files(path):
    check_format_properties(path.read_text(encoding="utf-8"), str(path))


def test_format_a_rollout_spec():
    src = ("algorithm agentic\nparams\n  n: int = 4\nsample\n  responses = rollout(prompt,env=env,n=n,max_turns=3)\n"
           "score\n  r = env_reward( response )\nloss\n  minimize -mean(mean_tokens(logp) * (r - group_mean(r)))\n")
    out = format_text(src)
    assert "responses = rollout(prompt, env = env, n = n, max_turns = 3)" in out
    assert "r = env_reward(response)" in out
    check_format_properties(src, "agentic.align")
