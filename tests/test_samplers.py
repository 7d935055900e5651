"""Samplers sit behind one interface (runtime/rollout/base.py), chosen by the run plan: the
loop calls whatever class is registered for the plan's sampler kind."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

from helpers import QUIET, quiet, read_metrics  # noqa: E402

from alignspec.compiler.plan import SAMPLER_OPTIONS  # noqa: E402
from alignspec.runtime.engine import build_engine  # noqa: E402
from alignspec.runtime.rollout import base  # noqa: E402
from alignspec.runtime.rollout.offline import Pairs  # noqa: E402


def test_every_kind_the_compiler_plans_has_a_sampler():
    from alignspec.runtime.rollout import concat, episodes, flow_sde, generate, offline, tree  # noqa: F401
    assert set(SAMPLER_OPTIONS) <= set(base.SAMPLERS)


def test_a_registered_sampler_replaces_the_built_in_one_without_touching_the_loop(tmp_path, monkeypatch):
    """A sampler registered for "pairs" that hands every pair back as (rejected, chosen):
    the loop uses it (it is called once per step) and DPO's first loss is still log 2 (the
    policy is its own reference), while the rows it trained on are the swapped ones."""
    calls = []

    class Swapped(Pairs):
        def sample(self, recs, seed):
            calls.append(len(recs))
            return [[b, a] for a, b in super().sample(recs, seed)]
    monkeypatch.setitem(base.SAMPLERS, "pairs", Swapped)
    eng = quiet(build_engine("dpo", out=str(tmp_path / "o"), steps=2, sets=["batch_size=4"] + QUIET))
    eng.train()
    assert calls == [4, 4]
    first = next(r for r in read_metrics(tmp_path / "o") if "loss" in r)
    assert abs(first["loss"] - math.log(2)) < 1e-5
    rec = eng.state.records[0]
    chosen, rejected = eng.sample([rec], 0)[0]
    assert chosen["text"] == rec["rejected"] and rejected["text"] == rec["chosen"]


def test_an_unknown_sampler_kind_is_a_clear_error(monkeypatch):
    import pytest

    from alignspec.compiler.plan import SamplerPlan
    from alignspec.runtime.errors import RunError
    base.build_sampler(SamplerPlan("pairs", rows=2), run=None)  # registers every built-in sampler
    monkeypatch.delitem(base.SAMPLERS, "generate")
    with pytest.raises(RunError, match="sampler generate"):
        # build_sampler re-imports the modules (already imported: no re-registration)
        base.build_sampler(SamplerPlan("generate", rows=1), run=None)
