"""Text → syntax tree. Lark (LALR) with positions; every failure becomes a SpecError.

The grammar lives in grammar.lark. A small post-lexer drops line ends inside brackets so that
long expressions may wrap, and bounds nesting so that no input can exhaust the recursion
limit of the passes that follow.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from lark import Lark, Token, v_args
from lark.visitors import Transformer_NonRecursive
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast as A
from .builtins import KEYWORDS, MAX_INT, SECTIONS
from .errors import Span, SpecError

MAX_DEPTH = 100  # brackets
MAX_EXPR_DEPTH = 256  # expression nesting of any kind
MAX_LINE = 10_000  # characters on one line

_READABLE = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "end of line",
    "SECTION": "a section keyword (params, sample, score, filter, select, advantage, loss, train, pipeline)",
    "SCOPE": "'groups' or 'responses'", "COMPARE_OP": "a comparison", "$END": "end of file",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "EQUAL": "'='",
    "COLON": "':'", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "__ANON_0": "'**'",
}


def _readable(term: str) -> str:
    if term in _READABLE:
        return _READABLE[term]
    if term.isupper() and term.isalpha():
        return f"'{term.lower()}'"
    return term


class _Postlex:
    """Drops newlines inside () and [], and rejects absurd nesting with a clear error."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        last = None
        for tok in stream:
            if tok.type == "_NL" and last == "_NL":
                continue  # a comment line between two line ends leaves two in a row
            last = tok.type if not (tok.type == "_NL" and depth > 0) else last
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError(
                        f"brackets nested more than {MAX_DEPTH} deep", _tok_span("", tok),
                        kind="too-deep", hint="name the inner parts with assignments")
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth > 0:
                continue
            yield tok


def _tok_span(path: str, tok: Token) -> Span:
    return Span(path, tok.line or 1, tok.column or 1, tok.end_line or tok.line or 1,
                tok.end_column or (tok.column or 1) + 1)


def _line(lines: list[str], n: int | None) -> str | None:
    if n is None or n < 1 or n > len(lines):
        return None
    return lines[n - 1]


class _Builder(Transformer_NonRecursive):
    """Lark tree → frozen dataclasses, without recursion (so deep input cannot crash it)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.path, 1, 1, 1, 1)
        return Span(self.path, meta.line, meta.column, meta.end_line, meta.end_column)

    # -- expressions
    @v_args(meta=True)
    def number(self, meta, children):
        (tok,) = children
        text = str(tok)
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise SpecError(f"number too long ({len(text)} digits)", _tok_span(self.path, tok), kind="type",
                            hint="write large numbers with an exponent, e.g. 1e30") from None
        if value in (float("inf"), float("-inf")) or (isinstance(value, int) and value > MAX_INT):
            raise SpecError(f"number too large: {text if len(text) < 40 else text[:40] + '…'}",
                            _tok_span(self.path, tok), kind="type",
                            hint=f"floats go up to about 1.8e308, integers up to {MAX_INT}")
        return A.Number(value, text, span=self._span(meta))

    @v_args(meta=True)
    def string(self, meta, children):
        return A.Str(str(children[0])[1:-1], span=self._span(meta))

    @v_args(meta=True)
    def true(self, meta, children):
        return A.Bool(True, span=self._span(meta))

    @v_args(meta=True)
    def false(self, meta, children):
        return A.Bool(False, span=self._span(meta))

    @v_args(meta=True)
    def name(self, meta, children):
        return A.Name(str(children[0]), span=self._span(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        func, arguments = children
        args, kwargs = [], []
        for a in (arguments or []):
            if isinstance(a, A.Keyword):
                kwargs.append(a)
            else:
                if kwargs:
                    raise SpecError("a positional argument follows a keyword argument",
                                    getattr(a, "span", self._span(meta)), kind="syntax",
                                    hint="put positional arguments first")
                args.append(a)
        return A.Call(str(func), tuple(args), tuple(kwargs), span=self._span(meta))

    def arguments(self, children):
        return list(children)

    @v_args(meta=True)
    def keyword(self, meta, children):
        return A.Keyword(str(children[0]), children[1], span=self._span(meta))

    def _bin(op):
        @v_args(meta=True)
        def method(self, meta, children):
            return A.BinOp(op, children[0], children[1], span=self._span(meta))
        return method

    add, sub, mul, div, pow = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("**")

    @v_args(meta=True)
    def neg(self, meta, children):
        return A.Neg(children[0], span=self._span(meta))

    @v_args(meta=True)
    def compare(self, meta, children):
        left, op, right = children
        return A.Compare(str(op), left, right, span=self._span(meta))

    @v_args(meta=True)
    def and_op(self, meta, children):
        return A.BoolOp("and", children[0], children[1], span=self._span(meta))

    @v_args(meta=True)
    def or_op(self, meta, children):
        return A.BoolOp("or", children[0], children[1], span=self._span(meta))

    @v_args(meta=True)
    def not_op(self, meta, children):
        return A.Not(children[0], span=self._span(meta))

    @v_args(meta=True)
    def index(self, meta, children):
        return A.Index(children[0], str(children[1]), span=self._span(meta))

    @v_args(meta=True)
    def list_expr(self, meta, children):
        items = tuple(c for c in children if c is not None)
        return A.ListExpr(items, span=self._span(meta))

    # -- statements
    @v_args(meta=True)
    def assign(self, meta, children):
        name, type_, value, doc = children
        return A.Assign(str(name), value, str(type_) if type_ is not None else None,
                        str(doc)[1:-1] if doc is not None else None, span=self._span(meta),
                        name_span=_tok_span(self.path, name))

    @v_args(meta=True)
    def keep_stmt(self, meta, children):
        scope, cond = children
        return A.Keep(str(scope), cond, span=self._span(meta))

    @v_args(meta=True)
    def minimize(self, meta, children):
        return A.Minimize(children[0], None, span=self._span(meta))

    @v_args(meta=True)
    def minimize_named(self, meta, children):
        return A.Minimize(children[1], str(children[0]), span=self._span(meta))

    @v_args(meta=True)
    def section(self, meta, children):
        kind = str(children[0])
        return A.Section(kind, tuple(children[1:]), span=self._span(meta))

    @v_args(meta=True)
    def import_stmt(self, meta, children):
        return A.Import(str(children[0]), span=self._span(meta))

    @v_args(meta=True)
    def data_stmt(self, meta, children):
        return A.Data(str(children[0]), span=self._span(meta))

    @v_args(meta=True)
    def def_stmt(self, meta, children):
        name, *rest = children
        body = rest[-1]
        params = tuple(str(p) for p in rest[:-1] if p is not None)
        return A.Def(str(name), params, body, span=self._span(meta))

    @v_args(meta=True)
    def algorithm_header(self, meta, children):
        return ("algorithm", str(children[0]), str(children[1]) if children[1] is not None else None,
                self._span(meta))

    @v_args(meta=True)
    def library_header(self, meta, children):
        return ("library", str(children[0]), None, self._span(meta))

    def start(self, children):
        (kind, name, extends, span), *items = children
        return A.SpecFile(kind, name, extends, tuple(items), span=span)


@functools.lru_cache(maxsize=None)
def _grammar() -> str:
    return (Path(__file__).with_name("grammar.lark")).read_text()


_local = threading.local()  # this thread's parse: `comments`, filled by the lexer callback


def _keep_comment(tok: Token) -> None:
    _local.comments.append(tok)


@functools.lru_cache(maxsize=None)
def _parser() -> Lark:
    return Lark(_grammar(), parser="lalr", lexer="contextual", propagate_positions=True,
                maybe_placeholders=True, postlex=_Postlex(),
                lexer_callbacks={"COMMENT": _keep_comment})


def normalize_newlines(text: str) -> str:
    r"""Every line end as "\n": Windows ("\r\n") and old Mac ("\r") line ends read like Unix ones,
    as Python reads source files. parse() does this before lexing, so lark's line and column
    numbers and the lines shown in error reports agree for every kind of line end."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def source_lines(text: str) -> list[str]:
    r"""The lines of spec text as the parser numbers them (line 1 is `source_lines(t)[0]`).

    Unlike str.splitlines, splits only at line ends ("\n", "\r\n", "\r"): a form feed or
    another Unicode separator inside a line is not a line end for the lexer either."""
    lines = normalize_newlines(text).split("\n")
    if lines[-1] == "":
        lines.pop()  # the text ends with a line end (or is empty)
    return lines


def decode(data: bytes, path: str) -> str:
    """Bytes → text, or a SpecError at the first byte that is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # everything before the bad byte is UTF-8: count lines and columns in characters, with
        # line ends and the byte order mark treated as parse() treats them
        before = normalize_newlines(data[: e.start].decode("utf-8").removeprefix("\ufeff"))
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        raise SpecError(f"not UTF-8 text: byte 0x{data[e.start]:02x} cannot be decoded",
                        Span(path, line, col, line, col + 1), kind="encoding",
                        hint="save the spec as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def parse(text: str, path: str = "<string>") -> A.SpecFile:
    r"""Parse one spec file's text. Raises SpecError with file:line:col on any problem.

    Any line ends are accepted ("\n", "\r\n", "\r"). The SpecFile keeps the text as given in
    `source` (so `alignspec fmt --check` sees line ends that are not canonical)."""
    source, text = text, normalize_newlines(text)
    lines = source_lines(text) or [""]
    for n, l in enumerate(lines, 1):
        if len(l) > MAX_LINE:
            raise SpecError(f"line {n} is {len(l):,} characters long; the limit is {MAX_LINE:,}",
                            Span(path, n, MAX_LINE, n, MAX_LINE + 1), kind="too-long",
                            hint="split long expressions over several lines or name their parts",
                            source_line=l)
    if "\x00" in text:
        idx = text.index("\x00")
        line = text.count("\n", 0, idx) + 1
        col = idx - (text.rfind("\n", 0, idx) + 1) + 1
        raise SpecError("binary data (a NUL byte) in a spec file", Span(path, line, col, line, col + 1),
                        kind="encoding", hint="is this really a .align spec?",
                        source_line=_line(lines, line))
    if not text.strip() or all(not l.strip() or l.lstrip().startswith("#") for l in lines):
        raise SpecError("empty spec: expected a header line such as 'algorithm NAME'",
                        Span(path, 1, 1, 1, 1), kind="empty",
                        hint="start the file with `algorithm NAME` (or `library NAME`)")
    _local.comments = comments = []  # per thread: parses in two threads never mix their comments
    try:
        try:
            tree = _Builder(path).transform(_parser().parse(text + "\n"))
        except VisitError as v:
            raise v.orig_exc from None
    except SpecError as e:
        if not e.span.file:
            e.span = Span(path, e.span.line, e.span.col, e.span.end_line, e.span.end_col)
        if e.source_line is None:
            e.source_line = _line(lines, e.span.line)
        raise
    except UnexpectedInput as e:
        raise _syntax_error(e, path, lines) from None
    except RecursionError:
        raise SpecError("expression nested too deeply", Span(path, 1, 1, 1, 1), kind="too-deep") from None
    _check_depth(tree, lines)
    return A.SpecFile(tree.kind, tree.name, tree.extends, tree.items, span=tree.span, path=path,
                      source=source,
                      comments=tuple((c.line, c.column, str(c)) for c in comments))


def _check_depth(spec: A.SpecFile, lines: list[str]) -> None:
    """Iteratively bound the depth of every expression, so later recursive passes are safe."""
    def exprs():
        for item in spec.items:
            if isinstance(item, A.Def):
                yield item.body
            elif isinstance(item, A.Section):
                for stmt in item.body:
                    yield stmt.value if not isinstance(stmt, A.Keep) else stmt.cond
    for root in exprs():
        stack = [(root, 1)]
        while stack:
            node, d = stack.pop()
            if d > MAX_EXPR_DEPTH:
                raise SpecError(f"expression nested more than {MAX_EXPR_DEPTH} deep", node.span,
                                kind="too-deep", hint="name the inner parts with assignments",
                                source_line=_line(lines, node.span.line))
            stack.extend((c, d + 1) for c in A.children(node))


def _syntax_error(e: UnexpectedInput, path: str, lines: list[str]) -> SpecError:
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedToken):
        tok = e.token
        expected = sorted({_readable(t) for t in e.expected if not t.startswith("__ANON") or t in _READABLE})
        if tok.type == "$END":
            found = "end of file"
            line, col = len(lines), len(lines[-1]) + 1
        elif tok.type == "_NL":
            found = "end of line"
        else:
            found = repr(str(tok)) if len(str(tok)) < 40 else repr(str(tok)[:40] + "…")
        msg = f"unexpected {found}"
        end = (tok.end_column or col + 1) if tok.type not in ("_NL", "$END") and tok.end_line == line else col + 1
    elif isinstance(e, UnexpectedCharacters):
        ch = lines[line - 1][col - 1] if 0 < line <= len(lines) and 0 < col <= len(lines[line - 1]) else "?"
        expected = sorted({_readable(t) for t in (e.allowed or ()) if not t.startswith("__ANON")})
        msg = f"unexpected character {ch!r}"
        end = col + 1
    elif isinstance(e, UnexpectedEOF):
        expected = sorted({_readable(t) for t in e.expected})
        msg = "unexpected end of file"
        line, col = len(lines), len(lines[-1]) + 1
        end = col + 1
    else:  # pragma: no cover - lark has no other kinds
        expected, msg, end = [], "syntax error", col + 1
    if expected:
        shown = expected if len(expected) <= 6 else expected[:6] + ["…"]
        msg += "; expected " + ", ".join(shown)
    before = (_line(lines, line) or "")[:col - 1].split()
    if before and (before[-1] in KEYWORDS or before[-1] in SECTIONS) and msg.startswith("unexpected '='"):
        # `keep = ...`: a keyword where a name was meant
        return SpecError(f"{before[-1]!r} is a keyword of the language and cannot name a value",
                         Span(path, line, col, line, end), kind="syntax", source_line=_line(lines, line),
                         hint="choose another name; keywords: " + ", ".join(KEYWORDS + SECTIONS))
    return SpecError(msg, Span(path, line, col, line, end), kind="syntax",
                     source_line=_line(lines, line))
