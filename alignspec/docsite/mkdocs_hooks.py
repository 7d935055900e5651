"""MkDocs hooks (mkdocs.yml `hooks:`) that generate the reference pages at build time.

- on_config: the nav's "Built-in specs" entry lists every shipped spec.
- on_files: adds the generated pages (alignspec/docsite/reference.py) to the site:
  reference/config.md, reference/cli.md, reference/functions.md, specs/index.md, specs/NAME.md.
  Nothing is written into docs/.
- on_page_markdown: expands two markers in hand-written pages, so that spec text and command
  output on a page are never copied by hand:
    <!-- include: cookbook/rpo.align -->        the file (relative to docs/), highlighted
    <!-- command: alignspec diff dpo cookbook/cdpo.align -->   the command, run in docs/, and its output
    <!-- failing-command: alignspec check cookbook/bad.align -->  the same, for a command that must exit 2
  A command that exits otherwise than it should, or a missing file, fails the build.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

from alignspec.docsite import reference

_MARKER = re.compile(r"^<!-- (include|command|failing-command): (.+?) -->$", re.M)


def _builtins() -> list[str]:
    from alignspec.dsl.load import builtin_names
    return builtin_names(None)


def on_config(config, **kwargs):
    nav = config.get("nav") or []
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and "Built-in specs" in entry:
            nav[i] = {"Built-in specs": ["specs/index.md"] + [f"specs/{n}.md" for n in _builtins()]}
    return config


def on_files(files, config, **kwargs):
    pages = {"reference/config.md": reference.config_page(), "reference/cli.md": reference.cli_page(),
             "reference/functions.md": reference.functions_page(), "specs/index.md": reference.specs_index(_builtins())}
    for name in _builtins():
        pages[f"specs/{name}.md"] = reference.spec_page(name)
    for uri, text in pages.items():
        files.append(File.generated(config, uri, content=text))
    return files


def _run_cli(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run the alignspec CLI in this process (as `alignspec ARGS` in `cwd`): exit code, stdout + stderr."""
    from typer.testing import CliRunner

    from alignspec.cli import app
    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, args)
    finally:
        os.chdir(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise PluginError(f"alignspec {' '.join(args)}: {type(r.exception).__name__}: {r.exception}")
    return r.exit_code, r.output


def _expand(kind: str, arg: str, docs_dir: Path, page: str) -> str:
    if kind == "include":
        path = docs_dir / arg
        if not path.is_file():
            raise PluginError(f"{page}: include: no file {arg} under {docs_dir}")
        lang = "alignspec" if path.suffix == ".align" else ""
        return f"```{lang} title=\"{arg}\"\n{path.read_text(encoding='utf-8').rstrip()}\n```"
    argv = shlex.split(arg)
    if argv[:1] != ["alignspec"]:
        raise PluginError(f"{page}: command: only alignspec commands may run, got {arg!r}")
    code, output = _run_cli(argv[1:], docs_dir)
    expected = (2,) if kind == "failing-command" else (0, 1)
    if code not in expected:
        raise PluginError(f"{page}: `{arg}` exited with {code}, expected {expected}:\n{output}")
    output = output.rstrip()
    return f"```text\n$ {arg}\n{output}\n```"


def on_page_markdown(markdown, page, config, files, **kwargs):
    docs_dir = Path(config["docs_dir"])
    return _MARKER.sub(lambda m: _expand(m.group(1), m.group(2), docs_dir, page.file.src_uri), markdown)
