"""Per-spec settings for the built-in demo (built-in task *and* built-in tiny model).

The engine's generic built-in defaults (300 steps, batch 16, lr 1e-3, constant LR; see
``TokenPolicy._build``, runtime/family/token_policy.py) suit GRPO and SFT on the tiny model. Other specs need other settings to
learn there, and ``PRESETS`` says which, keyed by the spec's name (``algorithm NAME``).
An entry maps ``RunConfig`` fields to values and may hold ``"params"``: spec parameter
overrides.

The engine applies a preset only when the run uses the built-in task and the built-in model
(no ``data``, no ``model``), and only to what the user did not set: a config field that the
config file, keyword arguments and ``--set`` left out (or set to null), a spec parameter
not given with ``--set`` / ``params`` / ``alignspec.compile(..., NAME=...)``. The console
prints what was applied (``built-in preset for ppo: ...``). Runs on a user's model or data
never see these values.

Why these values (2-core CPU, ``alignspec run NAME`` with seeds 0, 1, 2; held-out
``eval_score`` at step 0 -> step 300):

- ``dpo`` {lr 3e-4, batch 32, linear decay}: 0.28 -> 0.72 / 0.72 / 0.76. At lr 1e-3 the tiny
  model drifts so far from its reference that it stops ending answers with EOS and emits
  stray tokens ("311", "1m1"); accuracy wanders around 0.3 (seed 0 ended at 0.32). (DPO also
  needs informative pairs: see ``tasks.ArithmeticTask.records``.)
- ``ppo`` {lr 3e-4, batch 32, linear decay}: 0.28 -> 1.00 / 0.96 / 1.00. At lr 1e-3 the four
  PPO epochs per rollout on 16 single samples (binary reward) are mostly noise that Adam
  turns into full-size steps: the per-token KL to the reference reaches 1-2 nats within 50
  steps, the sampled reward falls from 0.44 to ~0.1 and accuracy ends at 0.24. lr 3e-4 with
  batch 16 learns too but ends less reliably (0.96 / 0.88 / 0.72).
- ``grpo`` {linear decay}: 0.28 -> 0.76 / 0.72 / 0.80. With a constant lr 1e-3 the end point
  depends on where the last steps leave a still-moving policy (0.56 / 1.00 / 0.60, seeds 3
  and 4: 0.88 / 0.60); decaying the LR to 0 (TRL's default schedule) lets it settle
  (seeds 3 and 4: 0.80 / 0.76).
- ``sft`` needs none: 0.00 -> 0.64 / 0.84 / 1.00 with the generic defaults.

Self-play, active selection, the reward model and tree search (seed 0 unless said; held-out
``eval_score`` at the start -> the end of ``alignspec run NAME``; bench/learning.py runs them all):

- ``reward_model`` {lr 3e-4, linear decay, 1200 steps} (1275 training pairs on the built-in
  task, see runtime/models/reward_head.py; the score is held-out pairwise accuracy): 0.47 -> 0.96.
  At lr 1e-3 it swings around 0.5-0.65; 600 steps at 3e-4 end near 0.8.
- ``spin`` {lr 1e-4, batch 32, linear decay, beta 1.0}: 0.28 -> 0.96. beta scales a *sum* of
  token log-ratios; with 2-3-token answers the spec's schedule (0.1, then 5.0 at the last
  iteration; tuned for 7B models and long responses) keeps the logistic loss in its linear
  range until the log-ratios reach ~20 nats, and with lr 1e-3 held-out accuracy ends at 0.08
  (lr 1e-4 with the schedule: erratic, 0.08-0.68). A param set here (or with --set) holds at
  every iteration in place of the spec's schedule (runtime/models/iterations.py).
- ``sppo`` / ``rspo`` {batch 32, linear decay, eta 10}: 0.28 -> 0.88 / 0.80. eta = 1000
  (beta = 0.001) asks a 2-token answer's log-ratio to move by up to ~185 nats; clipped
  gradients then push losers down without bound (sppo 0.28 -> 0.08, rspo -> 0.20).
- ``ampo`` {lr 1e-4}: 0.28 -> 1.00. The loss has no reference; at lr 1e-3 pushing the k
  negatives down collapses the answers (0.0).
- ``mcts`` {lr 3e-4} (the step task, greedy full-solution accuracy, start 0.18): -> 0.72
  (lr 1e-3: 0.57, less steady).
- ``grpo_tools`` {50 steps, linear decay} (the agentic task: sums of three 3-digit numbers
  with a calculator, tasks/tool_task.py; greedy episodes on 50 held-out problems): the warm
  model calls the tool in ~4% of sampled episodes and never in greedy ones (eval 0.00);
  GRPO makes calling the rule within ~10 steps (100 steps, eval every 10: 0.98 from step
  10 on for seeds 0, 1, 2; the generic 300 steps: 0.98 at 25, 0.92 at 300). 50 steps are
  enough and keep the demo near a minute.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "grpo": {"lr_schedule": "linear"},
    "dpo": {"lr": 3e-4, "batch_size": 32, "lr_schedule": "linear"},
    "ppo": {"lr": 3e-4, "batch_size": 32, "lr_schedule": "linear"},
    # self-play, active selection, reward model, tree search (see the notes at the end of the docstring)
    "reward_model": {"lr": 3e-4, "lr_schedule": "linear", "steps": 1200},
    "spin": {"lr": 1e-4, "batch_size": 32, "lr_schedule": "linear", "params": {"beta": 1.0}},
    "sppo": {"batch_size": 32, "lr_schedule": "linear", "params": {"eta": 10.0}},
    "rspo": {"batch_size": 32, "lr_schedule": "linear", "params": {"eta": 10.0}},
    "ampo": {"lr": 1e-4},
    "mcts": {"lr": 3e-4},
    # the offline preference losses as dpo; the RL specs as their closest seed
    "kto": {"lr": 3e-4, "batch_size": 32, "lr_schedule": "linear"},
    "orpo": {"lr": 3e-4, "batch_size": 32, "lr_schedule": "linear"},
    "cpo": {"lr": 3e-4, "batch_size": 32, "lr_schedule": "linear"},
    "aot": {"lr": 3e-4, "batch_size": 32, "lr_schedule": "linear"},
    "reinforce_pp": {"lr": 3e-4, "batch_size": 32, "lr_schedule": "linear"},
    "grpo_tis": {"lr_schedule": "linear"},
    # episodes (the agentic task, tasks/tool_task.py): learns within ~10 steps (see the notes)
    "grpo_tools": {"steps": 50, "lr_schedule": "linear"},
}


# Per stage of a built-in pipeline (runtime/pipeline.py applies them on the built-in task and
# model, to what the user did not set; a stage's spec preset above applies as well).
# rlhf: SFT from random init at a constant lr 1e-3 ends anywhere in 0.64-0.92 (the last steps
# still jump); a linear decay ends at 0.84-0.92. PPO against the learned reward model (held-out
# pairwise accuracy 0.91-0.94) at kl_coef 0.05 dips to 0.60 early and ends at 0.88 (seed 0);
# kl_coef 0.2 keeps it nearer the SFT model: 0.92 -> 0.96 (seed 0), 0.84 -> 0.92 (seed 1).
# (A reward model trained only on nearby wrong sums is much easier to exploit: PPO then finds
# answers it never saw -- "4+8=122", "ooo" -- and held-out accuracy falls 0.92 -> 0.12-0.60.)
PIPELINE_PRESETS: dict[str, dict[str, dict]] = {
    "rlhf": {"sft": {"lr_schedule": "linear"}, "policy": {"params": {"kl_coef": 0.2}}},
}


def stage_preset(pipeline: str, stage: str, cfg) -> tuple[dict, dict]:
    """``(config fields, spec params)`` of a pipeline stage's preset not set in ``cfg`` (the
    stage's configuration without presets); empty off the built-in task and model."""
    if cfg.data is not None or cfg.model is not None:
        return {}, {}
    preset = PIPELINE_PRESETS.get(pipeline, {}).get(stage, {})
    fields = {k: v for k, v in preset.items() if k != "params" and not user_set(cfg, k)}
    params = {k: v for k, v in preset.get("params", {}).items() if k not in cfg.params}
    return fields, params


def user_set(cfg, name: str) -> bool:
    return name in cfg.model_fields_set and getattr(cfg, name) is not None


def builtin_preset(algo, cfg) -> tuple[dict, dict]:
    """``(config fields, spec params)`` of ``algo``'s preset that apply to ``cfg``.

    Empty unless ``cfg`` runs the built-in task on the built-in model; leaves out everything
    the user set (see the module docstring).
    """
    if cfg.data is not None or cfg.model is not None:
        return {}, {}
    preset = PRESETS.get(algo.name, {})
    fields = {k: v for k, v in preset.items() if k != "params" and not user_set(cfg, k)}
    declared = dict(algo.plan.param_defaults)  # declared defaults: a param still at its own was not set
    params = {k: v for k, v in preset.get("params", {}).items()
              if k in declared and k not in cfg.params and algo.params[k] == declared[k]}
    return fields, params


def describe(name: str, fields: dict, params: dict) -> str:
    items = [f"{k}={v}" for k, v in {**fields, **params}.items()]
    return (f"built-in preset for {name}: {', '.join(items)} "
            "(runtime/presets.py; set any of them to override)")
