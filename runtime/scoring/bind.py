"""The scorers a causal-LM run binds to the spec's external scores: ``reward``,
``reward_model``, ``preference`` (each ``scorer(prompts, texts, records, completion_ids) -> [B]``)."""

from __future__ import annotations

from ..errors import RunError

EXTERNALS = ("reward", "reward_model", "preference")  # env_reward: from the rows (episodes)


def bind_scorers(run) -> dict:
    """``{name: scorer}`` for every external score ``run.algo`` reads, from the run's
    configuration (built-in task: its exact_answer reward in place of missing models)."""
    from .reward_functions import RewardFunctions
    from .rewards import SequenceScorer
    cfg, out = run.cfg, {}
    for name in [n for n in EXTERNALS if n in run.algo.inputs]:
        if name == "reward":
            builtin = {}
            task_reward = getattr(run.task, "reward_name", None) if run.builtin else None
            if not cfg.rewards and task_reward:  # a built-in task's own reward (tasks/tool_task.py)
                builtin = {task_reward: getattr(run.task, task_reward)}
            names = cfg.rewards or ([task_reward or "exact_answer"] if run.builtin else [])
            if not names:
                raise RunError(f"{run.algo.name} scores with reward(response), but no reward is configured",
                               hint="set rewards: [exact_answer, format, length] or 'module:function'")
            out[name] = RewardFunctions(names, cfg.reward_weights, tokenizer=run.tokenizer, builtin=builtin)
            weights = out[name].weights
            run.say("reward: " + " + ".join(n if w == 1 else f"{w:g} * {n}" for n, w in zip(names, weights)))
            continue
        path = cfg.reward_model if name == "reward_model" else cfg.preference_model
        if path:
            out[name] = SequenceScorer(path, device=run.device, trust_remote_code=cfg.trust_remote_code,
                                       setting="reward_model" if name == "reward_model" else "preference_model")
            run.say(f"{name}: sequence classifier from {path}")
        elif run.builtin:
            out[name] = RewardFunctions(["exact_answer"], tokenizer=run.tokenizer)
            run.say(f"[yellow]{name}: no {'reward' if name == 'reward_model' else 'preference'} model "
                    f"configured; using the built-in task's exact_answer reward in its place "
                    f"(built-in default, not a learned model)[/yellow]")
        else:
            key = "reward_model" if name == "reward_model" else "preference_model"
            raise RunError(f"{run.algo.name} scores with {name}(response), but no {key} is configured",
                           hint=f"set {key}: <directory of a sequence classifier>")
    return out
