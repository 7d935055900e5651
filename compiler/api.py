"""`alignspec.compile`: a spec (or path, or name) → a CompiledAlgorithm ready to train with.

The generated module is executed from its source (no files written), cached by the hash of
that source, and wrapped with the data the runtime needs: effective params, inputs, requires,
the sample and train settings.
"""

from __future__ import annotations

import hashlib
import time
import types
from dataclasses import dataclass, field

from alignspec.dsl.check import Spec, load

from .pipeline import compile_graph

_MODULES: dict[str, types.ModuleType] = {}


@dataclass
class LossOutput:
    loss: "torch.Tensor"            # noqa: F821 - differentiable scalar
    terms: dict                     # term name → scalar tensor
    metrics: dict[str, float] = field(default_factory=dict)


BATCH_REDUCTIONS = ("whiten", "batch_std", "mean", "sum", "token_mean_all", "token_sum_all",
                    "batch_rank", "batch_sorted", "batch_quantile")


class CompiledAlgorithm:
    """One algorithm, compiled for one set of parameter values."""

    def __init__(self, spec: Spec, graph, module: types.ModuleType, compile_seconds: float):
        self.spec = spec
        self.graph = graph
        self.module = module
        self.compile_seconds = compile_seconds
        self.name = spec.name
        self.params = dict(graph.graph["params"])
        self.inputs = dict(graph.graph["inputs"])
        self.requires = frozenset(graph.graph["requires"])
        self.source = graph.graph["source"]
        self.group_size = graph.graph["group_size"]
        self.sample_group_size = graph.graph["sample_group_size"]
        self.roles = dict(graph.graph["roles"])
        self.train = dict(graph.graph["train"])
        self.schedules = dict(graph.graph["schedules"])
        self.plan = graph.graph["plan"]  # the run plan (compiler/plan.py): what the runtime reads
        self.terms = [graph.nodes[t]["term"] for t in graph.graph["terms"]]
        # batch-wide reductions before the loss: a multi-process run takes them over every
        # process's rows (ops.batch_stats_reduce)
        self.batch_statistics = any(d["op"] in BATCH_REDUCTIONS and d["phase"] != "loss"
                                    for _, d in graph.nodes(data=True))
        self._compiled_loss = None

    def with_params(self, **overrides) -> "CompiledAlgorithm":
        """The same spec compiled again with parameter overrides (on top of this one's)."""
        return compile(self.spec, **overrides)

    def __repr__(self) -> str:
        return f"<CompiledAlgorithm {self.name} requires={sorted(self.requires)}>"

    # -- the three stages --------------------------------------------------------------
    def score(self, batch: dict) -> dict:
        """Rollout stage 1 (no grad): scores, filters, selection. Returns rows + carried values."""
        return self.module.score(batch)

    def advantage(self, batch: dict) -> dict:
        """Rollout stage 2 (no grad): values that read logp_old / logp_ref / value_old."""
        return self.module.advantage(batch)

    def step_loss(self, batch: dict, totals: dict | None = None, with_metrics: bool = True) -> LossOutput:
        """One update's loss on a (micro-)batch that already carries the rollout values."""
        fn = self._compiled_loss or self.module.loss
        total, terms, metrics = fn(batch, totals, with_metrics)
        return LossOutput(total, terms, _floats(metrics))

    def prepare(self, batch: dict) -> dict:
        """Run both rollout stages on a whole batch: returns the training batch.

        Every tensor of `batch` whose first dimension is the batch's row count is a per-row
        value and is gathered to the kept/selected rows (keep other tensors out of `batch`).
        The result also carries `_rows` (the row indices kept, in training order, or None for
        all rows), `_keep` (per sampled group) and `_rollout_metrics`.
        """
        s = self.score(batch)
        rows = s.pop("rows")
        keep = s.pop("keep")
        out = {}
        for k, v in batch.items():
            if rows is not None and hasattr(v, "shape") and v.dim() > 0 and v.shape[0] == _rows(batch):
                v = v[rows]
            out[k] = v
        out.update(s)
        adv = self.advantage(out)
        metrics = adv.pop("metrics", {})
        out.update(adv)
        out["_rollout_metrics"] = metrics
        out["_keep"] = keep
        out["_rows"] = rows
        return out

    def loss(self, batch: dict, totals: dict | None = None) -> LossOutput:
        """Every stage from raw inputs (DESIGN.md §4): scores → filters → advantages → loss."""
        prepared = self.prepare(batch)
        rollout_metrics = prepared.pop("_rollout_metrics")
        prepared.pop("_keep")
        prepared.pop("_rows")
        out = self.step_loss(prepared, totals)
        out.metrics.update(_floats(rollout_metrics))
        return out

    def use_torch_compile(self, **kwargs) -> "CompiledAlgorithm":
        """Run the loss through torch.compile (optional; see bench/loss_step.py for its effect)."""
        import torch
        self._compiled_loss = torch.compile(self.module.loss, **kwargs)
        return self


def _rows(batch):
    for v in batch.values():
        if hasattr(v, "shape") and v.dim() > 0:
            return v.shape[0]
    return 0


def _floats(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v.detach()) if hasattr(v, "detach") else float(v)
        except (TypeError, ValueError):
            continue
    return out


def compile(spec_or_path, *, debug: bool = False, **overrides) -> CompiledAlgorithm:
    """Compile a spec (a Spec, a path, a built-in name or spec text) with parameter overrides."""
    t0 = time.perf_counter()
    if isinstance(spec_or_path, Spec):
        spec = spec_or_path if not overrides else load_again(spec_or_path, overrides)
    else:
        spec = load(spec_or_path, **overrides)
    if spec.resolved.file.kind == "library":
        from alignspec.dsl.load import error
        raise error(f"{spec.name} is a library (only `def`s): there is nothing to compile; "
                    "import it from an algorithm (`import " + spec.name + "`)", spec.resolved.file.span, "library")
    if spec.is_pipeline:
        from alignspec.dsl.load import error
        raise error(f"{spec.name} is a pipeline of stages ({', '.join(s.name for s in spec.stages)}); "
                    "compile each stage's spec, or run the pipeline with `alignspec run`",
                    spec.resolved.file.span, "pipeline")
    graph = compile_graph(spec, debug=debug)
    module = _module(spec.name, graph.graph["source"])
    return CompiledAlgorithm(spec, graph, module, time.perf_counter() - t0)


def load_again(spec: Spec, overrides: dict) -> Spec:
    from alignspec.dsl.check import check
    merged = {k: p.value for k, p in spec.params.items() if p.value != p.default}
    merged.update(overrides)
    return check(spec.resolved, merged)


def _module(name: str, source: str) -> types.ModuleType:
    key = hashlib.sha256(source.encode()).hexdigest()
    mod = _MODULES.get(key)
    if mod is None:
        mod = types.ModuleType(f"alignspec_generated_{name}_{key[:8]}")
        mod.__file__ = f"<alignspec:{name}:{key[:8]}>"
        exec(compile_source(source, mod.__file__), mod.__dict__)
        _MODULES[key] = mod
    return mod


def compile_source(source: str, filename: str):
    import builtins
    return builtins.compile(source, filename, "exec")
