"""alignspec: declarative post-training algorithms for language models.

    spec = alignspec.load("algorithms/grpo.align")   # parse + check (no torch import)
    algo = alignspec.compile(spec, beta=0.0)         # → CompiledAlgorithm (imports torch)
    out = algo.loss(batch)                           # out.loss, out.metrics
"""

from alignspec.dsl.errors import SpecError, Span

__all__ = ["SpecError", "Span", "load", "compile", "__version__"]
__version__ = "0.1.0"


def load(path_or_text, **overrides):
    """Parse and check a spec: a path, a built-in name (`"grpo"`) or spec text."""
    from alignspec.dsl.check import load as _load
    return _load(path_or_text, **overrides)


def compile(spec_or_path, **overrides):  # noqa: A001 - the public name DESIGN.md fixes
    """Compile a spec into a CompiledAlgorithm; keyword arguments override its params."""
    from alignspec.compiler.api import compile as _compile
    return _compile(spec_or_path, **overrides)
