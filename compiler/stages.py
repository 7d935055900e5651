"""Pipelines for the runtime: a ``pipeline`` spec as a frozen list of stages.

``pipeline_plan(spec)`` is what runtime/pipeline.py reads in place of the checked spec: the
pipeline's name and, per stage, its name, the spec as written (``run(sft)`` -> ``"sft"``), the
path or built-in name the checker resolved it to, and its links to earlier stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StagePlan:
    name: str
    spec: str                          # as written in the pipeline
    ref: str                           # a path (or built-in name) that alignspec.compile takes
    links: tuple[tuple[str, str], ...]  # (init | reference | reward_model, earlier stage)


@dataclass(frozen=True)
class PipelinePlan:
    name: str
    stages: tuple[StagePlan, ...]


def pipeline_plan(spec) -> PipelinePlan | None:
    """The stages of ``spec`` (a name, path, text or checked Spec) when it is a pipeline, else
    None. Raises SpecError for a spec that does not load."""
    from alignspec.dsl.check import Spec, load
    from alignspec.dsl.load import locate
    s = spec if isinstance(spec, Spec) else load(spec)
    if not s.is_pipeline:
        return None
    base = Path(s.path).parent if s.path and s.path != "<string>" else None
    return PipelinePlan(s.name, tuple(
        StagePlan(st.name, st.spec, str(locate(st.spec, base, st.span)), tuple(st.links.items()))
        for st in s.stages))
