"""Model paths as a TRL user writes them: a local directory or a Hugging Face hub id.

``resolve_model(name, setting)`` returns a local directory for every model setting
(``--model``, ``reference_model``, ``reward_model``, ``preference_model``,
``embedding_model``, ``init_model``, ``lora_adapter``):

- an existing path is used as it is (the loaders check what it holds);
- a name that is not a local path and looks like a hub id (``Qwen/Qwen2.5-0.5B-Instruct``,
  ``gpt2``) is resolved by ``huggingface_hub.snapshot_download`` in the user's cache
  (``HF_HUB_CACHE``, else ``HF_HOME/hub``, read when the run starts): it downloads when online
  and uses the cached snapshot with ``HF_HUB_OFFLINE=1``, where a model that is not cached is a
  ``RunError`` naming the id and the cache folder;
- anything else (``./ckpt/final``, ``runs/a/model``) is returned as a path, so the loaders give
  their "not found" error.

Downloads skip formats the loaders never read (GGUF, ONNX, TF/Flax weights, ``original/``), and
``*.bin`` weights when the repository also has ``*.safetensors``.

``remote_code_check(dir, trust, setting)`` refuses, with a message naming the setting, a model
whose ``config.json`` (or tokenizer config) points at custom code (``auto_map``) that
transformers has no built-in class for, unless ``trust_remote_code: true``; every
``from_pretrained`` gets ``trust_remote_code`` explicitly, so transformers never asks [y/N].
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import RunError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_SKIP = ["*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.tflite", "*.ot", "*.mlmodel",
         "original/*", "onnx/*", "openvino/*", "coreml/*"]
_TRUE = ("1", "true", "yes", "on")


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name``: letters, digits, ``-``, ``_`` and ``.``, no ``..``."""
    s = str(name)
    return bool(_HUB_ID.match(s)) and ".." not in s and not s.endswith(".")


def hub_cache() -> Path:
    """The hub cache folder of this process's environment (read now, not at import)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE")
    if v is not None:
        return v.strip().lower() in _TRUE
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def resolve_model(name, setting: str = "model") -> Path:
    """A local directory for ``name`` (see the module docstring)."""
    raw = str(name)
    p = Path(os.path.expanduser(raw))
    if p.exists() or not looks_like_hub_id(raw):
        return p
    return _snapshot(raw, setting)


def _skip_patterns(repo_id: str, cache: Path) -> list[str]:
    """What not to download: the formats above, and ``*.bin`` next to ``*.safetensors``."""
    try:
        from huggingface_hub import HfApi
        files = [s.rfilename for s in (HfApi().model_info(repo_id).siblings or [])]
    except Exception:  # snapshot_download reports the reason (not found, gated, no network)
        return list(_SKIP)
    if any(f.endswith(".safetensors") for f in files):
        return [*_SKIP, "*.bin", "*.pth", "*.pt"]
    return list(_SKIP)


def _snapshot(repo_id: str, setting: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors
    cache, offline = hub_cache(), hub_offline()
    where = f"{setting} {repo_id!r}"
    try:
        path = snapshot_download(repo_id, cache_dir=str(cache), local_files_only=offline,
                                 ignore_patterns=list(_SKIP) if offline else _skip_patterns(repo_id, cache))
    except hf_errors.GatedRepoError as e:
        raise RunError(f"{where}: the hub repository is gated and this machine has no access to it",
                       hint="accept its terms on the hub, then log in (hf auth login) or set HF_TOKEN") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise RunError(f"{where} is neither a local directory nor a model on the hub (or it is private)",
                       hint="check the path or the id; for a private model log in (hf auth login)") from e
    except hf_errors.RevisionNotFoundError as e:
        raise RunError(f"{where}: revision not found on the hub: {e}") from e
    except hf_errors.LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE=1" if offline else "the hub could not be reached"
        raise RunError(f"{where} is not a local directory, and as a hub id it is not in the cache at {cache} "
                       f"({why})", hint="download it once online (huggingface-cli download "
                       f"{repo_id}), point HF_HOME / HF_HUB_CACHE at the cache that has it, or give a local "
                       "directory") from None
    except (OSError, ValueError) as e:
        raise RunError(f"{where}: could not get it from the hub into {cache}: {type(e).__name__}: {e}") from e
    return Path(path)


def remote_code_check(p: Path, trust: bool, setting: str = "model") -> None:
    """A RunError when ``p`` needs custom code (``auto_map`` and no built-in class) and
    ``trust_remote_code`` is off."""
    if trust:
        return
    for name in ("config.json", "tokenizer_config.json"):
        f = p / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # transformers' own error names the broken file
        auto = cfg.get("auto_map") if isinstance(cfg, dict) else None
        code = _first(auto) if auto else None
        if code is None:  # (every entry null, e.g. {"AutoTokenizer": [null, null]}: no code named)
            continue
        if name == "config.json" and _builtin_model_type(cfg.get("model_type")):
            continue  # transformers has its own class for it and uses that with trust_remote_code=False
        if name == "tokenizer_config.json" and _builtin_tokenizer(cfg.get("tokenizer_class")):
            continue
        raise RunError(f"{setting} {p}: {name} names custom code ({code}) that would run on this machine, "
                       "and trust_remote_code is false",
                       hint="read that code, then set trust_remote_code: true (--set trust_remote_code=true) "
                            "to run it; nothing is executed otherwise")


def _first(auto) -> str | None:
    """The first code reference of an ``auto_map`` (a tokenizer's is ``[slow, fast]``, either
    of which may be null); None when it names none."""
    values = auto.values() if isinstance(auto, dict) else [auto]
    for v in values:
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if x is not None and str(x).strip():
                return str(x)[:200]
    return None


def _builtin_model_type(model_type) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def _builtin_tokenizer(cls) -> bool:
    if not isinstance(cls, str):
        return False
    import transformers
    return hasattr(transformers, cls) or hasattr(transformers, cls.removesuffix("Fast"))


_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def is_adapter_dir(p: Path) -> bool:
    """A PEFT adapter folder: adapter_config.json and no full model (no config.json, or no
    full weights beside it, as adapter repositories that copy the base's config have)."""
    if not (p / "adapter_config.json").is_file():
        return False
    return not (p / "config.json").is_file() or not any((p / f).is_file() for f in _FULL_WEIGHTS)


def adapter_base(p: Path) -> str:
    """``base_model_name_or_path`` of the PEFT adapter in ``p`` (a local dir or a hub id)."""
    try:
        cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunError(f"{p}/adapter_config.json could not be read: {type(e).__name__}: {e}") from None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise RunError(f"{p} holds a PEFT adapter whose adapter_config.json names no base_model_name_or_path",
                       hint="add the base model's directory or hub id there, or load the base with --model and "
                            "the adapter with lora_adapter")
    return base
