"""The documentation site: `mkdocs build --strict` (what CI runs), offline, into a temp dir.

The build runs in a subprocess whose sockets refuse every connection, so a theme or plugin
that fetched anything would fail it. Strict mode turns every warning (a broken link, a page
missing from the nav, a marker whose command fails) into a failure. Then the generated pages
are checked against the code they come from.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alignspec.dsl.builtins import FUNCTIONS
from alignspec.dsl.load import builtin_names

ROOT = Path(__file__).resolve().parents[1]

_NO_NETWORK = '''
import socket
def _refuse(*args, **kwargs):
    raise OSError("network access during the docs build")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    (tmp / "guard").mkdir()
    (tmp / "guard" / "sitecustomize.py").write_text(_NO_NETWORK)
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join([str(tmp / "guard"), os.environ.get("PYTHONPATH", "")]))
    out = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                        "--site-dir", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def _text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


def test_the_guard_refuses_connections(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_NO_NETWORK)
    r = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "network access during the docs build" in r.stderr


def test_every_builtin_spec_has_its_page_with_highlighting_and_pytorch(site):
    for name in builtin_names(None):
        page = (site / "specs" / name / "index.html").read_text()
        assert 'class="spec-side"' in page, name
        assert 'class="err"' not in page, name            # no Pygments error token
        assert '<span class="kn">' in page or name == "common", name   # section keywords highlighted
        if name not in ("common", "rlhf"):
            assert "import torch" in _text(site / "specs" / name / "index.html"), name
    grpo = _text(site / "specs" / "grpo" / "index.html")
    from alignspec import compile as compile_algo
    first = next(l for l in compile_algo("grpo").source.splitlines() if l.startswith("def "))
    assert first in grpo


def test_reference_pages_are_generated_from_the_code(site):
    from alignspec.runtime.config import RunConfig
    config = _text(site / "reference" / "config" / "index.html")
    for name in RunConfig.model_fields:
        assert name in config, name
    cli = _text(site / "reference" / "cli" / "index.html")
    for verb in ("check", "fmt", "diff", "graph", "compile", "list", "new", "run", "lsp"):
        assert f"alignspec {verb}" in cli, verb
    assert "--format" in cli
    functions = _text(site / "reference" / "functions" / "index.html")
    for name in FUNCTIONS:
        assert f"{name}(" in functions, name
    assert "group_mean(x)" in functions and "response → group" in functions


def test_cookbook_commands_ran(site):
    diff = _text(site / "cookbook" / "diff" / "index.html")
    assert "$ alignspec diff grpo dapo" in diff and "filter added: keep groups where group_std(r) > 0" in diff
    assert "$ alignspec diff grpo cookbook/grpo_renamed.align\nno semantic difference" in diff
    new = _text(site / "cookbook" / "new-algorithm" / "index.html")
    assert "level mismatch" in new and "cookbook/reinforce_entropy.align: ok" in new


def test_site_loads_nothing_from_the_network(site):
    for page in site.rglob("*.html"):
        text = page.read_text()
        for m in re.finditer(r'<(?:link|script|img)[^>]+(?:href|src)="(https?:)?//', text):
            pytest.fail(f"{page.relative_to(site)} loads a remote resource: {m.group(0)}")


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "cookbook").glob("*.align")), ids=lambda p: p.stem)
def test_cookbook_specs_check(path):
    from alignspec.dsl.check import load
    from alignspec.dsl.errors import SpecError
    from alignspec.dsl.fmt import format_text
    text = path.read_text()
    assert format_text(text) == text
    if path.stem == "level_mismatch":
        with pytest.raises(SpecError, match="level mismatch"):
            load(str(path))
    else:
        load(str(path))
