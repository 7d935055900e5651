"""Markdown pages generated from the code, for the docs site (alignspec/docsite/mkdocs_hooks.py).

Nothing here is written by hand: the run configuration reference reads the pydantic model
(`RunConfig`), the CLI reference reads the typer app's commands, the built-in functions page
reads `builtins.FUNCTIONS` / `QUANTITIES`, and each built-in spec page shows the spec file next
to the PyTorch that `alignspec.compile(name).source` generates.
"""

from __future__ import annotations

import typing

from alignspec.dsl import vocab
from alignspec.dsl.builtins import FUNCTIONS, QUANTITIES


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None")


# ---------------------------------------------------------------- run configuration
def config_page() -> str:
    """The run configuration reference: one row per RunConfig field."""
    from pydantic_core import PydanticUndefined

    from alignspec.runtime.config import RunConfig
    rows = []
    for name, f in RunConfig.model_fields.items():
        if f.default_factory is not None:
            default = repr(f.default_factory())
        elif f.default is PydanticUndefined:
            default = "(required)"
        else:
            default = repr(f.default)
        bounds = ", ".join(f"{sign} {getattr(m, attr)}" for m in f.metadata
                           for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
                           if getattr(m, attr, None) is not None)
        desc = f.description or ""
        if bounds:
            desc = f"{desc} ({bounds})" if desc else f"({bounds})"
        rows.append(f"| `{name}` | `{_cell(_type_name(f.annotation))}` | `{_cell(default)}` | {_cell(desc)} |")
    doc = (RunConfig.__doc__ or "").strip()
    return "\n".join([
        "# Run configuration",
        "",
        "<!-- generated from alignspec.runtime.config.RunConfig by alignspec/docsite/reference.py -->",
        "",
        f"{doc} A run reads a YAML or TOML file (`alignspec run SPEC --config run.yaml`) and "
        "`--set key=value` overrides (dotted keys reach into mappings: `--set fields.prompt=question`); "
        "a key that names one of the spec's parameters, or `params.NAME`, sets that parameter. "
        "Unknown keys are refused.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


# ---------------------------------------------------------------- command line
def cli_page() -> str:
    """The CLI reference: usage, help and every argument and option of each command."""
    import typer

    from alignspec.cli import app
    root = typer.main.get_command(app)
    root_ctx = typer.Context(root, info_name="alignspec")
    out = ["# Command line", "",
           "<!-- generated from the typer app in alignspec/cli.py by alignspec/docsite/reference.py -->", "",
           _cell(root.help or ""), "",
           "Exit codes: 0 ok, 1 a difference (`diff`) / not canonical (`fmt --check`) / a failed run, "
           "2 bad input. Errors go to stderr as `file:line:col: message` with the line and a caret.", ""]
    for name, cmd in root.commands.items():
        ctx = typer.Context(cmd, info_name=name, parent=root_ctx)
        out += [f"## `alignspec {name}`", "", (cmd.help or "").strip(), "", "```text",
                cmd.get_usage(ctx).strip(), "```", ""]
        rows = []
        for p in cmd.params:
            record = p.get_help_record(ctx)
            if record is None:
                continue
            opts, help_ = record
            rows.append(f"| `{_cell(opts)}` | {_cell(help_)} |")
        if rows:
            out += ["| argument / option | meaning |", "|---|---|", *rows, ""]
    return "\n".join(out)


# ---------------------------------------------------------------- built-in functions
def functions_page() -> str:
    """Every built-in function (signature and level rule) and runtime quantity, from builtins.py."""
    out = ["# Built-in functions and quantities", "",
           "<!-- generated from alignspec/dsl/builtins.py by alignspec/docsite/reference.py -->", "",
           "The tables the checker reads. The [language reference](../language.md) explains levels and phases.", "",
           "## Quantities the runtime provides", "", "| name | level | gradient | needs | meaning |",
           "|---|---|---|---|---|"]
    for q in QUANTITIES.values():
        out.append(f"| `{q.name}` | {q.level} | {'yes' if q.grad else 'no'} | {', '.join(q.requires) or '—'} | "
                   f"{_cell(q.doc)} |")
    kinds: dict[str, list] = {}
    for fn in FUNCTIONS.values():
        kinds.setdefault(fn.kind, []).append(fn)
    for kind, fns in kinds.items():
        title = vocab.signature(fns[0]).kind
        out += ["", f"## {title[0].upper() + title[1:]}", "", "| call | levels | notes |", "|---|---|---|"]
        for fn in fns:
            s = vocab.signature(fn)
            notes = [fn.doc] if fn.doc else []
            if fn.rollout_only:
                notes.append("rollout phase only")
            if fn.linear:
                notes.append("batch-wide sum: may be added to a loss")
            if fn.min_group > 1:
                notes.append(f"groups of at least {fn.min_group}")
            out.append(f"| `{_cell(s.text)}` | {_cell(s.levels) or '—'} | {_cell('; '.join(notes))} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- built-in specs
def _title(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def spec_page(name: str) -> str:
    """A built-in spec: its text highlighted, next to the PyTorch module it compiles to."""
    from alignspec.dsl.check import load
    from alignspec.dsl.load import builtin_dir
    text = (builtin_dir() / f"{name}.align").read_text(encoding="utf-8")
    spec = load(name)
    head = [f"# {name}", "", f"*{_title(text)}*" if _title(text) else "", "",
            f"<!-- generated from algorithms/{name}.align by alignspec/docsite/reference.py -->", ""]
    left = ["**Spec** (`algorithms/" + name + ".align`)", "", "```alignspec", text.rstrip("\n"), "```"]
    if spec.resolved.file.kind == "library":
        right = ["**A library**: its `def`s are inlined wherever a spec that imports it calls them; "
                 "it compiles to no module of its own."]
    elif spec.is_pipeline:
        stages = [f"- `{s.name}`: runs [{s.spec}]({s.spec}.md)"
                  + (f" with {', '.join(f'{k} = {v}' for k, v in s.links.items())}" if s.links else "")
                  for s in spec.stages]
        right = ["**A pipeline**: `alignspec run` runs each stage's spec in turn; each stage compiles on its "
                 "own page.", "", *stages]
    else:
        from alignspec.compiler.api import compile as compile_algo
        algo = compile_algo(spec)
        needs = ", ".join(sorted(algo.requires))
        right = [f"**Generated PyTorch** (`alignspec.compile(\"{name}\").source`; needs: {needs})", "",
                 "```python", algo.source.rstrip("\n"), "```"]
    return "\n".join(head + ['<div class="spec-side" markdown>', "", '<div markdown>', "", *left, "", "</div>",
                             "", '<div markdown>', "", *right, "", "</div>", "", "</div>", ""])


def specs_index(names: list[str]) -> str:
    from alignspec.dsl.load import builtin_dir
    rows = []
    for n in names:
        title = _title((builtin_dir() / f"{n}.align").read_text(encoding="utf-8"))
        rows.append(f"| [{n}]({n}.md) | {_cell(title)} |")
    return "\n".join(["# Built-in specs", "",
                      "<!-- generated from algorithms/*.align by alignspec/docsite/reference.py -->", "",
                      "Each page shows the spec file next to the PyTorch module it compiles to "
                      "(`alignspec compile NAME` prints the same). `alignspec list` lists them.", "",
                      "| spec | what it is |", "|---|---|", *rows, ""])
