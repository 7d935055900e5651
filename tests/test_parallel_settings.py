"""The parallel, precision, checkpointing and LoRA settings (runtime/parallel/settings.py, lora.py).

Bad combinations fail with a clear message and exit code 2 before anything loads (a missing
model directory would be reported otherwise); accelerate's launcher environment selects
FSDP2 or is refused; LoRA settings reach ``peft.LoraConfig``; a run starts from an existing
adapter directory; QLoRA trains adapters on a bitsandbytes 4-bit base.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.config import load_config  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402
from alignspec.runtime.parallel import settings  # noqa: E402
from helpers import QUIET, quiet, read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache", "restore_torch_threads")


def _cfg(*sets):
    return load_config(None, sets)


BAD = [
    (["parallel=fsdp2"], "this run has one process"),
    (["mixed_precision=fp16"], "needs a CUDA device"),
    (["mixed_precision=bf16", "dtype=bf16"], "keeps float32 master weights"),
    (["qlora=true"], "LoRA is off"),
    (["lora_adapter=/nonexistent/adapter"], "no adapter_config.json"),
]


@pytest.mark.parametrize("sets,message", BAD, ids=[m.split()[0] + "-" + s[0].split("=")[0] for s, m in BAD])
def test_bad_settings_fail_before_anything_loads(sets, message, tmp_path, capsys, monkeypatch):
    """`alignspec run` with a model directory that does not exist: the settings error comes first."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from alignspec.runtime.engine import run_from_cli
    code = run_from_cli("dpo", model=str(tmp_path / "no-such-model"), out=str(tmp_path / "o"),
                        sets=sets)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "model directory not found" not in err, err
    assert not (tmp_path / "o").exists()


def test_qlora_without_bitsandbytes_is_refused(monkeypatch):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find(name, *a))
    with pytest.raises(RunError, match="qlora needs the bitsandbytes package"):
        settings.resolve(_cfg("qlora=true", "lora_r=8"), env={}, cuda=True)


def test_qlora_trains_adapters_on_a_4bit_base(tmp_path):
    """bitsandbytes' NF4 layers under LoRA adapters (on a CPU here: its 4-bit CPU kernels want
    layer widths that are multiples of their block, so intermediate 128)."""
    import json

    import bitsandbytes as bnb

    from alignspec.runtime.engine import build_engine
    from alignspec.runtime.models.tiny import build_tiny_model
    model = build_tiny_model(tmp_path / "m", "llama", seed=3, intermediate=128)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)}) + "\n"
                            for i in range(4)))
    eng = quiet(build_engine("dpo", model=model, data=str(data), out=str(tmp_path / "o"), steps=3,
                             sets=QUIET + ["batch_size=4", "lr=1e-2", "qlora=true", "lora_r=4"]))
    base = [m for m in eng.state.policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(base) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    trained = [n for n, p in eng.state.policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    eng.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "o") if "loss" in r]
    assert losses[-1] < losses[0]
    assert (tmp_path / "o" / "model" / "config.json").is_file()


def test_fsdp2_refusals_name_what_is_not_covered():
    env = {"WORLD_SIZE": "2"}
    with pytest.raises(RunError, match="LoRA under parallel=fsdp2"):
        settings.resolve(_cfg("parallel=fsdp2", "lora_r=4"), env=env, cuda=False)
    with pytest.raises(RunError, match="fp16 under parallel=fsdp2"):
        settings.resolve(_cfg("parallel=fsdp2", "mixed_precision=fp16"), env=env, cuda=True)
    import alignspec
    with pytest.raises(RunError, match="self-play iterations"):
        settings.resolve(_cfg("parallel=fsdp2"), alignspec.compile("spin"), env=env, cuda=False)
    agentic = ("algorithm agentic\nsample\n  responses = rollout(prompt, env = env, n = 2)\nscore\n  r = env_reward(response)\n"
               "advantage\n  A = r - group_mean(r)\nloss\n  minimize pg = -token_mean_all(logp * A)\n")
    with pytest.raises(RunError, match="multi-turn episodes"):
        settings.resolve(_cfg("parallel=fsdp2"), alignspec.compile(agentic), env=env, cuda=False)
    with pytest.raises(RunError, match="flow policy family .* does not support them"):
        from alignspec.runtime.engine import build_engine
        build_engine("flow_grpo", sets=["gradient_checkpointing=true"])
    with pytest.raises(RunError, match="tree search and reward-model training"):
        settings.resolve(_cfg("parallel=fsdp2"), alignspec.compile("mcts"), env=env, cuda=False)
    # embeddings of responses (the policy's hidden states, gathered) are covered: tests/test_parallel.py
    assert settings.resolve(_cfg("parallel=fsdp2"), alignspec.compile("ampo"), env=env, cuda=False).fsdp2
    plan = settings.resolve(_cfg("parallel=fsdp2", "mixed_precision=bf16", "gradient_checkpointing=true"),
                            alignspec.compile("grpo"), env=env, cuda=False)
    assert plan.fsdp2 and plan.world == 2 and plan.mixed_precision == "bf16" and plan.gradient_checkpointing


def test_accelerate_launch_config_selects_fsdp2_or_is_refused():
    """What `accelerate launch --config_file fsdp2.yaml` puts in the environment."""
    fsdp2 = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
             "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_ACTIVATION_CHECKPOINTING": "true",
             "ACCELERATE_MIXED_PRECISION": "bf16"}
    plan = settings.resolve(_cfg(), env=fsdp2, cuda=False)
    assert (plan.parallel, plan.reshard_after_forward, plan.gradient_checkpointing, plan.mixed_precision) == \
        ("fsdp2", False, True, "bf16")
    # what the run sets explicitly wins over the launcher's defaults
    plan = settings.resolve(_cfg("gradient_checkpointing=false", "mixed_precision=no"), env=fsdp2, cuda=False)
    assert not plan.gradient_checkpointing and plan.mixed_precision == "no"
    with pytest.raises(RunError, match="contradicts the launch configuration"):
        settings.resolve(_cfg("parallel=ddp"), env=fsdp2, cuda=False)
    with pytest.raises(RunError, match="FSDP version 1 is not supported"):
        settings.resolve(_cfg(), env={**fsdp2, "FSDP_VERSION": "1"}, cuda=False)
    with pytest.raises(RunError, match="DeepSpeed mode is not supported"):
        settings.resolve(_cfg(), env={"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, cuda=False)


def test_setting_values_are_checked_and_described():
    assert _cfg("mixed_precision=no").mixed_precision == "no"  # YAML's bare `no` is false
    for bad, field in (("parallel=zero3", "parallel"), ("mixed_precision=fp8", "mixed_precision"),
                       ("lora_dropout=1.5", "lora_dropout")):
        with pytest.raises(RunError, match=field) as e:
            _cfg(bad)
        assert "invalid run configuration" in str(e.value)


def test_lora_settings_reach_peft_and_an_adapter_directory_is_a_start(tmp_path):
    import torch

    from alignspec.runtime.engine import build_engine
    eng = quiet(build_engine("sft", out=str(tmp_path / "a"), steps=2,
                             sets=QUIET + ["lora_r=4", "lora_alpha=16", "lora_dropout=0.1",
                                           "lora_target_modules=[q_proj, v_proj]"]))
    pc = eng.state.policy.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.lora_dropout, set(pc.target_modules)) == (4, 16, 0.1, {"q_proj", "v_proj"})
    trained = {n for n, p in eng.state.policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trained)
    eng.train()
    adapter = tmp_path / "adapter"
    eng.state.policy.save_pretrained(str(adapter))
    saved = {n: p.detach().clone() for n, p in eng.state.policy.named_parameters() if "lora_B" in n}
    assert any(v.abs().sum() > 0 for v in saved.values())  # lora_B starts at 0: it trained
    eng2 = quiet(build_engine("sft", out=str(tmp_path / "b"), steps=1,
                              sets=QUIET + [f"lora_adapter={adapter}"]))
    now = dict(eng2.state.policy.named_parameters())
    for n, v in saved.items():
        assert torch.equal(now[n].detach(), v), n
        assert now[n].requires_grad
    with pytest.raises(RunError, match="lora_target_modules"):
        build_engine("sft", out=str(tmp_path / "c"), steps=1, sets=QUIET + ["lora_r=4",
                                                                          "lora_target_modules=[nope]"])


def test_sharded_checkpoint_metadata_is_read_without_unpickling_arbitrary_objects(tmp_path):
    """DCP's ``.metadata`` is a pickle: parallel/sharded_checkpoint.py reads it with an unpickler that
    builds DCP's metadata classes only, and non-tensor values with ``weights_only=True``; a
    ``.metadata`` that names anything else (here ``os.system``) is refused before it runs."""
    import pickle
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from alignspec.runtime.parallel import sharded_checkpoint as sc
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.01)
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(lin, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... a single process"
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
        other = torch.nn.Linear(3, 2)
        other_opt = torch.optim.AdamW(other.parameters(), lr=0.5)
        other(torch.ones(1, 3)).sum().backward()
        other_opt.step()
        back = dict(zip(("model", "optim"), get_state_dict(other, other_opt)))
        dcp.load(back, storage_reader=sc._reader(tmp_path / "ok"), planner=sc._planner(), no_dist=True)
    assert all(torch.equal(back["model"][k], v) for k, v in msd.items())
    assert back["optim"]["param_groups"][0]["lr"] == 0.01  # a non-tensor value, loaded weights_only

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(RunError, match="refused to load"):
        sc._reader(bad).read_metadata()
    assert not (tmp_path / "pwned").exists()
