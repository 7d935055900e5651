"""Running a ``pipeline`` spec: one training run per stage, each stage's model feeding the next.

A pipeline spec (``algorithms/rlhf.align``)::

    pipeline
      sft = run(sft)
      rm = run(reward_model, init = sft)
      policy = run(ppo, init = sft, reference = sft, reward_model = rm)

runs its stages in order, stage ``S`` in ``OUT/S/`` (its own metrics, checkpoint, final
model in ``OUT/S/model``). Links name earlier stages and bind their final models:

- ``init = S``: the stage starts from ``OUT/S/model`` (run config ``init_model``). The
  model's defaults are still those of the run's model (the built-in tiny model or
  ``--model``): the learning rate, threads, the task. A reward-model stage takes the
  body of a causal LM and puts a new score head on it.
- ``reference = S``: the frozen reference is ``OUT/S/model`` (``reference_model``);
  without it, the reference is the stage's starting model.
- ``reward_model = S``: ``reward_model(response)`` is scored by ``OUT/S/model``
  (``reward_model``), a sequence classifier.

Without ``init`` a stage starts from the run's model (``--model``, or the built-in one the
engine picks for the stage's data kind).

Run settings (``--config``, ``--set``, ``--steps`` ...) apply to every stage; a spec
parameter goes to the stages whose spec has it; ``--set STAGE.key=value`` applies to one
stage only (``--set rm.steps=100``, ``--set policy.kl_coef=0.02``).

A stage that finished writes ``OUT/S/stage_done.json`` (its spec, links and summary).
With ``--resume`` a stage whose marker matches (same spec, same links) is not run again;
the first unfinished stage resumes from its own checkpoint (if it has one). A run without
``--resume`` removes every marker first and runs every stage. ``OUT/pipeline.json`` holds
one summary per stage; the pipeline's ``eval_score`` is its last stage's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import RunError

MARKER = "stage_done.json"
LINK_FIELDS = {"init": "init_model", "reference": "reference_model", "reward_model": "reward_model"}


def load_pipeline(spec):
    """The pipeline's plan (compiler/stages.py) when ``spec`` (name, path, text or Spec) is a
    pipeline, else None."""
    from alignspec.compiler.api import CompiledAlgorithm
    from alignspec.compiler.stages import pipeline_plan
    if isinstance(spec, CompiledAlgorithm):
        return None
    return pipeline_plan(spec)


def _split_sets(sets, stage_names) -> tuple[list[str], dict[str, list[str]]]:
    common, per = [], {n: [] for n in stage_names}
    for item in sets:
        key = item.partition("=")[0].strip()
        head, dot, rest = key.partition(".")
        if dot and head in per:
            per[head].append(f"{rest}={item.partition('=')[2]}")
        else:
            common.append(item)
    return common, per


def _spec_params(ref) -> set[str]:
    import alignspec
    return set(alignspec.compile(ref).params)


def _route_sets(common, refs: dict[str, str]) -> dict[str, list[str]]:
    """Give each stage the common --set items that are run settings or its own params."""
    from .config import RunConfig
    params = {name: _spec_params(ref) for name, ref in refs.items()}
    out = {name: [] for name in refs}
    for item in common:
        key = item.partition("=")[0].strip()
        top = key.split(".")[0]
        if top in RunConfig.model_fields and key not in set().union(*params.values()):
            for name in refs:
                out[name].append(item)
            continue
        pname = key[len("params."):] if key.startswith("params.") else key
        takers = [name for name in refs if pname in params[name]]
        if not takers:
            allp = sorted(set().union(*params.values()))
            raise RunError(f"--set {item!r}: neither a run setting nor a parameter of any stage",
                           hint=f"the stages' params are: {', '.join(allp) or '(none)'}; "
                                f"use STAGE.{key}=... for one stage")
        for name in takers:
            out[name].append(item)
    return out


def _first_eval(out: Path):
    f = out / "metrics.jsonl"
    if not f.is_file():
        return None
    for ln in f.read_text().splitlines():
        if ln.strip():
            r = json.loads(ln)
            if "eval_score" in r and r.get("step") == 0:
                return r["eval_score"]
    return None


def run_pipeline(spec, *, model=None, data=None, config=None, sets=(), out=None, steps=None, seed=None,
                 save_every=None, resume=False, eval_every=None, profile=False, on_engine=None,
                 console=None) -> dict:
    """Run every stage of the pipeline ``spec`` (see the module docstring); return the summary.

    ``on_engine(stage_name, engine)``, if given, is called with each stage's engine before it
    trains (tests use it to look at what a stage was built from).
    """
    from .build import build_engine
    pipe = load_pipeline(spec)
    if pipe is None:
        raise RunError(f"{spec} is not a pipeline")
    root = Path(out or "runs/run")
    names = [s.name for s in pipe.stages]
    refs = {s.name: s.ref for s in pipe.stages}
    common, per = _split_sets(sets, names)
    routed = _route_sets(common, refs)
    import torch
    from accelerate import PartialState
    # as the engines' Accelerator: without cpu=True a CPU machine's state is one process (the
    # state is a singleton, so this call decides it for every stage)
    state = PartialState(cpu=not torch.cuda.is_available())
    root.mkdir(parents=True, exist_ok=True)
    base_say = console.print if console is not None else print

    def say(msg) -> None:  # once, from the main process
        if state.is_main_process:
            base_say(msg)
    say(f"pipeline {pipe.name}: " + " -> ".join(f"{s.name} ({s.spec})" for s in pipe.stages) + f"; out {root}")
    summary = {"pipeline": pipe.name, "stages": []}
    for st in pipe.stages:
        sdir = root / st.name
        links = {k: str(root / v / "model") for k, v in st.links}
        marker = sdir / MARKER
        if resume and marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("spec") == st.spec and done.get("links") == links:
                say(f"stage {st.name}: finished earlier ({marker}); not run again")
                summary["stages"].append({**done, "skipped": True})
                continue
        for k, d in links.items():
            if not (Path(d) / "config.json").is_file():
                raise RunError(f"stage {st.name}: {k} = {dict(st.links)[k]}, but {d} holds no model",
                               hint=f"run stage {st.name!r}'s inputs first (without --resume)")
        extra = {LINK_FIELDS[k]: d for k, d in links.items()}
        say(f"[stage {st.name}] {st.spec}" + "".join(f", {k} = {v}" for k, v in st.links))
        user_sets = routed[st.name] + per[st.name]
        preset_sets = _stage_preset_sets(pipe.name, st.name, refs[st.name], config, user_sets, model, data, say)
        engine = build_engine(refs[st.name], model=model, data=data, config=config,
                              sets=tuple(preset_sets + user_sets), out=str(sdir), steps=steps,
                              seed=seed, save_every=save_every, resume=resume, eval_every=eval_every,
                              profile=profile, **extra)
        if not resume and engine.main:
            # the stage's folder is claimed (a refusal above leaves every marker as it was): this
            # stage and the ones after it, which read its model, are no longer finished
            for n in names[names.index(st.name):]:
                (root / n / MARKER).unlink(missing_ok=True)
        if on_engine is not None:
            on_engine(st.name, engine)
        t0 = time.perf_counter()
        res = engine.train()
        rec = {"stage": st.name, "spec": st.spec, "links": links, "out": str(sdir),
               "start_eval": _first_eval(sdir), "eval_score": res.get("eval_score"),
               "steps": res.get("steps"), "wall_s": time.perf_counter() - t0, "skipped": False}
        if engine.main:
            marker.write_text(json.dumps(rec, indent=2))
        engine.acc.wait_for_everyone()
        summary["stages"].append(rec)
    last = summary["stages"][-1] if summary["stages"] else {}
    summary["eval_score"] = last.get("eval_score")
    summary["start_eval"] = summary["stages"][0].get("start_eval") if summary["stages"] else None
    if state.is_main_process:
        (root / "pipeline.json").write_text(json.dumps(summary, indent=2))
    say(f"pipeline {pipe.name} done: " + ", ".join(
        f"{s['stage']} {_fmt(s.get('start_eval'))} -> {_fmt(s.get('eval_score'))}" for s in summary["stages"]))
    return summary


def _stage_preset_sets(pipeline, stage, ref, config, user_sets, model, data, say) -> list[str]:
    """The built-in demo's preset for this stage (runtime/presets.py), as --set items for what
    the user left unset (they come first, so the user's own items win anyway)."""
    import alignspec

    from .config import load_config
    from .presets import PIPELINE_PRESETS, stage_preset
    if stage not in PIPELINE_PRESETS.get(pipeline, {}):
        return []
    cfg = load_config(config, tuple(user_sets), spec_params=alignspec.compile(ref).params, model=model, data=data)
    fields, params = stage_preset(pipeline, stage, cfg)
    items = [f"{k}={v}" for k, v in {**fields, **params}.items()]
    if items:
        say(f"built-in preset for stage {pipeline}.{stage}: {', '.join(items)} (runtime/presets.py)")
    return items


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"
