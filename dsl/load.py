"""Finding, reading and parsing spec files; resolving `extends` and `import` into one view.

`read_spec` accepts a path, a built-in name (`grpo`) or spec text. `resolve` follows the
`extends` chain and imports and returns a `Resolved` view: params merged by name, every other
section taken from the most derived file that writes it, and the defs of every import.
"""

from __future__ import annotations

import difflib
import stat
from dataclasses import dataclass, field
from pathlib import Path

from . import ast as A
from .errors import Span, SpecError
from .parser import decode, parse, source_lines

_SOURCES: dict[str, list[str]] = {}


def builtin_dir() -> Path:
    """The folder of the shipped spec files (package data of ``alignspec.algorithms``)."""
    import importlib.resources
    return Path(str(importlib.resources.files("alignspec.algorithms")))


def builtin_names(kind: str | None = "algorithm") -> list[str]:
    """Names of the shipped specs (libraries excluded unless kind is None)."""
    names = []
    for p in sorted(builtin_dir().glob("*.align")):
        if kind is None:
            names.append(p.stem)
            continue
        try:
            head = next((l for l in p.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")), "")
        except OSError:
            continue
        if head.split()[:1] == [kind]:
            names.append(p.stem)
    return names


def source_line(span: Span) -> str | None:
    lines = _SOURCES.get(span.file)
    if lines and 0 < span.line <= len(lines):
        return lines[span.line - 1]
    return None


def error(message: str, span: Span, kind: str, hint: str | None = None) -> SpecError:
    """A SpecError with the source line filled in from the file it points at."""
    return SpecError(message, span, kind=kind, hint=hint, source_line=source_line(span))


def did_you_mean(word: str, options) -> str | None:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else None


# A spec is a page of text (the largest built-in is under 3 KiB); anything larger is refused
# unread. Lark's LALR parser takes 5-20 s per MiB on a 2-core machine, so at 4 MiB a stray
# data file cost `check` 40 s and ~1 GB, and the language server that much on every keystroke.
MAX_SPEC_BYTES = 256 << 10


def too_large(path: str, n_bytes: int) -> SpecError | None:
    """The error for a spec of ``n_bytes`` over MAX_SPEC_BYTES (None when it fits)."""
    if n_bytes <= MAX_SPEC_BYTES:
        return None
    return SpecError(f"{path} is larger than {MAX_SPEC_BYTES >> 10} KiB; a spec file is a page of text",
                     Span(str(path), 0, 0, 0, 0), kind="io", hint="is this really a .align spec?")


def read_spec(ref: str | Path, *, relative_to: Path | None = None, at: Span | None = None) -> A.SpecFile:
    """Parse a spec given as text, a file path, or the name of a built-in.

    A ``str`` with a line break (or starting with ``algorithm``/``library``) is spec text; a bare
    name such as ``grpo`` is the built-in of that name even when a file or folder of that name
    is in the current directory (write ``./grpo`` for that one); a ``Path``, or a string with a
    ``/`` or an ``.align`` suffix, is a file."""
    if isinstance(ref, str) and ("\n" in ref or "\r" in ref
                                 or ref.lstrip().startswith(("algorithm ", "library "))):
        path = "<string>"
        if len(ref) > MAX_SPEC_BYTES // 4 and (err := too_large(path, len(ref.encode("utf-8", "surrogatepass")))):
            raise err
        _SOURCES[path] = source_lines(ref)
        return parse(ref, path)
    path = locate(ref, relative_to, at)
    name = _display(path)
    text = decode(_read_bounded(path), name)
    _SOURCES[name] = source_lines(text)
    return parse(text, name)


def _read_bounded(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_SPEC_BYTES; a directory, a device (/dev/zero),
    a FIFO or a socket is refused before it is opened (opening a FIFO would wait for a writer)."""
    where = Span(str(path), 0, 0, 0, 0)
    try:
        st = path.stat()
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror or e}", where, kind="io") from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError(f"{path} is a directory, not a spec file", where, kind="io",
                        hint="give a .align file, or a built-in name")
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{path} is not a regular file (a device, FIFO or socket), so it is not read", where,
                        kind="io", hint="give a .align file, or a built-in name")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror or e}", where, kind="io") from None
    if err := too_large(str(path), len(data)):
        raise err
    return data


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def is_bare_name(ref: str) -> bool:
    """``grpo``: no folder, no ``.align`` suffix -- the name of a built-in (or an import's sibling file)."""
    return "/" not in ref and "\\" not in ref and not ref.endswith(".align") and ref not in (".", "..")


def locate(ref: str | Path, relative_to: Path | None, at: Span | None) -> Path:
    """The file a reference names. Inside a spec (``relative_to``: its folder), ``import x`` or
    ``extends x`` is ``x.align`` beside it, else the built-in ``x``. From the command line or the
    API, a bare name is the built-in of that name, else the file of that name; a Path or
    anything with a folder or an ``.align`` suffix is a file."""
    text = str(ref)
    p = Path(text)
    bare = isinstance(ref, str) and is_bare_name(text)
    builtin = builtin_dir() / f"{text}.align"
    if relative_to is not None:  # import / extends inside a spec: a sibling file, else the built-in
        found = [relative_to / f"{text}.align", builtin] if bare else [relative_to / text, p]
    else:
        found = [builtin] if bare else []
    for c in found:
        try:
            if c.is_file():
                return c
        except OSError:  # e.g. a name longer than the file system allows
            continue
    try:
        if (relative_to is None or not bare) and p.exists():
            return p  # read_spec says what is wrong with it when it is no regular file
    except OSError:
        pass
    names = builtin_names(None)
    hint = did_you_mean(p.stem, names) or f"built-ins: {', '.join(builtin_names())}"
    msg = f"no spec file or built-in named {text!r}"
    if at is not None:
        raise error(msg, at, "unknown-spec", hint)
    raise SpecError(msg, Span(text, 0, 0, 0, 0), kind="unknown-spec", hint=hint)


@dataclass
class Resolved:
    """One algorithm with its `extends` chain and imports folded in."""

    file: A.SpecFile                       # the most derived file
    chain: list[A.SpecFile]                # base first
    params: dict[str, A.Assign] = field(default_factory=dict)
    sections: dict[str, A.Section] = field(default_factory=dict)
    data: A.Data | None = None
    defs: dict[str, A.Def] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.file.name


def resolve(spec: A.SpecFile) -> Resolved:
    chain = _extends_chain(spec)
    out = Resolved(file=spec, chain=chain)
    for f in chain:
        base_dir = Path(f.path).parent if f.path not in ("<string>",) else None
        for imp in f.imports:
            lib = read_spec(imp.name, relative_to=base_dir, at=imp.span)
            if lib.kind != "library":
                raise error(f"{imp.name!r} is an algorithm, not a library of functions", imp.span,
                            "import", "import only `library` specs (such as common)")
            for d in lib.defs:
                out.defs[d.name] = d
        seen_here: dict[str, A.Section] = {}
        own_defs: dict[str, Span] = {}
        for item in f.items:
            if isinstance(item, A.Section):
                if item.kind in seen_here and item.kind != "params":
                    first = seen_here[item.kind].span
                    raise error(f"section {item.kind!r} appears twice (first at line {first.line})",
                                item.span, "duplicate", "merge the two sections into one")
                seen_here[item.kind] = item
                if item.kind == "params":
                    for stmt in item.body:
                        out.params[getattr(stmt, "name", None) or ""] = stmt
                        if not isinstance(stmt, A.Assign):
                            raise error("only `name = value` lines belong in params", stmt.span, "syntax")
                else:
                    out.sections[item.kind] = item
            elif isinstance(item, A.Def):
                if item.name in own_defs:
                    raise error(f"def {item.name!r} is defined twice (first at line {own_defs[item.name].line})",
                                item.span, "duplicate", "give the second one another name")
                own_defs[item.name] = item.span
                out.defs[item.name] = item
            elif isinstance(item, A.Data):
                out.data = item
    return out


def _extends_chain(spec: A.SpecFile) -> list[A.SpecFile]:
    chain = [spec]
    seen = {_identity(spec)}
    cur = spec
    while cur.extends:
        base_dir = Path(cur.path).parent if cur.path != "<string>" else None
        base = read_spec(cur.extends, relative_to=base_dir, at=cur.span)
        if _identity(base) in seen:
            names = " → ".join([c.name for c in chain] + [base.name])
            raise error(f"`extends` forms a cycle: {names}", spec.span, "cycle",
                        "an algorithm cannot extend itself, directly or through others")
        if base.kind != "algorithm":
            raise error(f"{cur.extends!r} is a library; only algorithms can be extended", cur.span, "extends")
        seen.add(_identity(base))
        chain.append(base)
        cur = base
    return list(reversed(chain))


def _identity(f: A.SpecFile) -> str:
    """Which file a spec is: its resolved path (a name only for specs given as text)."""
    if f.path == "<string>":
        return f"<string>:{f.name}"
    try:
        return str(Path(f.path).resolve())
    except OSError:
        return f.path
