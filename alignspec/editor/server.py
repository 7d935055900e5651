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

import asyncio
import logging
import re
import sys
import threading
from pathlib import Path
from urllib.parse import unquote

from lsprotocol import types as T
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcParseError
from pygls.io_ import StdinAsyncReader, StdoutWriter, run_async
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.uris import from_fs_path, to_fs_path
from pygls.workspace.position_codec import ServerTextPosition, ServerTextRange

from alignspec.editor import analysis as an

log = logging.getLogger(__name__)
MAX_FRAME_BYTES = 64 << 20  # a frame's body: an open document (at most 256 KiB of spec) with its JSON escapes

_KINDS = {"section": T.CompletionItemKind.Module, "keyword": T.CompletionItemKind.Keyword,
          "function": T.CompletionItemKind.Function, "quantity": T.CompletionItemKind.Constant,
          "param": T.CompletionItemKind.Property, "variable": T.CompletionItemKind.Variable,
          "def": T.CompletionItemKind.Function, "role": T.CompletionItemKind.EnumMember}


class SpecProtocol(LanguageServerProtocol):
    """pygls' protocol, answering a request whose params do not fit the method with -32602
    (pygls logs it and answers nothing: the client waits forever)."""

    def structure_message(self, data):
        try:
            return super().structure_message(data)
        except JsonRpcException as e:
            if isinstance(data, dict) and "method" in data and data.get("id") is not None:
                err = JsonRpcInvalidParams(f"invalid params for {str(data['method'])[:100]}")
                self._send_response(data["id"], error=err.to_response_error())
            raise e from None


class _Frames:
    """The stdin reader for pygls' loop, resynchronized after a broken frame: a header whose
    Content-Length is not a number (or too large) is answered with -32700 and the bytes up to
    the next ``Content-Length:`` header are skipped (pygls alone waits for a header forever)."""

    HEADER = re.compile(rb"Content-Length:[ \t]*([^\r\n]*)\r?\n?$", re.I)

    def __init__(self, reader, protocol):
        self.reader, self.protocol = reader, protocol
        self.lost = False

    async def readline(self) -> bytes:
        line = await self.reader.readline()
        if self.lost:
            at = line.find(b"Content-Length:")
            if at < 0:
                return line if not line else b"X-Skipped: 1\r\n"  # (not blank: no frame ends here)
            self.lost, line = False, line[at:]
        m = self.HEADER.match(line)
        if m:
            value = m.group(1).strip()
            if not value.isdigit() or int(value) > MAX_FRAME_BYTES:
                self.lost = True
                shown = value[:40].decode("ascii", "replace")
                message = (f"Content-Length {shown!r} is not a frame length (a number, at most "
                           f"{MAX_FRAME_BYTES >> 20} MiB); the frame is skipped")
                self.protocol._send_data({"jsonrpc": "2.0", "id": None,  # (id null: the frame's is unknown)
                                          "error": {"code": JsonRpcParseError.CODE, "message": message}})
                return b"X-Skipped: 1\r\n"
            return b"Content-Length: " + value + b"\r\n"
        return line

    def readexactly(self, n: int):
        return self.reader.readexactly(n)


class SpecServer(LanguageServer):
    def __init__(self):
        super().__init__("alignspec", "0.1.0", protocol_cls=SpecProtocol)
        self.analyses: dict[str, an.Analysis] = {}

    def start_io(self, stdin=None, stdout=None):
        """pygls' stdio loop with a reader that survives broken frames (``_Frames``)."""
        self._stop_event = threading.Event()
        reader = _Frames(StdinAsyncReader(stdin or sys.stdin.buffer, self.thread_pool), self.protocol)
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
        try:
            asyncio.run(run_async(stop_event=self._stop_event, reader=reader, protocol=self.protocol,
                                  logger=log, error_handler=self.report_server_error))
        except BrokenPipeError:
            log.error("the client is gone; shutting down")
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            self.shutdown()

    def document(self, uri: str):
        """An open document (a request about another is -32602, not a read of the disk)."""
        doc = self.workspace.text_documents.get(unquote(uri))
        if doc is None:
            raise JsonRpcInvalidParams(f"{uri[:200]} is not an open document")
        return doc

    def analysis(self, uri: str) -> an.Analysis:
        doc = self.document(uri)
        a = self.analyses.get(uri)
        if a is None or a.text != doc.source.replace("\r\n", "\n").replace("\r", "\n"):
            a = _too_large(doc.source, _path(uri)) or an.analyze(doc.source, _path(uri))
            self.analyses[uri] = a
        return a

    def range_in(self, p: an.Place, lines: list[str] | None = None) -> T.Range:
        """A Place (code points) as a client Range for the file it is in."""
        if lines is None:
            lines = _read_lines(p.path)
        r = ServerTextRange(ServerTextPosition(p.line, p.col), ServerTextPosition(p.end_line, p.end_col))
        return self.workspace.position_codec.range_to_client_units(lines, r)


def _too_large(text: str, path: str) -> an.Analysis | None:
    """The analysis of a document over the spec file cap (dsl/load.py): that one problem,
    unparsed (a 1.4 MB document cost 11 s on every keystroke)."""
    from alignspec.dsl.errors import Span
    from alignspec.dsl.load import MAX_SPEC_BYTES, too_large
    if len(text) * 4 <= MAX_SPEC_BYTES or not (err := too_large(path, len(text.encode("utf-8", "surrogatepass")))):
        return None
    err.span = Span(path, 1, 1, 1, 1)
    a = an.Analysis(path, "")
    a.errors = [err]
    return a


def _path(uri: str) -> str:
    try:
        path = to_fs_path(uri) or uri
    except Exception:  # noqa: BLE001  (a URI pygls cannot take apart)
        path = uri
    return path.replace("\x00", "\\x00")  # a NUL byte is no file name (open() raises)


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return []


def _uri(path: str) -> str:
    return from_fs_path(str(Path(path).resolve())) or path


def _position(server: SpecServer, uri: str, pos: T.Position) -> tuple[an.Analysis, int, int]:
    doc = server.document(uri)
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
    doc = ls.document(params.text_document.uri)
    if _too_large(doc.source, ""):
        return []
    out = an.formatted(doc.source, _path(params.text_document.uri))
    if out is None or out == doc.source:
        return []
    lines = doc.source.split("\n")
    end = ServerTextRange(ServerTextPosition(0, 0), ServerTextPosition(len(lines) - 1, len(lines[-1])))
    return [T.TextEdit(range=ls.workspace.position_codec.range_to_client_units(lines, end), new_text=out)]


def main() -> None:
    """Serve over stdin/stdout until the client exits."""
    server.start_io()
