"""Models as a TRL user names them (issue 11): a hub id resolved from the user's cache
(runtime/models/hub.py), trust_remote_code, a PEFT adapter folder as --model
(runtime/models/adapter_model.py). Offline: the tests build a hub-layout cache themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignspec.runtime.engine import build_engine, run_from_cli  # noqa: E402
from alignspec.runtime.errors import RunError  # noqa: E402
from alignspec.runtime.models.hub import looks_like_hub_id, resolve_model  # noqa: E402
from alignspec.runtime.models.tiny import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("alignspec_cache", "restore_torch_threads")
SETS = ["batch_size=2", "max_new_tokens=4", "lr=1e-3"]
SHA = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, build=build_tiny_model, **kw) -> Path:
    """``root/hub/models--org--name`` as huggingface_hub lays it out: refs/main -> a commit,
    snapshots/<commit>/ with the files (plain files; the hub links them to blobs/)."""
    folder = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = folder / "snapshots" / SHA
    build(snap, **kw)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(SHA)
    return snap


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(tmp_path):
    return _jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)}
                                            for i in range(6)])


def _demos(tmp_path):
    return _jsonl(tmp_path / "demos.jsonl", [{"prompt": f"{i}+2=", "response": str(i + 2)} for i in range(6)])


def test_hub_id_shapes():
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and looks_like_hub_id("gpt2")
    for s in ("./model", "/abs/model", "runs/a/model", "~/m", "a/../b", "org/name/extra", "x."):
        assert not looks_like_hub_id(s), s


def test_a_hub_id_trains_unchanged_from_the_cache_offline(tmp_path, hf_home):
    snap = hub_cache(hf_home, "tiny-org/tiny-llama")
    assert resolve_model("tiny-org/tiny-llama") == snap
    out = tmp_path / "run"
    # --model and reference_model both by hub id; DPO reads logp_ref, so both load
    eng = build_engine("dpo", model="tiny-org/tiny-llama", data=str(_pairs(tmp_path)), out=str(out), steps=2,
                       sets=SETS + ["reference_model=tiny-org/tiny-llama"])
    assert Path(eng.state.model_dir) == snap and eng.state.reference is not None
    eng.train()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    assert "tiny-org/tiny-llama" in (out / "model" / "README.md").read_text()


def test_a_hub_id_that_is_not_cached_is_a_clear_error_offline(tmp_path, hf_home, capsys):
    rc = run_from_cli("sft", model="nobody/not-cached", data=str(_demos(tmp_path)), out=str(tmp_path / "o"),
                      steps=1, sets=SETS)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "nobody/not-cached" in err and f"not in the cache at {hf_home / 'hub'}" in err, err
    assert "HF_HUB_OFFLINE=1" in err and "Traceback" not in err


def test_a_missing_local_path_keeps_the_not_found_error(tmp_path, hf_home):
    with pytest.raises(RunError, match="model directory not found"):
        build_engine("sft", model=str(tmp_path / "no" / "such" / "dir"), data=str(_demos(tmp_path)),
                     out=str(tmp_path / "o"), steps=1, sets=SETS)


def test_reward_model_by_hub_id_not_cached_names_the_setting(tmp_path, hf_home, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])
    rc = run_from_cli("ppo", data=str(prompts), out=str(tmp_path / "o"), steps=1,
                      sets=SETS + ["reward_model=nobody/no-rm"])
    err = capsys.readouterr().err
    assert rc == 2 and "reward_model 'nobody/no-rm'" in err and "not in the cache" in err, err


CONFIG_PY = '''
from transformers import LlamaConfig

class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom_llama"
'''
MODELING_PY = '''
from transformers import LlamaForCausalLM
from .configuration_tiny import TinyCustomConfig

class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''


def custom_code_model(path: Path) -> Path:
    """A tiny Llama whose config names its own code (auto_map), as hub models with custom code do."""
    build_tiny_model(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "tiny_custom_llama"
    cfg["architectures"] = ["TinyCustomForCausalLM"]
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny.TinyCustomConfig",
                       "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "configuration_tiny.py").write_text(CONFIG_PY)
    (path / "modeling_tiny.py").write_text(MODELING_PY)
    return path


def test_custom_code_needs_trust_remote_code(tmp_path, hf_home, capsys):
    model = custom_code_model(tmp_path / "custom")
    rc = run_from_cli("sft", model=str(model), data=str(_demos(tmp_path)), out=str(tmp_path / "o"), steps=1,
                      sets=SETS)
    err = capsys.readouterr().err
    assert rc == 2 and "trust_remote_code is false" in err and "custom code" in err, err
    assert "configuration_tiny.TinyCustomConfig" in err and "Traceback" not in err and "[y/N]" not in err
    # with the setting on, the model's own code loads it (in a fresh process: transformers copies the
    # code into HF_HOME/modules, which it reads at import)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "alignspec", "run", "sft", "--model", str(model), "--data",
                          str(_demos(tmp_path)), "--out", str(tmp_path / "o2"), "--steps", "1",
                          *sum((["--set", s] for s in SETS + ["trust_remote_code=true"]), [])],
                         capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    saved = json.loads((tmp_path / "o2" / "model" / "config.json").read_text())
    assert saved["model_type"] == "tiny_custom_llama"
    assert (hf_home / "modules").is_dir()  # the code was loaded from the model, under HF_HOME


def _adapter(tmp_path: Path, base_ref: str) -> Path:
    """A PEFT LoRA adapter (r=4 on q/v) with non-zero B weights, naming ``base_ref`` as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = build_tiny_model(tmp_path / "base_for_adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj",
                                                                                                       "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_ref
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_a_peft_adapter_folder_as_model_trains_the_adapter_on_its_hub_base(tmp_path, hf_home):
    hub_cache(hf_home, "tiny-org/tiny-llama")  # the same weights as base_for_adapter (seed 0)
    adapter = _adapter(tmp_path, "tiny-org/tiny-llama")
    eng = build_engine("sft", model=str(adapter), data=str(_demos(tmp_path)), out=str(tmp_path / "o"), steps=2,
                       sets=SETS)
    from peft import PeftModel
    assert eng.state.lora and isinstance(eng.state.policy, PeftModel)
    lora = {n: p.detach().clone() for n, p in eng.state.policy.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for n, p in eng.state.policy.named_parameters() if "lora_" in n)
    assert all(float(v.abs().max()) == pytest.approx(0.01) for n, v in lora.items() if "lora_B" in n)
    assert all(v.shape[0] == 4 for n, v in lora.items() if "lora_A" in n)  # the adapter's own rank
    base_before = {n: p.detach().clone() for n, p in eng.state.policy.named_parameters() if "lora_" not in n}
    eng.train()
    after = dict(eng.state.policy.named_parameters())
    assert any(not torch.equal(lora[n], after[n].detach()) for n in lora)  # the adapter learned
    assert all(torch.equal(base_before[n], after[n].detach()) for n in base_before)  # the base is frozen


def test_a_peft_adapter_with_lora_r_or_lora_adapter_is_refused(tmp_path, hf_home):
    base = build_tiny_model(tmp_path / "b")
    adapter = _adapter(tmp_path, base)
    with pytest.raises(RunError, match="brings its own rank"):
        build_engine("sft", model=str(adapter), data=str(_demos(tmp_path)), out=str(tmp_path / "o"), steps=1,
                     sets=SETS + ["lora_r=8"])
    with pytest.raises(RunError, match="reference_model .* holds a PEFT adapter, not a full model"):
        build_engine("dpo", model=base, data=str(_pairs(tmp_path)), out=str(tmp_path / "o2"), steps=1,
                     sets=SETS + [f"reference_model={adapter}"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match="names no base_model_name_or_path"):
        build_engine("sft", model=str(adapter), data=str(_demos(tmp_path)), out=str(tmp_path / "o3"), steps=1,
                     sets=SETS)
    shutil.rmtree(adapter)


def test_a_tokenizer_auto_map_with_a_null_first_entry_names_the_real_code(tmp_path):
    """{"AutoTokenizer": [null, "tokenization_x.XTokenizerFast"]}: the slow class is absent (null),
    the fast one is the custom code that would run."""
    import json

    from alignspec.runtime.errors import RunError
    from alignspec.runtime.models.hub import remote_code_check
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": [None, "tokenization_x.XTokenizerFast"]}}))
    with pytest.raises(RunError) as e:
        remote_code_check(tmp_path, False)
    assert "names custom code (tokenization_x.XTokenizerFast)" in str(e.value) and "None" not in str(e.value)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": [None, None]}}))
    remote_code_check(tmp_path, False)  # every entry null: it names no code (transformers runs none)
