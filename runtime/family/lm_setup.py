"""Setup of the token-LM policy family: its models and its data (family/token_policy.py's ``_build``).

``run`` is the run state being built (a ``TokenState``, state.py). ``load_data(run)`` comes
first, so that bad data fails before any model is built; ``load_models(run)`` then builds
exactly what the spec requires.
"""

from __future__ import annotations

from ..errors import RunError
from ..models.loaders import add_value_head, load_frozen_copy, load_policy


def load_models(run) -> None:
    """The policy (or a reward-model head), LoRA adapters, a value head for a critic and the frozen
    reference, as ``run.algo`` requires; ``run.model_dir`` is the policy's source (the built-in
    model, ``--model``, ``init_model``; a hub id or an adapter folder resolved)."""
    algo, cfg = run.algo, run.cfg
    if cfg.model is None:
        from ..tasks.tasks import ENGINE_MODEL_SETTINGS, builtin_model_dir
        warm = run.kind != "demonstrations" or algo.plan.generates
        builtin_model_dir = getattr(run.task, "builtin_model_dir", builtin_model_dir)
        engine = {"model": ENGINE_MODEL_SETTINGS} if cfg.use_vllm else {}  # heads vLLM supports
        with run.acc.main_process_first():
            run.model_dir, _ = builtin_model_dir(warm=warm, seed=0, **engine)
        run.say(f"model: built-in tiny llama{' (2 heads of 32, for vLLM)' if engine else ''} "
                f"({'after a short SFT warm-up on the task' if warm else 'random init'}), cached at {run.model_dir}")
    else:
        run.model_dir = cfg.model
    setting = "model"
    if cfg.init_model:  # a pipeline stage starts from an earlier stage's model
        run.model_dir, setting = cfg.init_model, "init_model"
        run.say(f"init: weights from {cfg.init_model}")
    # a hub id -> its snapshot in the cache; a PEFT adapter folder -> its base, adapter trained further
    from ..models.adapter_model import resolve_policy_source
    run.model_dir, run.model_adapter = resolve_policy_source(run, run.model_dir, setting)
    trust = cfg.trust_remote_code
    if run.reward_head:
        from ..models.reward_head import load_reward_model
        run.policy, run.tokenizer = load_reward_model(run.model_dir, dtype=cfg.dtype, device=run.device,
                                                      trust_remote_code=trust)
        run.say("reward model: a sequence-classification head (num_labels = 1) on the model's body")
    else:
        from ..parallel.lora import quantized_load_kwargs  # QLoRA's 4-bit base
        run.policy, run.tokenizer = load_policy(run.model_dir, dtype=cfg.dtype, device=run.device,
                                                extra=quantized_load_kwargs(cfg, run.device),
                                                trust_remote_code=trust, setting=setting)
    run.builds["policy"] += 1
    # LoRA: fresh adapters, or an existing adapter (lora_adapter, or --model as an adapter folder)
    run.lora = cfg.lora_r > 0 or cfg.lora_adapter is not None or run.model_adapter is not None
    if run.lora:
        if algo.plan.reference == "iterate" and "reference" in algo.requires:
            raise RunError("LoRA with `reference = \"iterate\"` is not supported yet",
                           hint="set lora_r: 0 for this spec")
        from ..parallel.lora import add_adapters  # peft.LoraConfig from the run settings
        run.policy = add_adapters(run.policy, cfg, reward_head=run.reward_head, adapter=run.model_adapter)
    run.model = run.policy
    if "critic" in algo.requires:
        run.model = add_value_head(run.policy)
        run.builds["critic"] += 1
    run.model.train()
    run.reference = None
    if ("reference" in algo.requires or cfg.force_reference) and not run.lora:
        run.reference = load_frozen_copy(cfg.reference_model or run.model_dir, dtype=cfg.dtype, device=run.device,
                                         trust_remote_code=cfg.trust_remote_code,
                                         setting="reference_model" if cfg.reference_model else "model")
        if cfg.reference_model:
            run.say(f"reference: {cfg.reference_model}")
        run.builds["reference"] += 1

def load_data(run):
    """The training records of the spec's data kind (a list, or a stream with ``streaming``),
    after setting ``run.eval_records`` (eval_data / eval_fraction: family/evaluation.py)."""
    need = {"prompts": ["prompt"], "demonstrations": ["prompt", "response"],
            "pairs": ["prompt", "chosen", "rejected"],
            "unpaired": ["prompt", "completion", "label"]}[run.kind]
    run.eval_records = None
    if run.builtin:
        from .evaluation import held_out
        held_out(run, [], need)  # eval_data / eval_fraction without --data: a RunError
        recs = run.task.records(run.kind)
        run.say(f"data: built-in task {run.task.name} ({len(recs)} {run.kind} from "
                f"{len(run.task.train_problems)} training problems; {len(run.task.eval_problems)} held-out)")
        return recs
    from ..data.stream import open_records
    from .evaluation import held_out  # eval_data / eval_fraction (family/evaluation.py)
    recs = open_records(run.cfg, run.kind)
    if isinstance(recs, list):
        run.say(f"data: {run.cfg.data} ({len(recs)} rows, {run.kind})")
        recs, run.eval_records = held_out(run, recs, need)
        return recs
    if run.reward_head or run.cfg.precompute_reference:
        raise RunError("streaming: true cannot be used with " +
                       ("a reward-model spec (it holds out pairs for its eval)" if run.reward_head
                        else "precompute_reference (it reads the whole data set before step 1)"),
                       hint="set streaming: false")
    run.say(f"data: {run.cfg.data} streamed ({run.kind}; shuffle buffer of {run.cfg.shuffle_buffer} rows, "
            f"{len(recs.parts)} part{'s' if len(recs.parts) != 1 else ''})")
    _, run.eval_records = held_out(run, None, need)  # eval_data only: a stream holds nothing out
    return recs
