"""The compiler, as a table of contents: a checked spec goes through these passes in order.

Each pass is a pure function graph → graph (see its module docstring for what it requires
and ensures). `compile_graph(spec, debug=True)` runs the IR verifier after every pass;
`dump_after` returns the graph as it stands after a named pass (`alignspec compile
--dump-after fold`).
"""

from __future__ import annotations

from .ir import verify
from .passes.cse import cse
from .passes.dead import dead
from .passes.fold import fold
from .passes.levels import check_levels
from .passes.lower import lower
from .passes.phases import phases
from .passes.plan import plan
from .passes.resolve import resolve

PASSES = [
    ("resolve", resolve),            # checked spec → graph with effective parameter values
    ("check_levels", check_levels),  # every node's level follows from its arguments
    ("fold", fold),                  # structural parameters and constants folded (beta = 0 cuts KL)
    ("dead", dead),                  # nothing that no output reads (e.g. the reference model)
    ("cse", cse),                    # each computation once
    ("phases", phases),              # score / rollout / update split; inputs and requires
    ("plan", plan),                  # the run plan: sampler, data, filters, select, train settings
    ("lower", lower),                # readable PyTorch source
]
PASS_NAMES = [name for name, _ in PASSES]


def compile_graph(spec, *, debug: bool = False, stop_after: str | None = None):
    g = spec
    for name, fn in PASSES:
        g = fn(g)
        if debug:
            verify(g, after=name)
        if name == stop_after:
            break
    return g
