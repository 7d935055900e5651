"""The canonical layout of a spec file, comments kept.

Layout (what `format_spec` writes):

- Comments before the header stay before it; blank lines among them (and between them and the
  header) are kept, collapsed to one.
- The header line, then the items in their original order. The header and consecutive
  `import` / `data` lines form one block without blank lines; every `def` and every section is
  separated from its neighbours by exactly one blank line.
- A section keyword at column 0, its statements indented two spaces, one per line. Inside a
  section, a blank line the author left between statements is kept (several become one); no
  blank line directly after the keyword.
- In `params`, the `=` signs line up (names and types are padded) and so do the doc strings
  (values are padded); lines without a doc get no padding after the value.
- A statement wrapped over several lines (inside brackets) is joined into one line.
- Comments: a comment alone on its line belongs to the statement or item after it and is
  indented like it. A comment at the end of a line stays at the end of that line, two spaces
  after the code. A comment inside a wrapped statement moves to the end of the joined line; when
  a statement holds several comments, the last one ends the line and the others go, in order,
  on their own lines right above it. Indented comments after the last statement of a section
  (before the next item or the end of the file) stay in that section, indented; comments at
  column 0 there belong to the next item, or stay at the end of the file.
- Output ends with exactly one newline. Every line ends with "\n", whatever the input used
  ("\r\n" and "\r" files come out with Unix line ends).

The result parses to the same tree (`parse(format_text(s)) == parse(s)`), holds the same
comments, and formatting it again changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import ast as A
from .parser import normalize_newlines, parse
from .unparse import unparse, unparse_stmt

INDENT = "  "


@dataclass
class _Comment:
    line: int
    col: int
    text: str
    blank_before: bool = False


@dataclass
class _Unit:
    """One line of code in canonical form: the header, an item, a section keyword or a statement."""

    node: object
    level: int  # 0: top level (header, item, section keyword); 1: statement
    start: int  # first source line
    end: int = 0  # last source line (a wrapped statement spans several)
    blank_before: bool = False
    leading: list[_Comment] = field(default_factory=list)
    inner: list[_Comment] = field(default_factory=list)  # on the unit's own lines
    trailer: list[_Comment] = field(default_factory=list)  # sections only: indented comments at the end


def format_text(text: str, path: str = "<string>") -> str:
    """Parse `text` and return its canonical form."""
    return format_spec(parse(text, path))


def format_spec(spec: A.SpecFile) -> str:
    """The canonical text of a parsed spec file (comments taken from `spec.comments`)."""
    units = _units(spec)
    src = normalize_newlines(spec.source)  # positions count lines as the parser does
    starts = _line_starts(src)
    for u in units:
        u.end = _end_line(src, starts, u.node) if src else u.start
    tail = _attach_comments(units, spec.comments)
    return _render(spec, units, tail)


# ---------------------------------------------------------------- structure
def _units(spec: A.SpecFile) -> list[_Unit]:
    units = [_Unit(spec, 0, spec.span.line)]
    for item in spec.items:
        units.append(_Unit(item, 0, item.span.line))
        if isinstance(item, A.Section):
            units.extend(_Unit(s, 1, s.span.line) for s in item.body)
    return units


def _line_starts(src: str) -> list[int]:
    starts = [0]
    for i, c in enumerate(src):
        if c == "\n":
            starts.append(i + 1)
    return starts


def _end_line(src: str, starts: list[int], node) -> int:
    """The last source line of the unit starting at `node.span`: the first line end outside
    brackets, skipping strings and comments (as the parser's post-lexer does)."""
    line, col = node.span.line, node.span.col
    if line < 1 or line > len(starts):
        return max(line, 1)
    if isinstance(node, A.Section):
        return line  # the keyword alone
    i, n, depth = starts[line - 1] + col - 1, len(src), 0
    while i < n:
        c = src[i]
        if c == '"':
            j = src.find('"', i + 1)
            i = n if j < 0 else j + 1
            continue
        if c == "#":
            j = src.find("\n", i)
            i = n if j < 0 else j
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        elif c == "\n" and depth == 0:
            break
        i += 1
    return src.count("\n", 0, min(i, n)) + 1 if i < n else src.count("\n") + 1


def _attach_comments(units: list[_Unit], comments) -> list[_Comment]:
    """Give each comment to its unit; return the comments left for the end of the file."""
    by_line = sorted(units, key=lambda u: u.start)
    free: list[_Comment] = []
    k = 0
    for line, col, text in sorted(comments):
        while k < len(by_line) and by_line[k].end < line:
            k += 1
        if k < len(by_line) and by_line[k].start <= line <= by_line[k].end:
            by_line[k].inner.append(_Comment(line, col, text))
        else:
            free.append(_Comment(line, col, text))

    # walk units and own-line comments in source order, recording blank lines before each
    tail: list[_Comment] = []
    prev_end = 0
    fi = 0
    section_open = False  # the previous unit is a section keyword or one of its statements
    last_section: _Unit | None = None
    for u in by_line + [None]:
        limit = u.start if u is not None else float("inf")
        run = []
        while fi < len(free) and free[fi].line < limit:
            c = free[fi]
            c.blank_before = prev_end > 0 and c.line - prev_end > 1
            prev_end = c.line
            run.append(c)
            fi += 1
        if u is None or u.level == 0:
            # indented comments right after a section's last statement stay in that section
            if section_open and last_section is not None:
                while run and run[0].col > 1:
                    last_section.trailer.append(run.pop(0))
        if u is None:
            tail = run
            break
        u.leading = run
        u.blank_before = prev_end > 0 and u.start - prev_end > 1
        prev_end = u.end
        if isinstance(u.node, A.Section):
            last_section, section_open = u, True
        elif u.level == 0:
            section_open = False
    return tail


# ---------------------------------------------------------------- rendering
def _code(node) -> str:
    if isinstance(node, A.SpecFile):
        if node.kind == "library":
            return f"library {node.name}"
        return f"algorithm {node.name}" + (f" extends {node.extends}" if node.extends else "")
    if isinstance(node, A.Import):
        return f"import {node.name}"
    if isinstance(node, A.Data):
        return f"data {node.kind}"
    if isinstance(node, A.Def):
        return f"def {node.name}({', '.join(node.params)}) = {unparse(node.body)}"
    if isinstance(node, A.Section):
        return node.kind
    return unparse_stmt(node)


def _params_codes(stmts: list[A.Stmt]) -> list[str]:
    """Statements of a `params` section with `=` signs and doc strings in columns."""
    assigns = [s for s in stmts if isinstance(s, A.Assign)]
    lhs = {id(s): s.name + (f": {s.type}" if s.type is not None else "") for s in assigns}
    rhs = {id(s): unparse(s.value) for s in assigns}
    lw = max((len(t) for t in lhs.values()), default=0)
    vw = max((len(rhs[id(s)]) for s in assigns if s.doc is not None), default=0)
    out = []
    for s in stmts:
        if not isinstance(s, A.Assign):
            out.append(unparse_stmt(s))
            continue
        text = f"{lhs[id(s)].ljust(lw)} = {rhs[id(s)]}"
        if s.doc is not None:
            text = f'{text.ljust(lw + 3 + vw)}  "{s.doc}"'
        out.append(text)
    return out


def _render(spec: A.SpecFile, units: list[_Unit], tail: list[_Comment]) -> str:
    codes: list[str] = []  # the code of each unit, in order
    aligned: list[str] = []  # the rest of the current params section, aligned
    for u in units:
        if u.level == 0:
            aligned = []
            if isinstance(u.node, A.Section) and u.node.kind == "params":
                aligned = _params_codes(list(u.node.body))
        codes.append(aligned.pop(0) if u.level == 1 and aligned else _code(u.node))

    out: list[str] = []
    prev_item: _Unit | None = None  # the previous top-level line
    prev_level = 0
    section: _Unit | None = None

    def blank():
        if out and out[-1] != "":
            out.append("")

    def close_section():
        if section is not None and section.trailer:
            for c in section.trailer:
                if c.blank_before:
                    blank()
                out.append(INDENT + c.text)

    for u, code in zip(units, codes):
        indent = INDENT * u.level
        moved = u.inner[:-1]  # comments inside a wrapped statement, but the last
        last = u.inner[-1] if u.inner else None
        own = u.leading + moved  # comments written on their own lines before the code
        seps = [c.blank_before for c in u.leading] + [u.blank_before] + [False] * len(moved)
        if isinstance(u.node, A.SpecFile):
            first_sep = False  # comments before the header: blank lines as written
            prev_item = u
        elif u.level == 0:
            close_section()
            section = u if isinstance(u.node, A.Section) else None
            first_sep = _blank_between(prev_item.node if prev_item else None, u.node)
            if not isinstance(u.node, (A.Section, A.Def)):
                seps = [False] * len(seps)  # import and data lines stay together
            prev_item = u
        else:
            first_sep = seps[0] and prev_level == 1  # no blank line right after the keyword
        seps[0] = first_sep
        for c, sep in zip(own, seps):
            if sep:
                blank()
            out.append(indent + c.text)
        if seps[len(own)]:
            blank()
        line = indent + code
        if last is not None:
            line += "  " + last.text
        out.append(line)
        prev_level = u.level
    close_section()
    for c in tail:
        if c.blank_before:
            blank()
        out.append(c.text)
    return "\n".join(out) + "\n"


def _blank_between(a, b) -> bool:
    """Whether one blank line separates two consecutive top-level lines."""
    if a is None:
        return False
    return isinstance(a, (A.Section, A.Def)) or isinstance(b, (A.Section, A.Def))
