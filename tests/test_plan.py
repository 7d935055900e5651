"""The run plan (compiler/passes/plan.py): what the runtime reads in place of the syntax tree."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

import alignspec
from alignspec.compiler.plan import RunPlan, SamplerPlan

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _plan(spec, **kw) -> RunPlan:
    return alignspec.compile(spec, **kw).plan


def test_grpo_generates_n_with_params_resolved():
    p = _plan("grpo")
    assert p.data == "prompts" and p.sampler.kind == "generate"
    assert p.sampler.option("n") == 8 and p.sampler.rows == 8 and p.group_size == p.sample_group_size == 8
    assert p.sampler.option("temperature") == 1.0 and p.sampler.option("model") == "policy"
    assert p.sampler.option("max_tokens") is None and p.sampler.option("max_tokens", 32) == 32
    assert (p.epochs, p.minibatches, p.iterations, p.reference) == (1, 1, 1, "fixed")
    assert p.filters == () and not p.refill and not p.offline and p.generates
    # a param override reaches the sampler's options
    assert _plan("grpo", n=4).sampler.option("n") == 4 and _plan("grpo", n=4).group_size == 4


def test_dapo_filter_and_refill():
    p = _plan("dapo")
    assert len(p.filters) == 1 and p.filters[0].level == "groups" and p.filters[0].line > 0
    assert p.refill
    assert not _plan("grpo").refill


def test_dpo_pairs_from_the_data():
    p = _plan("dpo")
    assert p.data == "pairs" and p.sampler == SamplerPlan("pairs", rows=2)
    assert [(r.name, r.first, r.rows) for r in p.roles] == [("chosen", 0, 1), ("rejected", 1, 1)]
    assert p.offline and not p.generates
    s = _plan("sft")
    assert s.data == "demonstrations" and s.sampler.kind == "demonstration" and s.offline
    k = _plan("kto")
    assert k.data == "unpaired" and k.sampler == SamplerPlan("unpaired", rows=1) and k.offline


def test_ppo_epochs_minibatches_and_sampling_temperature():
    p = _plan("ppo")
    assert (p.epochs, p.minibatches, p.updates_per_rollout) == (4, 1, 4)
    assert p.sampler.option("temperature") == 0.7
    assert p.logprob_temperature == 0.7  # train: logprob_temperature = "sampling", resolved
    assert _plan("flow_grpo").minibatches == 2


def test_spin_iterations_reference_and_schedule():
    p = _plan("spin")
    assert p.iterations == 4 and p.reference == "iterate"
    assert dict(p.schedules) == {"beta": (0.1, 0.1, 0.1, 5.0)} and p.default("beta") == 0.1
    assert p.sampler.kind == "concat" and [s.kind for s in p.sampler.parts] == ["demonstration", "generate"]
    assert p.sampler.parts[1].option("model") == "reference"
    assert p.data == "demonstrations" and p.generates and not p.offline


def test_mcts_tree_search_options():
    p = _plan("mcts", simulations=5)
    assert p.sampler.kind == "tree_search" and p.sampler.rows == 2
    assert dict(p.sampler.options) == {"simulations": 5, "branching": 3, "depth": 4, "c_puct": 1.5,
                                       "temperature": 1.0}
    assert p.refill  # a search can find fewer pairs than prompts


def test_flow_grpo_flow_sde_and_filter():
    p = _plan("flow_grpo", n=6)
    assert p.sampler.kind == "flow_sde" and dict(p.sampler.options) == {"n": 6, "steps": 10, "noise": 0.7}
    assert p.group_size == 6 and p.refill and len(p.filters) == 1


def test_select_roles_and_selectors():
    p = _plan("ampo")
    assert p.sample_group_size == 8 and p.group_size == 4
    assert [(s.role, s.selector, s.rows) for s in p.selects] == [("chosen", "argmax", 1), ("rejected", "coreset", 3)]
    assert [(r.name, r.first, r.rows) for r in p.roles] == [("chosen", 0, 1), ("rejected", 1, 3)]


def test_plan_is_frozen():
    p = _plan("grpo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.epochs = 2


def test_sampling_temperature_without_a_sampler_is_a_spec_error(tmp_path):
    spec = tmp_path / "t.align"
    spec.write_text("algorithm t\ndata demonstrations\nloss\n  minimize -token_mean_all(logp)\n"
                    "train\n  logprob_temperature = \"sampling\"\n")
    with pytest.raises(alignspec.SpecError, match="one sampling temperature") as err:
        alignspec.compile(str(spec))
    assert err.value.span.line == 6 and str(spec.name) in err.value.span.file


@pytest.mark.parametrize("name", ["grpo", "dapo", "dpo", "ppo", "spin", "mcts", "flow_grpo", "ampo", "sft"])
def test_generated_module_shows_the_plan(name):
    algo = alignspec.compile(name)
    assert algo.module.PLAN == algo.plan.as_literal()
    # the literal is plain values: it parses back with ast.literal_eval
    text = algo.source.split("PLAN = ", 1)[1].split("\n\n", 1)[0]
    assert ast.literal_eval(text) == algo.plan.as_literal()


def test_import_layers():
    """The import contracts of .importlinter hold (``lint-imports``, also in ``make test``): the
    runtime's folders in layers (the loop at the top, data and io at the bottom), the runtime
    imports neither the DSL nor the CLI (it reads the compiled plan), the compiler not the
    runtime, the DSL not the compiler."""
    import shutil
    import subprocess
    import sys
    exe = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (the dev extra)")
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_private_name_imported_from_another_folder():
    """A name that starts with ``_`` is imported only within its own folder (package)."""
    dirs = {"alignspec": ROOT / "alignspec", "alignspec.dsl": ROOT / "dsl",
            "alignspec.compiler": ROOT / "compiler", "alignspec.runtime": ROOT / "runtime"}
    bad = []
    for pkg, d in dirs.items():
        for f in sorted(d.rglob("*.py")):
            rel = f.relative_to(d)
            here = ".".join([pkg, *rel.parent.parts]) if rel.parent.parts else pkg
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if not mod.startswith("alignspec"):
                    continue
                for a in node.names:
                    full = f"{mod}.{a.name}"
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        # the folder of the module it is taken from (mod: a module or a package)
                        folder = mod.rsplit(".", 1)[0] if _is_module(mod, dirs) else mod
                        if folder != here:
                            bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: {full}")
    assert not bad, bad


def _is_module(name: str, dirs: dict) -> bool:
    """Whether ``name`` is a module file (not a package folder) of the project."""
    for pkg, d in sorted(dirs.items(), key=lambda kv: -len(kv[0])):
        if name == pkg or name.startswith(pkg + "."):
            rest = name[len(pkg) + 1:].split(".") if name != pkg else []
            return bool(rest) and (d.joinpath(*rest).with_suffix(".py")).is_file()
    return False


def test_runtime_reads_no_spec_or_graph_of_a_compiled_algorithm():
    """The runtime takes what it needs from ``algo.plan`` (and the step functions): it reaches
    neither into the checked spec (``algo.spec``) nor into the compiler's graph."""
    import re
    pat = re.compile(r"\b(?:algo|current|base|self\.algo|run\.algo|run\.current|engine\.algo)\.(?:spec|graph)\b")
    bad = [f"{f.relative_to(ROOT)}:{i}: {ln.strip()}"
           for f in sorted((ROOT / "runtime").rglob("*.py"))
           for i, ln in enumerate(f.read_text().splitlines(), 1) if pat.search(ln)]
    assert not bad, bad


AGENTIC = """\
algorithm agentic
params
  n: int = 4  "episodes per prompt"
  turns: int = 3
sample
  responses = rollout(prompt, env = env, n = n, max_turns = turns, temperature = 0.9)
score
  r = reward(response) + env_reward(response)
advantage
  A = (r - group_mean(r)) / (group_std(r) + 1e-4)
loss
  minimize -mean(mean_tokens(exp(logp - logp_old) * A))
"""


def test_rollout_episodes_options_resolved(tmp_path):
    spec = tmp_path / "agentic.align"
    spec.write_text(AGENTIC)
    a = alignspec.compile(str(spec), n=6)
    p = a.plan
    assert p.sampler.kind == "rollout" and p.sampler.rows == 6 and p.group_size == 6
    assert dict(p.sampler.options) == {"env": "env", "n": 6, "max_turns": 3, "temperature": 0.9, "top_p": 1.0,
                                       "max_tokens": None, "model": "policy"}
    assert p.generates and not p.offline and not p.refill
    assert {"generation", "env"} <= a.requires and a.inputs["env_reward"] == "response"
    # the plan literal in the generated module holds the resolved options
    assert "'kind': 'rollout'" in a.source and "'max_turns': 3" in a.source


@pytest.mark.parametrize("edit, match", [
    (("env = env", "env = my_env"), "write env = env"),
    (("max_turns = turns", "max_turns = 0"), "max_turns must be at least 1"),
    (("temperature = 0.9", "temprature = 0.9"), "no option 'temprature'"),
    (("rollout(prompt", "rollout(response"), "write rollout\\(prompt"),
    (("rollout(prompt, env = env, n = n, max_turns = turns, temperature = 0.9)", "generate(prompt, n = n)"),
     "env_reward\\(response\\) is the environment's reward"),
])
def test_rollout_checker_errors(tmp_path, edit, match):
    spec = tmp_path / "bad.align"
    spec.write_text(AGENTIC.replace(*edit))
    with pytest.raises(alignspec.SpecError, match=match) as err:
        alignspec.compile(str(spec))
    assert f"{spec}:" in err.value.format()
