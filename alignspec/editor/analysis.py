"""What the language server knows about one open spec: its problem, its names, and what a word means.

Pure functions over text (no LSP types), so they are tested directly and the server only
converts positions. Positions here are 0-based lines and 0-based columns in code points
(`Place`); the checker's spans are 1-based with an exclusive end column.

- `analyze(text, path)` parses, resolves (`extends`, `import`) and checks the text as the file
  at `path` (so relative `extends` work), keeping the first problem as `check` reports it and
  whatever could be built before it.
- `symbols(analysis)` lists every name the spec can read: parameters (inherited ones too),
  statements, loss terms, `def`s (imported too), each with the place that defines it.
- `hover`, `definition`, `completions` answer for a position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from alignspec.dsl import ast as A
from alignspec.dsl import vocab
from alignspec.dsl.builtins import FUNCTIONS, QUANTITIES, SECTIONS
from alignspec.dsl.errors import Span, SpecError
from alignspec.dsl.unparse import unparse, unparse_stmt

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Place:
    """A region of a file: 0-based lines and columns (code points), end exclusive."""

    path: str
    line: int
    col: int
    end_line: int
    end_col: int


def place(span: Span) -> Place:
    """The checker's 1-based span as a 0-based Place (a span with no line is the file's start)."""
    if not span.line:
        return Place(span.file, 0, 0, 0, 0)
    end_line, end_col = (span.end_line, span.end_col) if span.end_line else (span.line, span.col)
    if (end_line, end_col) < (span.line, span.col):
        end_line, end_col = span.line, span.col
    return Place(span.file, span.line - 1, span.col - 1, end_line - 1, end_col - 1)


@dataclass
class Symbol:
    name: str
    kind: str                 # param | statement | term | def
    where: Place              # the defining name
    text: str                 # the defining statement, as fmt writes it
    section: str | None = None
    doc: str | None = None
    value: object = None      # a parameter's value
    type: str | None = None   # a parameter's type
    level: str | None = None  # a statement's level, once the spec checks


@dataclass
class Analysis:
    path: str
    text: str
    tree: A.SpecFile | None = None
    resolved: object = None
    spec: object = None
    errors: list[SpecError] = field(default_factory=list)
    symbols: dict[str, Symbol] = field(default_factory=dict)

    @property
    def error(self) -> SpecError | None:
        return self.errors[0] if self.errors else None

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")


def analyze(text: str, path: str) -> Analysis:
    """Parse, resolve and check `text` as the spec file at `path`."""
    from alignspec.dsl.check import check_collecting
    from alignspec.dsl.load import resolve
    from alignspec.dsl.parser import normalize_newlines, parse
    out = Analysis(path, normalize_newlines(text))
    try:
        out.tree = parse(text, path)
        out.resolved = resolve(out.tree)
        out.spec, out.errors = check_collecting(out.resolved)
    except SpecError as e:
        out.errors = [e]
    except RecursionError:  # pragma: no cover - the parser bounds nesting
        out.errors = [SpecError("expression nested too deeply", Span(path, 1, 1, 1, 1), kind="too-deep")]
    out.symbols = _symbols(out)
    return out


def same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def problem_places(a: Analysis) -> list[tuple[Place, str, SpecError]]:
    """Where in this document to show each of its problems, and the message to show there.

    A problem inside another file (a base spec, a library) is shown on the `extends` or
    `import` line that brings that file in (else on the header), prefixed by its own place."""
    out = []
    for e in a.errors:
        msg = e.message + (f"\nhint: {e.hint}" if e.hint else "")
        if same_file(e.span.file, a.path) or not a.tree:
            out.append((place(e.span), msg, e))
            continue
        at = a.tree.span
        for imp in a.tree.imports:
            target = _file_of(imp.name, a.path)
            if target and same_file(target, e.span.file):
                at = imp.span
        out.append((place(at), f"{e.span}: {msg}" if e.span.line else f"{e.span.file}: {msg}", e))
    return out


# ---------------------------------------------------------------- names
def _lines_of(path: str, a: Analysis) -> list[str]:
    if same_file(path, a.path):
        return a.lines
    try:
        return Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return []


def _name_place(span: Span, name: str, a: Analysis) -> Place:
    """The place of `name` on the first line of `span` (defs and headers carry no name span)."""
    lines = _lines_of(span.file, a)
    if 0 < span.line <= len(lines):
        for m in _WORD.finditer(lines[span.line - 1], max(span.col - 1, 0)):
            if m.group() == name:
                return Place(span.file, span.line - 1, m.start(), span.line - 1, m.end())
    return place(span)


def _symbols(a: Analysis) -> dict[str, Symbol]:
    out: dict[str, Symbol] = {}
    res = a.resolved
    if res is not None:
        params, sections, defs = res.params, res.sections, res.defs
    elif a.tree is not None:
        params = {s.name: s for sec in a.tree.sections("params") for s in sec.body if isinstance(s, A.Assign)}
        sections = {s.kind: s for s in a.tree.items if isinstance(s, A.Section) and s.kind != "params"}
        defs = {d.name: d for d in a.tree.defs}
    else:
        return out
    checked = getattr(a.spec, "params", {}) or {}
    for name, st in params.items():
        if not isinstance(st, A.Assign):
            continue
        p = checked.get(name)
        out[name] = Symbol(name, "param", place(st.name_span), unparse_stmt(st), "params", st.doc,
                           p.value if p else None, p.type if p else st.type)
    levels = {}
    if a.spec is not None:
        for _, attrs in a.spec.graph.nodes(data=True):
            if attrs.get("name"):
                levels[attrs["name"]] = attrs.get("level")
    for kind, sec in sections.items():
        for st in sec.body:
            if isinstance(st, A.Assign) and kind not in ("train",):
                out[st.name] = Symbol(st.name, "statement", place(st.name_span), unparse_stmt(st), kind,
                                      level=levels.get(st.name))
            elif isinstance(st, A.Minimize) and st.name:
                out[st.name] = Symbol(st.name, "term", _name_place(st.span, st.name, a), unparse_stmt(st), kind,
                                      level="batch")
    for name, d in defs.items():
        text = f"def {d.name}({', '.join(d.params)}) = {unparse(d.body)}"
        out[name] = Symbol(name, "def", _name_place(d.span, name, a), text)
    return out


def word_at(a: Analysis, line: int, col: int) -> tuple[str, int, int] | None:
    """The identifier under (or right before) the cursor: (word, start column, end column)."""
    lines = a.lines
    if not 0 <= line < len(lines):
        return None
    text = lines[line]
    if "#" in text and col > text.index("#") and not _in_string(text, text.index("#")):
        return None
    for m in _WORD.finditer(text):
        if m.start() <= col <= m.end():
            return m.group(), m.start(), m.end()
    return None


def _in_string(text: str, i: int) -> bool:
    return text[:i].count('"') % 2 == 1


# ---------------------------------------------------------------- other files
def _file_of(ref: str, relative_to: str) -> str | None:
    """The path of the spec that `extends REF`, `import REF` or `run(REF)` names (built-ins too)."""
    from alignspec.dsl.load import read_spec
    try:
        f = read_spec(ref, relative_to=Path(relative_to).parent)
    except SpecError:
        return None
    return f.path if f.path != "<string>" else None


def _header_place(path: str) -> Place:
    from alignspec.dsl.load import read_spec
    try:
        f = read_spec(path)
    except SpecError:
        return Place(path, 0, 0, 0, 0)
    p = place(f.span)
    return Place(path, p.line, p.col, p.line, p.col)


def _file_reference(a: Analysis, line: int, word: str) -> str | None:
    """`word` on `line` names another spec file: an `extends` base, an import, a pipeline stage's spec."""
    t = a.tree
    text = a.lines[line] if 0 <= line < len(a.lines) else ""
    if t is not None:
        if t.extends == word and t.span.line - 1 == line:
            return _file_of(word, a.path)
        if any(i.name == word and i.span.line - 1 == line for i in t.imports):
            return _file_of(word, a.path)
    if re.search(rf"^\s*(algorithm\s+\w+\s+extends|import)\s+{word}\b", text) or \
            re.search(rf"\brun\s*\(\s*{word}\b", text):
        return _file_of(word, a.path)
    return None


# ---------------------------------------------------------------- answers
def definition(a: Analysis, line: int, col: int) -> Place | None:
    """Where the name under the cursor is defined: a statement, a parameter (in a base spec too),
    a def (in an imported library too), or the spec file an `extends`/`import`/`run` names."""
    w = word_at(a, line, col)
    if w is None:
        return None
    word = w[0]
    target = _file_reference(a, line, word)
    if target:
        return _header_place(target)
    sym = a.symbols.get(word)
    return sym.where if sym else None


def hover(a: Analysis, line: int, col: int) -> tuple[str, Place] | None:
    """Markdown about the word under the cursor, and the word's place."""
    w = word_at(a, line, col)
    if w is None:
        return None
    word, start, end = w
    here = Place(a.path, line, start, line, end)
    target = _file_reference(a, line, word)
    if target:
        return f"spec `{word}`: `{target}`", here
    sym = a.symbols.get(word)
    if sym is not None:
        return _describe_symbol(sym, a), here
    text = vocab.describe_function(word) if word in FUNCTIONS else vocab.describe_quantity(word)
    if text:
        return text, here
    if word in SECTIONS and start == 0:
        return f"section `{word}`", here
    return None


def _describe_symbol(sym: Symbol, a: Analysis) -> str:
    where = ""
    if not same_file(sym.where.path, a.path):
        where = f"\n\ndefined in `{sym.where.path}`, line {sym.where.line + 1}"
    if sym.kind == "param":
        head = f"parameter `{sym.name}`" + (f": {sym.type}" if sym.type else "")
        if sym.value is not None:
            head += f" = `{sym.value!r}`"
        return "\n\n".join(x for x in (head, sym.doc, f"```alignspec\n{sym.text}\n```") if x) + where
    if sym.kind == "def":
        return f"function defined in the language\n\n```alignspec\n{sym.text}\n```" + where
    level = f", {sym.level}-level" if sym.level else ""
    return f"`{sym.name}` ({sym.section} section{level})\n\n```alignspec\n{sym.text}\n```" + where


@dataclass(frozen=True)
class Completion:
    label: str
    kind: str      # keyword | section | function | quantity | param | variable | def | role
    detail: str = ""
    doc: str = ""


def completions(a: Analysis, line: int, col: int) -> list[Completion]:
    """What may be written at the cursor: section keywords at the start of a line, else functions,
    quantities, parameters, defs, names in scope, roles and keywords."""
    text = a.lines[line][:col] if 0 <= line < len(a.lines) else ""
    out: list[Completion] = []
    if not text.strip() and not text[:1].isspace():
        out += [Completion(s, "section", "section") for s in SECTIONS]
        out += [Completion(k, "keyword", "keyword") for k in ("algorithm", "library", "import", "data", "def")]
        return out
    for name, fn in FUNCTIONS.items():
        s = vocab.signature(fn)
        out.append(Completion(name, "function", s.text + (f"  ({s.levels})" if s.levels else ""),
                              vocab.describe_function(name) or ""))
    for name, q in QUANTITIES.items():
        out.append(Completion(name, "quantity", f"{q.level}-level", vocab.describe_quantity(name) or ""))
    for word in vocab.PSEUDO_WORDS:
        out.append(Completion(word, "quantity", "sampler / scorer argument"))
    for sym in a.symbols.values():
        kind = {"param": "param", "def": "def"}.get(sym.kind, "variable")
        detail = sym.text if sym.kind != "param" else f"parameter = {sym.value!r}"
        out.append(Completion(sym.name, kind, detail, sym.doc or ""))
    roles = set(vocab.ROLE_WORDS) | set(getattr(a.spec, "roles", {}) or {})
    out += [Completion(r, "role", "role within a group") for r in sorted(roles)]
    out += [Completion(k, "keyword", "keyword") for k in vocab.KEYWORDS + vocab.SCOPES + vocab.OPERATOR_WORDS
            + vocab.CONSTANTS]
    return out


@dataclass
class Outline:
    name: str
    kind: str                 # section | def | import | statement | param | term
    where: Place              # the whole item
    children: list["Outline"] = field(default_factory=list)


def outline(a: Analysis) -> list[Outline]:
    """The file's items for an editor's outline: imports, defs, and sections with their statements."""
    if a.tree is None:
        return []
    out = []
    for item in a.tree.items:
        if isinstance(item, A.Import):
            out.append(Outline(item.name, "import", place(item.span)))
        elif isinstance(item, A.Def):
            out.append(Outline(item.name, "def", place(item.span)))
        elif isinstance(item, A.Section):
            kids = []
            for st in item.body:
                name = getattr(st, "name", None) or ("minimize" if isinstance(st, A.Minimize) else "keep")
                kind = "param" if item.kind == "params" else "term" if isinstance(st, A.Minimize) else "statement"
                kids.append(Outline(name, kind, place(st.span)))
            out.append(Outline(item.kind, "section", place(item.span), kids))
    return out


def formatted(text: str, path: str) -> str | None:
    """The canonical text (`alignspec fmt`), or None when the text does not parse."""
    from alignspec.dsl.fmt import format_text
    try:
        return format_text(text, path)
    except SpecError:
        return None
