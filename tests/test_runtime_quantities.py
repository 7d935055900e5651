"""The runtime quantities added for KTO, TIS and the top-entropy rule: the sampler's own
log-probs (`logp_sampler`), unpaired labelled data with the mismatched pairs' log-probs, and
`entropy_old`; each end to end for a few steps on the tiny built-in model."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.engine import run_from_cli  # noqa: E402
from helpers import read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache")  # conftest: a shared model cache, offline


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignspec.runtime.models.tiny import build_tiny_model
    d = build_tiny_model(tmp_path_factory.mktemp("m"), "llama", seed=3)
    return AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sampler_logprobs_are_those_of_the_distribution_drawn_from(tiny_lm, fast, temperature, top_p):
    from alignspec.runtime.rollout.generation import generate_groups
    model, tok = tiny_lm
    ro = generate_groups(model, tok, ["1+2=", "3+4=", "9+9="], 3, max_new_tokens=5, temperature=temperature,
                         top_p=top_p, generator_seed=0, fast=fast, sampler_logprobs=True)
    assert ro.sampler_logprobs.shape == ro.completion_ids.shape
    with torch.no_grad():
        logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits.double()
    P = ro.prompt_ids.shape[1]
    logits = logits[:, P - 1:-1] / temperature
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:  # the nucleus, renormalised (as the samplers restrict it)
        sp, si = probs.sort(-1)
        drop = sp.cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    want = torch.log(probs.gather(-1, ro.completion_ids[..., None]).squeeze(-1))
    m = ro.completion_mask.bool()
    torch.testing.assert_close(ro.sampler_logprobs.double()[m], want[m], rtol=1e-4, atol=1e-4)
    assert (ro.sampler_logprobs[~m] == 0).all()


def test_grpo_tis_runs_and_its_weights_are_near_one(tmp_path):
    out = tmp_path / "tis"
    assert run_from_cli("grpo_tis", out=str(out), steps=2, sets=["batch_size=2", "eval_every=0"]) == 0
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert len(steps) == 2
    for r in steps:  # the same weights sample and train: pi_train / pi_sampler = 1 up to float noise
        assert abs(r["w/mean"] - 1.0) < 1e-3


def test_kto_on_unpaired_data(tmp_path):
    from alignspec.runtime.models.tiny import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "m", "llama", seed=1)
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1 - k), "label": k == 0}) + "\n"
                            for a in range(6) for k in (0, 1)))
    out = tmp_path / "out"
    assert run_from_cli("kto", model=model_dir, data=str(data), out=str(out), steps=2,
                        sets=["batch_size=4", "eval_every=0"]) == 0
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert len(steps) == 2 and all(r["loss"] == r["loss"] for r in steps)
    assert all(r["z0"] >= 0 for r in steps)  # the reference point, clamped at 0


def test_kto_refuses_labels_that_are_not_booleans(tmp_path, capsys):
    from alignspec.runtime.models.tiny import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "m", "llama", seed=1)
    data = tmp_path / "kto.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2", "label": "yes"}) + "\n")
    rc = run_from_cli("kto", model=model_dir, data=str(data), out=str(tmp_path / "o"), steps=1,
                      sets=["batch_size=1", "eval_every=0"])
    assert rc != 0
    assert "row 0's label is 'yes'" in capsys.readouterr().err


TOP_ENTROPY = """algorithm top_entropy extends grpo

advantage
  A = (r - group_mean(r)) / (group_std(r) + 1e-4)
  hot = entropy_old >= batch_quantile(entropy_old, 0.8)

loss
  ratio = exp(logp - logp_old)
  pg = min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
  minimize -token_mean_all(where(hot, pg, 0))
"""


def test_entropy_old_and_a_batch_quantile_in_a_run(tmp_path):
    spec = tmp_path / "top_entropy.align"
    spec.write_text(TOP_ENTROPY)
    out = tmp_path / "out"
    assert run_from_cli(str(spec), out=str(out), steps=2, sets=["batch_size=2", "eval_every=0"]) == 0
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert len(steps) == 2 and all(0 < r["hot/mean"] < 1 for r in steps)
