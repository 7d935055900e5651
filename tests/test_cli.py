"""The `alignspec` command line, each verb through a subprocess (`python -m alignspec ...`).

Also: the editor-speed verbs (check, fmt, diff, graph to DOT, list, new) must not import
torch, and checking every built-in spec must take less time than `import torch` alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import alignspec

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = sorted((ROOT / "algorithms").glob("*.align"))
BAD_FILE = ROOT / "tests" / "bad" / "unknown_name_quantity.align"  # expects unknown-name at 7:30
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
VERBS = ["check", "fmt", "diff", "graph", "compile", "list", "new", "run"]


def cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "alignspec", *map(str, args)], cwd=cwd or ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _has_diff() -> bool:
    return importlib.util.find_spec("alignspec.dsl.diff") is not None


# ================================================================ check
def test_check_builtins():
    r = cli("check", *[p.relative_to(ROOT) for p in ALGORITHMS])
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert len(lines) == len(ALGORITHMS)
    for p, line in zip(ALGORITHMS, lines):
        assert line.startswith(f"{p.relative_to(ROOT)}: ok ("), line
    assert any("library common" in l for l in lines)
    assert any("pipeline rlhf" in l for l in lines)


def test_check_builtin_by_name():
    r = cli("check", "grpo", "dpo")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^grpo: ok \(algorithm grpo: \d+ params, groups of 8, 1 loss term\)$", r.stdout, re.M), r.stdout
    assert re.search(r"^dpo: ok \(algorithm dpo: ", r.stdout, re.M)


def test_check_bad_file_reports_line_and_caret():
    rel = BAD_FILE.relative_to(ROOT)
    r = cli("check", rel)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0] == f"{rel}:7:30: unknown name 'lgp'", r.stderr
    src = BAD_FILE.read_text().splitlines()[6]
    assert lines[1] == "    " + src
    assert lines[2] == "    " + " " * 29 + "^^^", r.stderr
    assert lines[3] == "hint: did you mean 'logp'?"
    assert "Traceback" not in r.stderr


def test_check_goes_on_after_a_bad_file():
    r = cli("check", BAD_FILE.relative_to(ROOT), "algorithms/grpo.align")
    assert r.returncode == 2
    assert "algorithms/grpo.align: ok" in r.stdout
    assert "unknown name 'lgp'" in r.stderr


def test_check_needs_an_argument():
    r = cli("check")
    assert r.returncode == 2 and "Traceback" not in r.stderr


# ================================================================ fmt
def test_fmt_check_builtins_canonical():
    r = cli("fmt", "--check", *[p.relative_to(ROOT) for p in ALGORITHMS])
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


def _non_canonical_copy(tmp_path: Path) -> Path:
    text = (ROOT / "algorithms" / "grpo.align").read_text()
    bent = text.replace("ratio = exp(logp - logp_old)", "ratio=exp( logp-logp_old )")
    bent = re.sub(r"^  beta\s*=\s*", "    beta=", bent, flags=re.M)
    assert bent != text
    p = tmp_path / "grpo_copy.align"
    p.write_text(bent)
    return p


def test_fmt_check_non_canonical(tmp_path):
    p = _non_canonical_copy(tmp_path)
    r = cli("fmt", "--check", p)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not canonical" in r.stderr and str(p) in r.stderr
    assert p.read_text() != (ROOT / "algorithms" / "grpo.align").read_text()  # --check never writes


def test_fmt_prints_canonical_form(tmp_path):
    p = _non_canonical_copy(tmp_path)
    r = cli("fmt", p)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (ROOT / "algorithms" / "grpo.align").read_text()


def test_fmt_write(tmp_path):
    p = _non_canonical_copy(tmp_path)
    before = alignspec.load(str(p))
    r = cli("fmt", "--write", p)
    assert r.returncode == 0, r.stderr
    assert "formatted" in r.stdout
    assert p.read_text() == (ROOT / "algorithms" / "grpo.align").read_text()
    after = alignspec.load(str(p))
    assert after.param_values() == before.param_values()
    assert after.graph.number_of_nodes() == before.graph.number_of_nodes()
    again = cli("fmt", "--check", p)
    assert again.returncode == 0, again.stderr
    unchanged = cli("fmt", "--write", p)  # already canonical: nothing to write
    assert unchanged.returncode == 0 and unchanged.stdout == ""


@pytest.mark.parametrize("eol", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_fmt_line_ends(tmp_path, eol):
    """A canonical spec saved with Windows or old Mac line ends: not canonical; --write makes it so."""
    canonical = (ROOT / "algorithms" / "grpo.align").read_text()
    p = tmp_path / "grpo_eol.align"
    p.write_bytes(canonical.replace("\n", eol).encode())
    assert cli("check", p).returncode == 0
    r = cli("fmt", p)
    assert r.returncode == 0 and r.stdout == canonical, r.stderr
    r = cli("fmt", "--check", p)
    assert r.returncode == 1 and "not canonical" in r.stderr, r.stdout + r.stderr
    r = cli("fmt", "--write", p)
    assert r.returncode == 0 and "formatted" in r.stdout, r.stderr
    assert p.read_bytes() == canonical.encode()
    assert cli("fmt", "--check", p).returncode == 0


def test_fmt_bad_file():
    r = cli("fmt", "tests/bad/syntax_missing_equals.align")
    assert r.returncode == 2 and re.search(r"syntax_missing_equals\.align:\d+:\d+: ", r.stderr), r.stderr


# ================================================================ diff (written in parallel: skipped until it exists)
def test_diff_same_file():
    pytest.importorskip("alignspec.dsl.diff", reason="alignspec.dsl.diff is not written yet")
    r = cli("diff", "algorithms/grpo.align", "algorithms/grpo.align")
    assert r.returncode == 0, r.stdout + r.stderr


def test_diff_grpo_dapo_names_clip_upper_bound():
    pytest.importorskip("alignspec.dsl.diff", reason="alignspec.dsl.diff is not written yet")
    r = cli("diff", "grpo", "dapo")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout.lower()
    assert "clip" in out, r.stdout
    assert "upper" in out or "eps_high" in out, r.stdout


# ================================================================ graph
def test_graph_dot():
    r = cli("graph", "grpo")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('digraph "grpo" {'), r.stdout[:200]
    assert r.stdout.rstrip().endswith("}")
    assert " -> " in r.stdout and "logp" in r.stdout


@pytest.mark.parametrize("suffix, magic", [(".svg", None), (".png", b"\x89PNG\r\n\x1a\n")])
def test_graph_drawing(tmp_path, suffix, magic):
    out = tmp_path / f"g{suffix}"
    r = cli("graph", "grpo", "-o", out)
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert len(data) > 1000
    if magic:
        assert data.startswith(magic)
    else:
        assert b"<svg" in data[:2000]


def test_graph_dot_to_file(tmp_path):
    out = tmp_path / "g.dot"
    r = cli("graph", "dpo", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith('digraph "dpo"')


def test_graph_bad_format(tmp_path):
    assert cli("graph", "grpo", "-o", tmp_path / "g.jpg").returncode == 2
    assert cli("graph", "grpo", "--format", "svg").returncode == 2  # svg needs -o


# ================================================================ compile
def _import_from_path(path: Path):
    spec = importlib.util.spec_from_file_location("alignspec_test_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _grpo_batch(group: int, groups: int = 2, tokens: int = 6, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    rows = group * groups
    mask = torch.ones(rows, tokens)
    mask[1, 4:] = 0
    mask[5, 2:] = 0
    logp = (-torch.rand(rows, tokens, generator=g) * 3).requires_grad_(True)
    return {"reward": torch.randn(rows, generator=g), "logp": logp,
            "logp_ref": -torch.rand(rows, tokens, generator=g) * 3, "mask": mask}


def test_compile_writes_standalone_module(tmp_path):
    import torch
    out = tmp_path / "step.py"
    r = cli("compile", "grpo", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    mod = _import_from_path(out)
    for fn in ("score", "advantage", "loss"):
        assert callable(getattr(mod, fn))
    batch = _grpo_batch(mod.GROUP)
    batch.update({k: v for k, v in mod.score(batch).items() if k not in ("rows", "keep")})
    batch.update({k: v for k, v in mod.advantage(batch).items() if k != "metrics"})
    total, terms, metrics = mod.loss(batch)
    assert total.dim() == 0 and torch.isfinite(total)
    total.backward()
    assert batch["logp"].grad is not None and torch.isfinite(batch["logp"].grad).all()
    assert set(terms) == {"loss"}
    # The same as the in-process compile of the same spec.
    ref = alignspec.compile("grpo").loss(_grpo_batch(mod.GROUP)).loss
    assert torch.allclose(total.detach(), ref.detach(), atol=1e-6)


def test_compile_set_beta_zero_drops_reference():
    r = cli("compile", "grpo", "--set", "beta=0")
    assert r.returncode == 0, r.stderr
    src = r.stdout
    assert 'batch["logp_ref"]' not in src
    header = src.split('"""', 2)[1]
    assert "logp_ref" not in header and "reference" not in header, header
    # logp_ref may appear only in the fixed docstring of advantage() that lists the no-grad forwards.
    rest = [l for l in src.splitlines() if "logp_ref" in l and "no-grad forwards" not in l]
    assert rest == [], rest
    full = cli("compile", "grpo")
    assert 'batch["logp_ref"]' in full.stdout  # control: with beta != 0 it is read


def test_compile_dump_after_fold():
    r = cli("compile", "grpo", "--dump-after", "fold")
    assert r.returncode == 0, r.stderr
    nodes = [l for l in r.stdout.splitlines() if re.match(r"^\s*n\d+ ", l)]
    assert len(nodes) >= 10, r.stdout
    assert any("logp" in l and "grad" in l for l in nodes)
    assert any("r = reward(response)" in l for l in nodes)


def test_compile_errors():
    r = cli("compile", "grpo", "--dump-after", "bogus")
    assert r.returncode == 2 and "passes:" in r.stderr and "fold" in r.stderr
    r = cli("compile", "grpo", "--set", "bogus=1")
    assert r.returncode == 2 and "unknown parameter 'bogus'" in r.stderr and "Traceback" not in r.stderr
    r = cli("compile", "grpo", "--set", "beta")
    assert r.returncode == 2 and "key=value" in r.stderr
    r = cli("compile", "grpo", "--set", "beta=high")
    assert r.returncode == 2 and "got the string 'high'" in r.stderr


# ================================================================ list, new
def test_list():
    r = cli("list")
    assert r.returncode == 0, r.stderr
    names = {l.split()[0] for l in r.stdout.splitlines() if l.strip()}
    assert {"grpo", "dpo", "ppo", "common"} <= names
    assert re.search(r"^grpo\s+Group Relative Policy Optimization$", r.stdout, re.M)


def test_new_from_scratch(tmp_path):
    r = cli("new", "myalgo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = tmp_path / "myalgo.align"
    assert p.exists() and "algorithm myalgo" in p.read_text()
    c = cli("check", "myalgo.align", cwd=tmp_path)
    assert c.returncode == 0, c.stderr
    again = cli("new", "myalgo", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr


def test_new_from_base(tmp_path):
    r = cli("new", "myvariant", "--from", "grpo", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = tmp_path / "myvariant.align"
    assert "algorithm myvariant extends grpo" in p.read_text()
    c = cli("check", "myvariant.align", cwd=tmp_path)
    assert c.returncode == 0, c.stderr
    spec = alignspec.load(str(p))
    assert {"n", "eps", "beta"} <= set(spec.params)


@pytest.mark.parametrize("args", [["new", "canon"], ["new", "canon", "--from", "grpo"]], ids=["scratch", "from"])
def test_new_writes_canonical_spec(tmp_path, args):
    assert cli(*args, cwd=tmp_path).returncode == 0
    r = cli("fmt", "--check", "canon.align", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_new_errors(tmp_path):
    assert cli("new", "bad-name", cwd=tmp_path).returncode == 2
    r = cli("new", "v", "--from", "nosuch", cwd=tmp_path)
    assert r.returncode == 2 and "no spec file or built-in named 'nosuch'" in r.stderr
    assert not (tmp_path / "bad-name.align").exists() and not (tmp_path / "v.align").exists()


# ================================================================ --help
def test_top_level_help():
    r = cli("--help")
    assert r.returncode == 0
    for verb in VERBS:
        assert verb in r.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help(verb):
    r = cli(verb, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


# ================================================================ editor verbs do not import torch
_PROBE = """
import contextlib, io, json, sys
from alignspec.cli import app
sys.argv = ["alignspec"] + json.loads(sys.argv[1])
out = io.StringIO()
code = None
try:
    with contextlib.redirect_stdout(out):
        app()
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}))
"""

_EDITOR_COMMANDS = {
    "check": ["check", str(ROOT / "algorithms" / "grpo.align"), str(ROOT / "algorithms" / "ppo.align")],
    "check_bad": ["check", str(BAD_FILE)],
    "fmt": ["fmt", "--check", str(ROOT / "algorithms" / "grpo.align")],
    "graph": ["graph", "grpo"],
    "list": ["list"],
    "new": ["new", "probe_algo"],
    "new_from": ["new", "probe_variant", "--from", "dapo"],
    "diff": ["diff", "grpo", "dapo"],
}


@pytest.mark.parametrize("name", sorted(_EDITOR_COMMANDS))
def test_editor_commands_do_not_import_torch(tmp_path, name):
    if name == "diff" and not _has_diff():
        pytest.skip("alignspec.dsl.diff is not written yet")
    argv = _EDITOR_COMMANDS[name]
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["code"] in ((2,) if name == "check_bad" else (1,) if name == "diff" else (0,)), (res, r.stderr)
    assert res["torch"] is False, f"`alignspec {' '.join(argv)}` imported torch"
    assert res["transformers"] is False


# ================================================================ speed
def test_check_all_builtins_faster_than_import_torch():
    t0 = time.perf_counter()
    for p in ALGORITHMS:
        alignspec.load(str(p))
    check_time = time.perf_counter() - t0
    r = subprocess.run([sys.executable, "-c",
                        "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import_torch_time = float(r.stdout.strip())
    print(f"\ncheck of {len(ALGORITHMS)} built-in specs: {check_time * 1000:.0f} ms; "
          f"import torch: {import_torch_time * 1000:.0f} ms")
    assert check_time < import_torch_time


def test_graph_dot_of_a_rollout_spec(tmp_path):
    spec = tmp_path / "agentic.align"
    spec.write_text("algorithm agentic\nparams\n  n: int = 4\nsample\n  responses = rollout(prompt, env = env, n = n)\n"
                    "score\n  r = env_reward(response)\nloss\n  minimize -mean(mean_tokens(logp) * (r - group_mean(r)))\n")
    r = cli("graph", spec)
    assert r.returncode == 0, r.stderr
    assert "env_reward(response)" in r.stdout
    f = cli("fmt", spec)
    assert f.returncode == 0 and "rollout(prompt, env = env, n = n)" in f.stdout, f.stderr


# ================================================================ output paths (issue 23)
@pytest.mark.parametrize("verb", ["compile", "graph", "new"])
def test_output_paths_that_cannot_be_written_are_named(tmp_path, verb):
    """-o onto a folder, into a missing folder, or onto a dangling symlink: exit 2 with the path,
    never an internal error, and nothing written through the link."""
    args = {"compile": ["compile", "grpo"], "graph": ["graph", "grpo"], "new": ["new", "mine"]}[verb]
    suffix = {"compile": ".py", "graph": ".dot", "new": ".align"}[verb]
    (tmp_path / "adir").mkdir()
    dangling = tmp_path / f"dangling{suffix}"
    dangling.symlink_to(tmp_path / "target.txt")
    for bad, words in [(tmp_path / "adir", "is a folder"), (tmp_path / "missing" / f"x{suffix}", "does not exist"),
                       (dangling, "symbolic link")]:
        r = cli(*args, "-o", bad)
        assert r.returncode == 2, (bad, r.stderr)
        assert str(bad) in r.stderr and words in r.stderr and "internal error" not in r.stderr, r.stderr
    assert not (tmp_path / "target.txt").exists() and not (tmp_path / "missing").exists()


def test_output_through_a_symlink_writes_the_real_file(tmp_path):
    """compile -o LINK and fmt --write LINK (a spec outside the current folder) replace the file the
    link names, atomically, and keep the link."""
    real_dir, work = tmp_path / "specs", tmp_path / "work"
    real_dir.mkdir()
    work.mkdir()
    real = real_dir / "mine.align"
    real.write_text("algorithm mine extends grpo\nparams\n  beta   =   0.0\n")
    (work / "link.align").symlink_to(real)
    r = cli("fmt", "--write", "link.align", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (work / "link.align").is_symlink() and "beta = 0.0" in real.read_text()
    out_real = real_dir / "step.py"
    out_real.write_text("PLACEHOLDER")
    (work / "step.py").symlink_to(out_real)
    r = cli("compile", "grpo", "-o", "step.py", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (work / "step.py").is_symlink() and "PLACEHOLDER" not in out_real.read_text()
    assert not [p for p in [*real_dir.iterdir(), *work.iterdir()] if p.name.endswith(".tmp")]
