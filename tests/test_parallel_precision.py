"""``mixed_precision=bf16`` on one process (accelerate's autocast): grpo learns on the built-in
task, the forward computes in bf16, the weights and AdamW moments stay float32 and the saved
model is float32 (FSDP2's MixedPrecisionPolicy is checked in tests/test_parallel.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from alignspec.runtime.engine import build_engine  # noqa: E402
from helpers import quiet, read_metrics, read_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache", "restore_torch_threads")


def test_bf16_mixed_precision_grpo_learns_with_float32_master_weights(tmp_path):
    out = tmp_path / "grpo"
    eng = quiet(build_engine("grpo", out=str(out), steps=100, seed=0, eval_every=0,
                             sets=["mixed_precision=bf16"]))
    compute = set()
    proj = next(m for n, m in eng.state.model.named_modules() if n.endswith("q_proj"))
    proj.register_forward_hook(lambda m, i, o: compute.add(o.dtype) if torch.is_grad_enabled() else None)
    eng.train()
    assert compute == {torch.bfloat16}
    assert {p.dtype for p in eng.state.model.parameters()} == {torch.float32}
    assert {st["exp_avg"].dtype for st in eng.state.optimizer.state.values()} == {torch.float32}
    assert {v.dtype for v in read_weights(out / "model").values()} == {torch.float32}
    ev = [r["eval_score"] for r in read_metrics(out) if "eval_score" in r]
    assert ev[0] < 0.3 and ev[-1] >= ev[0] + 0.2, ev


def test_engines_with_other_precisions_follow_in_one_process(tmp_path):
    """accelerate keeps one state per process: each engine still gets its own precision."""
    for mp in ("bf16", "no", "bf16"):
        eng = quiet(build_engine("sft", out=str(tmp_path / mp), steps=1, sets=[f"mixed_precision={mp}"]))
        assert eng.state.acc.mixed_precision == mp
