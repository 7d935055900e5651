"""The `alignspec` command line.

    alignspec check SPEC...        parse and check (exit 2 on the first error of each file)
    alignspec fmt SPEC... [--check|--write]
    alignspec diff A B [--format text|json]   exit 0 same, 1 different, 2 error
    alignspec graph SPEC [-o FILE] [--format dot|svg|png]
    alignspec compile SPEC [-o step.py] [--set k=v] [--dump-after PASS]
    alignspec list | new NAME [--from BASE] | run SPEC ...
    alignspec check SPEC... --format json   the problems as a JSON array on stdout
    alignspec lsp                  the language server, over stdio
    alignspec vllm-serve [MODEL] [vLLM flags]   vLLM's server for use_vllm's server mode

Editor-speed commands (check, fmt, diff, graph, list, new) never import torch. Errors go
to stderr as `file:line:col: message` with the line and a caret.
Exit codes: 0 ok, 1 a difference / not canonical / a failed run, 2 bad input.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

# transformers' scheduler module imports peft, which imports bitsandbytes when installed; on a
# CPU without AVX512-BF16 kernels bitsandbytes then logs a warning about its 4-bit kernels at
# every start, even in runs that use no 4-bit layer. qlora's own check says what it needs.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative post-training algorithms: check, format, diff, compile and run spec files.")


def _fail(e: Exception, code: int = 2):
    typer.echo(e.format() if hasattr(e, "format") else str(e), err=True)
    raise typer.Exit(code)


def _ref(arg: str):
    """A spec argument: a bare name (``grpo``) is the built-in of that name, anything else a file
    path (never spec text, whatever characters the file name holds)."""
    from alignspec.dsl.load import is_bare_name
    return arg if is_bare_name(arg) else Path(arg)


class OutputError(Exception):
    """An output path that cannot be written (its message names the path)."""


def _output_target(path: Path, *, new: bool = False) -> Path:
    """The file that writing ``path`` replaces: ``path`` itself, or the file an existing symlink
    names (the link is kept). A folder, a dangling link, something that is not a regular file, a
    missing parent folder (or, with ``new``, any existing file) is an OutputError."""
    import os
    import stat
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if new or not target.exists():
            raise OutputError(f"{path} is a symbolic link" + ("" if target.exists() else
                              f" to {target}, which does not exist") + "; not writing through it")
        path = target
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")
    if new and path.exists():
        raise OutputError(f"{path} exists; not overwriting")
    if new and path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise OutputError(f"{path} is not a regular file")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: the folder {path.parent} does not exist")
    return path


def write_output(path, data, *, new: bool = False) -> Path:
    """The one writer of the CLI's output files (``compile -o``, ``graph -o``, ``new``, ``fmt
    --write``): ``data`` (text or bytes) into a temporary file beside the real target, flushed to
    disk, then renamed onto it, so a full disk or a kill leaves the old file or the new one, never
    a truncated one; an existing symlink to a file is written through (the link stays), see
    ``_output_target`` for what is refused. With ``new`` an existing path is never replaced.
    OSError becomes an OutputError naming the path; returns the file written."""
    import os
    import tempfile
    import stat
    dest = _output_target(Path(path), new=new)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if dest.exists() and not stat.S_ISREG(dest.stat().st_mode):  # a device or pipe (-o /dev/null): no rename
        try:
            with open(dest, "wb") as f:
                f.write(raw)
        except OSError as e:
            raise OutputError(f"{path}: not written ({e.strerror or e})") from None
        return dest
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        raise OutputError(f"{path}: not written ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if dest.exists():
            mode = dest.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        if new:  # never replaces: a link fails when the name appeared meanwhile
            os.link(tmp, dest)
            os.unlink(tmp)
        else:
            os.replace(tmp, dest)
    except FileExistsError:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path} exists; not overwriting") from None
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: not written ({e.strerror or e}); the file is unchanged") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _write_or_exit(path, data, *, new: bool = False, check_only: bool = False) -> None:
    """``write_output``, or (``check_only``) its refusals alone; an OutputError exits 2."""
    try:
        if check_only:
            _output_target(Path(path), new=new)
        else:
            write_output(path, data, new=new)
    except OutputError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def _parse_sets(sets: List[str]) -> dict:
    from alignspec.sets import SetError, parse_sets  # the one --set parser (run's too)
    try:
        return parse_sets(sets)
    except SetError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)


@app.command()
def check(specs: List[str] = typer.Argument(..., help="spec files or built-in names"),
          format: str = typer.Option("text", "--format",
                                     help="text: one line per file, errors on stderr; json: a JSON array of the "
                                          "problems on stdout (file, line, column, end_line, end_column, severity, "
                                          "kind, message, hint)")):
    """Parse and check spec files; print one line per file."""
    from alignspec.dsl.check import load
    from alignspec.dsl.errors import SpecError
    if format not in ("text", "json"):
        typer.echo("--format must be text or json", err=True)
        raise typer.Exit(2)
    if format == "json":
        from alignspec.dsl.check import problems
        from alignspec.editor.diagnostics import to_json
        found = [e for ref in specs for e in problems(_ref(ref))]
        typer.echo(to_json(found))
        raise typer.Exit(2 if found else 0)
    failed = False
    for ref in specs:
        try:
            spec = load(_ref(ref))
        except SpecError as e:
            typer.echo(e.format(), err=True)
            failed = True
            continue
        if spec.resolved.file.kind == "library":
            what = f"library {spec.name}: {len(spec.resolved.defs)} functions"
        elif spec.is_pipeline:
            what = f"pipeline {spec.name}: " + " → ".join(f"{s.name} ({s.spec})" for s in spec.stages)
        else:
            terms = spec.graph.graph.get("terms", [])
            what = (f"algorithm {spec.name}: {len(spec.params)} params, groups of {spec.group_size}, "
                    f"{len(terms)} loss term{'s' if len(terms) != 1 else ''}")
        typer.echo(f"{ref}: ok ({what})")
    raise typer.Exit(2 if failed else 0)


@app.command()
def fmt(specs: List[str] = typer.Argument(...),
        check_only: bool = typer.Option(False, "--check", help="exit 1 if a file is not in canonical form"),
        write: bool = typer.Option(False, "--write", "-w", help="rewrite files in place")):
    """Print specs in canonical form (comments kept)."""
    from alignspec.dsl.errors import SpecError
    from alignspec.dsl.fmt import format_spec
    from alignspec.dsl.load import read_spec
    not_canonical = False
    for ref in specs:
        try:
            f = read_spec(_ref(ref))
        except SpecError as e:
            _fail(e)
        out = format_spec(f)
        if check_only:
            if out != f.source:
                typer.echo(f"{ref}: not canonical (run `alignspec fmt --write {ref}`)", err=True)
                not_canonical = True
        elif write:
            if out != f.source:
                _write_or_exit(f.path, out)
                typer.echo(f"formatted {f.path}")
        else:
            sys.stdout.write(out)
    raise typer.Exit(1 if not_canonical else 0)


@app.command()
def diff(a: str, b: str, format: str = typer.Option("text", "--format", help="text or json")):
    """Semantic difference of two specs, per section, in words (exit 0 same, 1 different, 2 error)."""
    from alignspec.dsl.diff import diff_specs, format_json, format_text
    from alignspec.dsl.errors import SpecError
    if format not in ("text", "json"):
        typer.echo("--format must be text or json", err=True)
        raise typer.Exit(2)
    try:
        changes = diff_specs(_ref(a), _ref(b))
    except SpecError as e:
        _fail(e)
    typer.echo(format_json(changes) if format == "json" else format_text(changes))
    raise typer.Exit(1 if changes else 0)


@app.command()
def graph(spec: str, output: Optional[str] = typer.Option(None, "-o", "--output"),
          format: Optional[str] = typer.Option(None, "--format", help="dot (default), svg or png")):
    """Write the spec's graph: DOT text, or an SVG/PNG drawing (matplotlib; no Graphviz needed)."""
    from alignspec.dsl.check import load
    from alignspec.dsl.errors import SpecError
    from alignspec.dsl.graphviz import draw, to_dot
    try:
        s = load(_ref(spec))
    except SpecError as e:
        _fail(e)
    fmt_ = format or (Path(output).suffix.lstrip(".") if output else "") or "dot"
    if fmt_ not in ("dot", "svg", "png"):
        typer.echo(f"unknown graph format {fmt_!r}: use dot, svg or png", err=True)
        raise typer.Exit(2)
    if fmt_ == "dot":
        text = to_dot(s.graph, s.name)
        if output:
            _write_or_exit(output, text)
        else:
            sys.stdout.write(text)
    else:
        if not output:
            typer.echo(f"--format {fmt_} needs -o FILE", err=True)
            raise typer.Exit(2)
        import io
        _write_or_exit(output, None, check_only=True)  # refused before the drawing is made
        buf = io.BytesIO()
        draw(s.graph, buf, fmt_)
        _write_or_exit(output, buf.getvalue())
        typer.echo(f"wrote {output}")


@app.command("compile")
def compile_(spec: str, output: Optional[str] = typer.Option(None, "-o", "--output", help="write the module here"),
             sets: List[str] = typer.Option([], "--set", help="override a param: --set beta=0"),
             dump_after: Optional[str] = typer.Option(None, "--dump-after", help="print the graph after this pass")):
    """Compile a spec to a standalone PyTorch module (printed, or written with -o)."""
    from alignspec.dsl.check import load
    from alignspec.dsl.errors import SpecError
    try:
        s = load(_ref(spec), **_parse_sets(sets))
        if dump_after:
            from alignspec.compiler.pipeline import PASS_NAMES, compile_graph
            if dump_after not in PASS_NAMES:
                typer.echo(f"unknown pass {dump_after!r}; passes: {', '.join(PASS_NAMES)}", err=True)
                raise typer.Exit(2)
            g = compile_graph(s, stop_after=dump_after)
            from alignspec.dsl.graphviz import label
            import networkx as nx
            for n in nx.topological_sort(g):
                a = g.nodes[n]
                args = ", ".join(a["args"])
                typer.echo(f"{n:>6} {label(a).replace(chr(92) + 'n', '  ['):<48}] {a['phase']:<6}"
                           f"{' grad' if a['grad'] else '     '}  ({args})")
            raise typer.Exit(0)
        from alignspec.compiler.api import compile as compile_algo
        algo = compile_algo(s)
    except SpecError as e:
        _fail(e)
    if output:
        _write_or_exit(output, algo.source)
        typer.echo(f"wrote {output} ({algo.compile_seconds * 1000:.0f} ms); needs: {', '.join(sorted(algo.requires))}")
    else:
        sys.stdout.write(algo.source)


@app.command("list")
def list_():
    """The built-in specs, one line each."""
    from alignspec.dsl.load import builtin_dir, builtin_names
    for name in builtin_names(None):
        text = (builtin_dir() / f"{name}.align").read_text().splitlines()
        title = next((l.lstrip("# ").strip() for l in text if l.startswith("#") and l.strip("# ")), "")
        typer.echo(f"{name:<14} {title}")


@app.command()
def new(name: str, from_: Optional[str] = typer.Option(None, "--from", help="a spec to extend"),
        output: Optional[str] = typer.Option(None, "-o", "--output")):
    """Write a starter spec NAME.align (with --from, one that extends BASE)."""
    import re
    from alignspec.dsl.check import load
    from alignspec.dsl.errors import SpecError
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        typer.echo(f"{name!r} is not a valid spec name (letters, digits, _)", err=True)
        raise typer.Exit(2)
    path = Path(output or f"{name}.align")
    _write_or_exit(path, None, new=True, check_only=True)  # before the template is built
    if from_:
        try:
            base = load(from_)
        except SpecError as e:
            _fail(e)
        params = "\n".join(f"  # {p.name} = {p.default!r}" for p in base.params.values())
        text = (f"# {name}: a variant of {base.name}. Cite the paper and equation this implements.\n"
                f"algorithm {name} extends {from_}\n\n"
                f"params\n{params}\n  variant_note = \"\" \"say what this variant changes\"\n\n"
                f"# Override a section by writing it whole, e.g. the loss:\n"
                f"# loss\n#   minimize ...\n")
    else:
        text = (f"# {name}. Cite the paper (arXiv id) and the equation this implements.\n"
                f"algorithm {name}\nimport common\n\n"
                "params\n  n: int = 4     \"responses sampled per prompt\"\n"
                "  eps = 0.2       \"clip range of the importance ratio\"\n\n"
                "sample\n  responses = generate(prompt, n = n, temperature = 1.0)\n\n"
                "score\n  r = reward(response)\n\n"
                "advantage\n  A = (r - group_mean(r)) / (group_std(r) + 1e-4)\n\n"
                "loss\n  ratio = exp(logp - logp_old)\n"
                "  pg = min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)\n"
                "  minimize -token_mean_all(pg)\n")
    from alignspec.dsl.fmt import format_text
    _write_or_exit(path, format_text(text, str(path)), new=True)
    try:
        load(str(path))
    except SpecError as e:  # pragma: no cover - the templates are tested
        _fail(e)
    typer.echo(f"wrote {path}")


def _type_name(annotation) -> str:
    """A setting's type as help text: ``int | None``, ``constant|linear|...``, ``list[str]``."""
    import types
    import typing
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    return annotation.__name__ if not args else str(annotation).replace("typing.", "")


def settings_help() -> list[tuple[str, str]]:
    """``(name: type = default, description)`` for every field of the run configuration."""
    from alignspec.runtime.config import RunConfig
    rows = []
    for name, f in RunConfig.model_fields.items():
        default = f.get_default(call_default_factory=True)
        rows.append((f"{name}: {_type_name(f.annotation)} = {default!r}", f.description or ""))
    return rows


class _RunCommand(typer.core.TyperCommand):
    """``run --help``: typer's help, then every setting of the run configuration (runtime/config.py)."""

    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)
        with formatter.section("Settings (--set KEY=VALUE, or KEY: VALUE in the --config file)"):
            formatter.write_dl(settings_help())


@app.command(cls=_RunCommand, context_settings={"allow_interspersed_args": True})
def run(spec: str,
        model: Optional[str] = typer.Option(None, "--model", help="a transformers model directory"),
        data: Optional[str] = typer.Option(None, "--data", help="jsonl/json/parquet file or saved dataset dir"),
        config: Optional[str] = typer.Option(None, "--config", help="run configuration (YAML or TOML)"),
        sets: List[str] = typer.Option([], "--set", help="override a config field or spec param: key=value"),
        out: Optional[str] = typer.Option(None, "--out", help="output directory"),
        steps: Optional[int] = typer.Option(None, "--steps"),
        seed: Optional[int] = typer.Option(None, "--seed"),
        save_every: Optional[int] = typer.Option(None, "--save-every"),
        resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint"),
        eval_every: Optional[int] = typer.Option(None, "--eval-every"),
        profile: bool = typer.Option(False, "--profile", help="print the per-phase time split")):
    """Train a spec (built-in tiny model and task when no --model/--data)."""
    from alignspec.runtime.engine import run_from_cli
    raise typer.Exit(run_from_cli(spec, model=model, data=data, config=config, sets=tuple(sets), out=out,
                                  steps=steps, seed=seed, save_every=save_every, resume=resume,
                                  eval_every=eval_every, profile=profile))


@app.command("vllm-serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def vllm_serve(ctx: typer.Context,
               model: Optional[str] = typer.Argument(None, help="model directory or hub id (default: the built-in "
                                                     "tiny model of `run --set use_vllm=true`)"),
               host: str = typer.Option("127.0.0.1", "--host"),
               port: int = typer.Option(8000, "--port"),
               dry_run: bool = typer.Option(False, "--dry-run", help="print the vllm serve command, start nothing")):
    """Start vLLM's server for server mode (use_vllm, vllm_mode=server); other flags go to `vllm serve`."""
    from alignspec.vllm_serve import main as serve
    extra = list(ctx.args)
    if model is not None and model.startswith("-"):  # no MODEL: the first vLLM flag landed here
        model, extra = None, [model, *extra]
    raise typer.Exit(serve(model, host, port, extra, dry_run=dry_run))


@app.command()
def lsp(stdio: bool = typer.Option(True, "--stdio", help="talk JSON-RPC over stdin/stdout (the only transport)")):
    """Run the language server (diagnostics, hover, go to definition, completion, formatting) over stdio."""
    from alignspec.editor.server import main as serve
    serve()


def main():
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # never a bare traceback
        from alignspec.dsl.errors import SpecError
        if isinstance(e, SpecError):
            typer.echo(e.format(), err=True)
            sys.exit(2)
        typer.echo(f"alignspec: internal error: {type(e).__name__}: {e}\n"
                   "please report this with the command you ran", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
