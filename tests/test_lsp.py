"""`alignspec lsp`, driven over stdio by pygls' own language client (JSON-RPC over pipes).

One server process serves every test of this file (starting it costs about a second); each test
opens its own document. Checked: a broken spec gets the diagnostic that `check --format json`
reports (same position, message, kind and hint); hover on a built-in function shows its level
rule, on a parameter its doc and value; go to definition jumps into the extended built-in spec
and the imported library, and from `extends NAME` to that file; completion offers functions,
quantities and names in scope; formatting returns `alignspec fmt`'s text.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lsprotocol import types as T
from pygls.lsp.client import LanguageClient
from pygls.uris import from_fs_path, to_fs_path

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad" / "unknown_name_quantity.align"

VARIANT = """\
# a variant of GRPO
algorithm my_variant extends grpo
import common

params
  eps_high = 0.3  "upper clip range"

loss
  ratio = exp(logp - logp_old)
  pg = min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
  minimize -mean(mean_tokens(pg - beta * k3(logp, logp_ref)))
"""


class Session:
    """A running server and a client on an event loop of its own."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.client = LanguageClient("alignspec-tests", "1")
        self.diagnostics: dict[str, asyncio.Future] = {}

        @self.client.feature(T.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
        def _diagnostics(params: T.PublishDiagnosticsParams):
            fut = self.diagnostics.get(params.uri)
            if fut is not None and not fut.done():
                fut.set_result(params.diagnostics)

        self.run(self.client.start_io(sys.executable, "-m", "alignspec", "lsp", cwd=str(ROOT)))
        self.run(self.client.initialize_async(T.InitializeParams(
            capabilities=T.ClientCapabilities(), root_uri=from_fs_path(str(ROOT)))))
        self.client.initialized(T.InitializedParams())

    def run(self, coro, timeout=60):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def open(self, path: Path, text: str) -> list[T.Diagnostic]:
        uri = from_fs_path(str(path))
        self.diagnostics[uri] = self.loop.create_future()
        self.client.text_document_did_open(T.DidOpenTextDocumentParams(
            T.TextDocumentItem(uri=uri, language_id="alignspec", version=1, text=text)))
        return list(self.run(self.diagnostics[uri]))

    def change(self, path: Path, text: str, version: int) -> list[T.Diagnostic]:
        uri = from_fs_path(str(path))
        self.diagnostics[uri] = self.loop.create_future()
        self.client.text_document_did_change(T.DidChangeTextDocumentParams(
            T.VersionedTextDocumentIdentifier(uri=uri, version=version),
            [T.TextDocumentContentChangeWholeDocument(text=text)]))
        return list(self.run(self.diagnostics[uri]))

    def close(self):
        self.run(self.client.shutdown_async(None))
        self.client.exit(None)
        self.run(self.client.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def lsp():
    s = Session()
    yield s
    s.close()


def _doc(path: Path) -> T.TextDocumentIdentifier:
    return T.TextDocumentIdentifier(uri=from_fs_path(str(path)))


def _pos(text: str, needle: str, nth: int = 0, offset: int = 0) -> T.Position:
    """The position of the nth occurrence of needle (plus offset characters)."""
    idx = -1
    for _ in range(nth + 1):
        idx = text.index(needle, idx + 1)
    idx += offset
    line = text.count("\n", 0, idx)
    return T.Position(line=line, character=idx - (text.rfind("\n", 0, idx) + 1))


def test_broken_spec_gets_the_checkers_diagnostic(lsp, tmp_path):
    path = tmp_path / BAD.name
    text = BAD.read_text()
    path.write_text(text)
    diags = lsp.open(path, text)
    r = subprocess.run([sys.executable, "-m", "alignspec", "check", "--format", "json", str(path)],
                       capture_output=True, text=True, timeout=60)
    (want,) = json.loads(r.stdout)
    (d,) = diags
    assert (d.range.start.line + 1, d.range.start.character + 1) == (want["line"], want["column"]) == (7, 30)
    assert (d.range.end.line + 1, d.range.end.character + 1) == (want["end_line"], want["end_column"])
    assert d.message == f"{want['message']}\nhint: {want['hint']}"
    assert d.code == want["kind"] == "unknown-name" and d.severity == T.DiagnosticSeverity.Error
    # fixing the text clears it, breaking it again brings it back
    assert lsp.change(path, text.replace("lgp", "logp"), 2) == []
    assert len(lsp.change(path, text, 3)) == 1


def test_syntax_error_and_a_problem_in_an_imported_library(lsp, tmp_path):
    diags = lsp.open(tmp_path / "syntax.align", "algorithm x\nloss\n  minimize -mean(logp\n")
    (d,) = diags
    assert d.code == "syntax" and d.message.startswith("unexpected end of file") and d.range.start.line == 2
    lib = tmp_path / "mylib.align"
    lib.write_text("library mylib\n\ndef f(x) = x + nope\n")
    text = "algorithm y\nimport mylib\ndata demonstrations\nloss\n  minimize -mean(mean_tokens(logp))\n"
    (d,) = lsp.open(tmp_path / "uses_lib.align", text)
    assert d.range.start.line == 1                 # shown on the import line
    assert "mylib.align:3:" in d.message and "nope" in d.message


def test_hover_function_parameter_quantity_and_name(lsp, tmp_path):
    path = tmp_path / "my_variant.align"
    path.write_text(VARIANT)
    assert lsp.open(path, VARIANT) == []
    h = lsp.run(lsp.client.text_document_hover_async(T.HoverParams(_doc(path), _pos(VARIANT, "mean_tokens", 0, 2))))
    assert "mean_tokens: action → response" in h.contents.value
    h = lsp.run(lsp.client.text_document_hover_async(T.HoverParams(_doc(path), _pos(VARIANT, "eps_high", 1, 1))))
    assert "upper clip range" in h.contents.value and "0.3" in h.contents.value
    h = lsp.run(lsp.client.text_document_hover_async(T.HoverParams(_doc(path), _pos(VARIANT, "logp_ref", 0, 1))))
    assert "reference" in h.contents.value and "action-level" in h.contents.value
    h = lsp.run(lsp.client.text_document_hover_async(T.HoverParams(_doc(path), _pos(VARIANT, "A)", 0, 0))))
    assert "advantage section, response-level" in h.contents.value and "group_mean(r)" in h.contents.value


def test_definition_in_extended_and_imported_builtins(lsp, tmp_path):
    path = tmp_path / "my_variant.align"
    path.write_text(VARIANT)
    lsp.open(path, VARIANT)
    grpo = ROOT / "algorithms" / "grpo.align"
    grpo_lines = grpo.read_text().splitlines()

    def goto(pos):
        loc = lsp.run(lsp.client.text_document_definition_async(T.DefinitionParams(_doc(path), pos)))
        return Path(to_fs_path(loc.uri)), loc.range

    # `A` is defined in grpo's advantage section
    where, rng = goto(_pos(VARIANT, "* A", 0, 2))
    assert where == grpo and grpo_lines[rng.start.line][rng.start.character:rng.end.character] == "A"
    assert grpo_lines[rng.start.line].strip().startswith("A = (r - group_mean(r))")
    # `eps` is an inherited parameter
    where, rng = goto(_pos(VARIANT, "- eps,", 0, 3))
    assert where == grpo and grpo_lines[rng.start.line].strip().startswith("eps")
    # `extends grpo` jumps to the file's header
    where, rng = goto(_pos(VARIANT, "extends grpo", 0, 9))
    assert where == grpo and grpo_lines[rng.start.line].startswith("algorithm grpo")
    # `k3` is a def in the imported common library
    common = ROOT / "algorithms" / "common.align"
    where, rng = goto(_pos(VARIANT, "k3", 0, 1))
    assert where == common
    assert common.read_text().splitlines()[rng.start.line].startswith("def k3(")
    # a name of this file stays in this file
    where, rng = goto(_pos(VARIANT, "ratio *", 0, 1))
    assert where == path and rng.start.line == 8


def test_completion_offers_functions_quantities_and_names(lsp, tmp_path):
    path = tmp_path / "my_variant.align"
    lsp.open(path, VARIANT)
    res = lsp.run(lsp.client.text_document_completion_async(T.CompletionParams(_doc(path), _pos(VARIANT, "exp(", 0, 4))))
    items = {i.label: i for i in res.items}
    assert items["group_mean"].kind == T.CompletionItemKind.Function and "response → group" in items["group_mean"].detail
    assert items["logp_ref"].kind == T.CompletionItemKind.Constant
    assert items["eps_high"].kind == T.CompletionItemKind.Property and items["A"].kind == T.CompletionItemKind.Variable
    assert items["k3"].kind == T.CompletionItemKind.Function
    res = lsp.run(lsp.client.text_document_completion_async(T.CompletionParams(_doc(path), T.Position(7, 0))))
    assert {"params", "loss", "advantage"} <= {i.label for i in res.items}


def test_formatting_is_fmt(lsp, tmp_path):
    from alignspec.dsl.fmt import format_text
    messy = "algorithm m   extends grpo\nloss\n    ratio=exp( logp-logp_old )   # r\n    minimize  -token_mean_all(ratio*A)\n"
    path = tmp_path / "messy.align"
    lsp.open(path, messy)
    edits = lsp.run(lsp.client.text_document_formatting_async(T.DocumentFormattingParams(
        _doc(path), T.FormattingOptions(tab_size=2, insert_spaces=True))))
    (e,) = edits
    assert e.range.start == T.Position(0, 0) and e.new_text == format_text(messy)
    assert "  ratio = exp(logp - logp_old)  # r\n" in e.new_text
    lsp.open(tmp_path / "broken.align", "algorithm b\nloss\n  x = (\n")
    assert tuple(lsp.run(lsp.client.text_document_formatting_async(T.DocumentFormattingParams(
        _doc(tmp_path / "broken.align"), T.FormattingOptions(tab_size=2, insert_spaces=True))))) == ()


def test_each_independent_problem_is_a_diagnostic(lsp, tmp_path):
    text = ("algorithm two\ndata pairs\n\nparams\n  beta = 0.1\n\nloss\n  h = beta * sum_tokens(logp - lgp_ref)\n"
            "  g = clip(h, 0)\n  minimize -mean(logsigmoid(h[chosen] - h[rejected]))\n")
    diags = lsp.open(tmp_path / "two.align", text)
    assert [(d.range.start.line, d.range.start.character, d.code) for d in diags] == [
        (7, 31, "unknown-name"), (8, 6, "arity")]


# ---------------------------------------------------------------- the analysis, without the protocol
def test_problem_in_a_base_spec_is_shown_on_the_header(tmp_path):
    from alignspec.editor.analysis import analyze, problem_places
    (tmp_path / "base.align").write_text("algorithm base\ndata pairs\nloss\n  minimize -mean(sum_tokens(lgp))\n")
    text = "# child\nalgorithm child extends base\n"
    a = analyze(text, str(tmp_path / "child.align"))
    ((where, message, e),) = problem_places(a)
    assert (where.line, where.col) == (1, 0)
    assert message.startswith(f"{e.span.file}:4:29: unknown name 'lgp'") and e.span.file.endswith("base.align")


def test_pipeline_stage_jumps_to_its_spec_and_quantities_hover():
    from alignspec.editor.analysis import analyze, definition, hover
    rlhf = ROOT / "algorithms" / "rlhf.align"
    text = rlhf.read_text()
    a = analyze(text, str(rlhf))
    pos = _pos(text, "run(reward_model", 0, 6)
    where = definition(a, pos.line, pos.character)
    assert Path(where.path).resolve() == ROOT / "algorithms" / "reward_model.align"
    assert hover(a, pos.line, pos.character)[0].startswith("spec `reward_model`")
    grpo = (ROOT / "algorithms" / "grpo.align").read_text()
    a = analyze(grpo, str(ROOT / "algorithms" / "grpo.align"))
    pos = _pos(grpo, "logp_old)", 0, 2)
    text, _ = hover(a, pos.line, pos.character)
    assert "`logp_old`: action-level" in text and "no gradient" in text
    pos = _pos(grpo, "\nparams", 0, 1)
    assert definition(a, pos.line, pos.character) is None


def test_document_symbols_outline_the_file(lsp, tmp_path):
    path = tmp_path / "my_variant.align"
    lsp.open(path, VARIANT)
    syms = lsp.run(lsp.client.text_document_document_symbol_async(T.DocumentSymbolParams(_doc(path))))
    assert [s.name for s in syms] == ["common", "params", "loss"]
    assert [c.name for c in syms[2].children] == ["ratio", "pg", "minimize"]
    assert syms[1].children[0].name == "eps_high" and syms[1].children[0].kind == T.SymbolKind.Constant


# ---------------------------------------------------------------- hostile clients (issue 23)
class Raw:
    """`alignspec lsp` over raw pipes: frames written by hand, answers read with a deadline."""

    def __init__(self):
        import os
        self.p = subprocess.Popen([sys.executable, "-m", "alignspec", "lsp"], cwd=str(ROOT), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.fd = self.p.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.request(0, "initialize", {"capabilities": {}, "processId": None, "rootUri": None})
        self.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})

    def frame(self, body: bytes, length=None):
        head = f"Content-Length: {len(body) if length is None else length}\r\n\r\n".encode()
        self.p.stdin.write(head + body)
        self.p.stdin.flush()

    def send(self, msg: dict):
        self.frame(json.dumps(msg).encode())

    def request(self, mid, method, params, timeout=30.0):
        self.send({"jsonrpc": "2.0", "id": mid, "method": method, "params": params})
        return self.answer(mid, timeout)

    def answer(self, mid, timeout=30.0):
        import os
        import select
        import time
        end = time.monotonic() + timeout
        while True:
            while b"\r\n\r\n" in self.buf:
                head, rest = self.buf.split(b"\r\n\r\n", 1)
                n = int(head.split(b"Content-Length:")[1].split(b"\r\n")[0])
                if len(rest) < n:
                    break
                self.buf = rest[n:]
                msg = json.loads(rest[:n])
                if "id" in msg and "method" not in msg and msg["id"] == mid:
                    return msg
            left = end - time.monotonic()
            if left <= 0:
                return None
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    return None
                self.buf += chunk

    def open(self, uri, text):
        self.send({"jsonrpc": "2.0", "method": "textDocument/didOpen",
                   "params": {"textDocument": {"uri": uri, "languageId": "alignspec", "version": 1, "text": text}}})

    def close(self):
        self.p.kill()
        self.p.wait()


@pytest.fixture
def raw():
    r = Raw()
    yield r
    r.close()


def test_a_frame_with_a_bad_content_length_does_not_wedge_the_server(raw):
    raw.frame(b'{"jsonrpc": "2.0", "id": 1, "method": "shutdown"}', length="abc")
    bad = raw.answer(None, timeout=10)
    assert bad is not None and bad["error"]["code"] == -32700 and "abc" in bad["error"]["message"]
    got = raw.request(2, "textDocument/documentSymbol", {"textDocument": {"uri": "file:///nowhere.align"}})
    assert got is not None, "the server no longer answers"


def test_invalid_params_get_invalid_params(raw):
    got = raw.request(3, "textDocument/hover", {"textDocument": 5, "position": "here"})
    assert got is not None and got["error"]["code"] == -32602


def test_unopened_documents_and_nul_uris_are_invalid_params_without_traceback(raw, tmp_path):
    never = from_fs_path(str(tmp_path / "never.align"))
    got = raw.request(4, "textDocument/hover", {"textDocument": {"uri": never}, "position": {"line": 0, "character": 0}})
    assert got["error"]["code"] == -32602 and "not an open document" in got["error"]["message"]
    assert "traceback" not in json.dumps(got)
    nul = "file:///tmp/a%00b.align"
    raw.open(nul, "algorithm a\n")
    got = raw.request(5, "textDocument/hover", {"textDocument": {"uri": nul}, "position": {"line": 0, "character": 0}})
    assert got is not None and "error" not in got or got["error"]["code"] == -32602, got
    assert "traceback" not in json.dumps(got)


def test_open_documents_have_the_spec_size_cap(lsp, tmp_path):
    import time
    path = tmp_path / "big.align"
    t0 = time.monotonic()
    diags = lsp.open(path, "algorithm big\n" + "# x\n" * (1100 << 10))  # 4.3 MiB
    assert time.monotonic() - t0 < 10
    assert len(diags) == 1 and "larger than 256 KiB" in diags[0].message
    syms = lsp.run(lsp.client.text_document_document_symbol_async(T.DocumentSymbolParams(_doc(path))))
    assert not syms
