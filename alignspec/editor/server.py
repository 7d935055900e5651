"""`alignspec lsp`: the language server for spec files, on pygls, over stdio.

- diagnostics as you type (open, change, save): the checker's problem, at the position and with
  the hint that `alignspec check` prints (a problem inside a base spec or library is shown on the
  `extends`/`import` line, with its own file:line:col);
- hover: a parameter's doc string and value, a built-in function's signature and level rule,
  a runtime quantity's meaning and level, a name's defining statement (and level);
- go to definition: statements, parameters (inherited ones in the base file), `def`s (in imported
  libraries), and the files that `extends`, `import` and `run(...)` name, built-ins included;
- completion: section keywords, functions, quantities, parameters, names in scope, roles;
- formatting: `alignspec fmt` (no edit when the text does not parse);
- document symbols (the outline): imports, defs, sections and their statements.

The answers come from `alignspec.editor.analysis`; this module converts positions between the
checker's code points and the client's units (UTF-16 unless the client asks otherwise).
"""

from __future__ import annotations

from pathlib import Path

from lsprotocol import types as T
from pygls.lsp.server import LanguageServer
from pygls.uris import from_fs_path, to_fs_path
from pygls.workspace.position_codec import ServerTextPosition, ServerTextRange

from alignspec.editor import analysis as an

_KINDS = {"section": T.CompletionItemKind.Module, "keyword": T.CompletionItemKind.Keyword,
          "function": T.CompletionItemKind.Function, "quantity": T.CompletionItemKind.Constant,
          "param": T.CompletionItemKind.Property, "variable": T.CompletionItemKind.Variable,
          "def": T.CompletionItemKind.Function, "role": T.CompletionItemKind.EnumMember}


class SpecServer(LanguageServer):
    def __init__(self):
        super().__init__("alignspec", "0.1.0")
        self.analyses: dict[str, an.Analysis] = {}

    def analysis(self, uri: str) -> an.Analysis:
        doc = self.workspace.get_text_document(uri)
        a = self.analyses.get(uri)
        if a is None or a.text != doc.source.replace("\r\n", "\n").replace("\r", "\n"):
            a = an.analyze(doc.source, _path(uri))
            self.analyses[uri] = a
        return a

    def range_in(self, p: an.Place, lines: list[str] | None = None) -> T.Range:
        """A Place (code points) as a client Range for the file it is in."""
        if lines is None:
            lines = _read_lines(p.path)
        r = ServerTextRange(ServerTextPosition(p.line, p.col), ServerTextPosition(p.end_line, p.end_col))
        return self.workspace.position_codec.range_to_client_units(lines, r)


def _path(uri: str) -> str:
    return to_fs_path(uri) or uri


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return []


def _uri(path: str) -> str:
    return from_fs_path(str(Path(path).resolve())) or path


def _position(server: SpecServer, uri: str, pos: T.Position) -> tuple[an.Analysis, int, int]:
    doc = server.workspace.get_text_document(uri)
    p = doc.position_from_client_units(pos)
    return server.analysis(uri), p.line, p.character


server = SpecServer()


def publish(ls: SpecServer, uri: str) -> None:
    a = ls.analysis(uri)
    diagnostics = [T.Diagnostic(range=ls.range_in(where, a.lines), message=message,
                                severity=T.DiagnosticSeverity.Error, code=e.kind, source="alignspec",
                                data={"kind": e.kind, "hint": e.hint})
                   for where, message, e in an.problem_places(a)]
    ls.text_document_publish_diagnostics(T.PublishDiagnosticsParams(uri=uri, diagnostics=diagnostics))


@server.feature(T.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: SpecServer, params: T.DidOpenTextDocumentParams):
    publish(ls, params.text_document.uri)


@server.feature(T.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: SpecServer, params: T.DidChangeTextDocumentParams):
    publish(ls, params.text_document.uri)


@server.feature(T.TEXT_DOCUMENT_DID_SAVE)
def did_save(ls: SpecServer, params: T.DidSaveTextDocumentParams):
    ls.analyses.pop(params.text_document.uri, None)  # files it extends may have changed too
    publish(ls, params.text_document.uri)


@server.feature(T.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: SpecServer, params: T.DidCloseTextDocumentParams):
    ls.analyses.pop(params.text_document.uri, None)
    ls.text_document_publish_diagnostics(T.PublishDiagnosticsParams(uri=params.text_document.uri, diagnostics=[]))


@server.feature(T.TEXT_DOCUMENT_HOVER)
def hover(ls: SpecServer, params: T.HoverParams):
    a, line, col = _position(ls, params.text_document.uri, params.position)
    found = an.hover(a, line, col)
    if found is None:
        return None
    text, where = found
    return T.Hover(contents=T.MarkupContent(kind=T.MarkupKind.Markdown, value=text),
                   range=ls.range_in(where, a.lines))


@server.feature(T.TEXT_DOCUMENT_DEFINITION)
def definition(ls: SpecServer, params: T.DefinitionParams):
    a, line, col = _position(ls, params.text_document.uri, params.position)
    where = an.definition(a, line, col)
    if where is None:
        return None
    lines = a.lines if an.same_file(where.path, a.path) else None
    uri = params.text_document.uri if lines is not None else _uri(where.path)
    return T.Location(uri=uri, range=ls.range_in(where, lines))


@server.feature(T.TEXT_DOCUMENT_COMPLETION, T.CompletionOptions(trigger_characters=["(", "["]))
def completion(ls: SpecServer, params: T.CompletionParams):
    a, line, col = _position(ls, params.text_document.uri, params.position)
    items = [T.CompletionItem(label=c.label, kind=_KINDS.get(c.kind), detail=c.detail or None,
                              documentation=T.MarkupContent(kind=T.MarkupKind.Markdown, value=c.doc) if c.doc else None)
             for c in an.completions(a, line, col)]
    return T.CompletionList(is_incomplete=False, items=items)


_SYMBOLS = {"section": T.SymbolKind.Namespace, "def": T.SymbolKind.Function, "import": T.SymbolKind.Module,
            "statement": T.SymbolKind.Variable, "param": T.SymbolKind.Constant, "term": T.SymbolKind.Event}


@server.feature(T.TEXT_DOCUMENT_DOCUMENT_SYMBOL)
def document_symbol(ls: SpecServer, params: T.DocumentSymbolParams):
    a = ls.analysis(params.text_document.uri)

    def symbol(o: an.Outline) -> T.DocumentSymbol:
        rng = ls.range_in(o.where, a.lines)
        return T.DocumentSymbol(name=o.name, kind=_SYMBOLS[o.kind], range=rng, selection_range=rng,
                                children=[symbol(c) for c in o.children] or None)
    return [symbol(o) for o in an.outline(a)]


@server.feature(T.TEXT_DOCUMENT_FORMATTING)
def formatting(ls: SpecServer, params: T.DocumentFormattingParams):
    doc = ls.workspace.get_text_document(params.text_document.uri)
    out = an.formatted(doc.source, _path(params.text_document.uri))
    if out is None or out == doc.source:
        return []
    lines = doc.source.split("\n")
    end = ServerTextRange(ServerTextPosition(0, 0), ServerTextPosition(len(lines) - 1, len(lines[-1])))
    return [T.TextEdit(range=ls.workspace.position_codec.range_to_client_units(lines, end), new_text=out)]


def main() -> None:
    """Serve over stdin/stdout until the client exits."""
    server.start_io()
