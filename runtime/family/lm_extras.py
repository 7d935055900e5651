"""What the LM run builds beyond policy / reference / critic, from what a spec requires.

``setup_extras(run)`` runs during ``TokenPolicy._build`` (token_policy.py) and sets, on the
run state being built (``run``: a ``TokenState``, state.py)

- ``run.prompt_format``: how prompts become the policy's input -- the tokenizer's chat
  template or the raw text, per the ``chat_template`` setting (``prompts.py``); checked
  against the data's prompts here, so a conversational prompt without a template fails
  before training;
- ``run.iterate``: the frozen iterate pi_t of self-play iterations (``iterations.py``),
  or None;
- ``run.embedder``: ``embedding(response)`` for the active selectors
  (``embedding.py``), or None;
- ``run.tree_sampler``: the ``tree_search`` sampler (``mcts_sampler.py``), or None;
- for a reward-model spec (``rm_score``): the held-out pairs and ``run.task``'s
  ``eval_score`` = pairwise accuracy on them (``reward_head.py``).
"""

from __future__ import annotations

from ..errors import RunError


def setup_extras(run) -> None:
    algo, cfg = run.algo, run.cfg
    from ..data.prompts import PromptFormat
    run.prompt_format = PromptFormat(run.tokenizer, getattr(cfg, "chat_template", "auto"),
                                        source=run.model_dir, kwargs=getattr(cfg, "chat_template_kwargs", None),
                                        max_length=getattr(cfg, "max_prompt_length", None), say=run.say)
    recs = run.records if isinstance(run.records, list) else run.records.head(64)  # streamed: its head
    run.prompt_format.check_records(recs, cfg.data or "the built-in task")
    from ..data.token_rows import count_long_prompts  # max_prompt_length
    count_long_prompts(run)
    if run.prompt_format.templated:
        which = (cfg.chat_template if cfg.chat_template not in ("auto", "on")
                 else f"the tokenizer in {run.model_dir}")
        run.say(f"prompts: through the chat template of {which}")
    if run.reward_head:  # scored downstream as trained (rewards.SequenceScorer)
        from ..models.reward_head import mark_template
        mark_template(run.policy, run.prompt_format.templated)
    from ..models.iterations import build_iterate
    run.iterate = build_iterate(run)
    if run.iterate is not None:
        import math
        n = algo.plan.iterations
        run.say(f"self-play: {n} iterations of {math.ceil(run.steps / n)} steps; the iterate pi_t "
                   f"(the policy at the iteration's start, frozen) samples and gives logp_old"
                   + ("; it is the reference (replaced at each iteration)" if run.iterate is run.reference
                      else "; the reference stays the initial model"))
    from ..models.iterations import overridden_schedules
    for k in sorted(overridden_schedules(algo)):
        run.say(f"{k} = {algo.params[k]} at every iteration (set for this run, in place of the spec's "
                   f"schedule {list(dict(algo.plan.schedules)[k])})")
    run.embedder = None
    if "embedding" in algo.inputs:
        from ..scoring.embedding import Embeddings
        run.embedder = Embeddings(run.policy, getattr(cfg, "embedding_model", None), device=run.device,
                                     chunk_size=cfg.chunk_size, trust_remote_code=cfg.trust_remote_code)
        run.say(f"embedding: {run.embedder.source}")
    run.tree_sampler = None
    if "tree_search" in algo.requires:
        run.tree_sampler = _tree_sampler(run)
    if run.reward_head:
        _reward_model_eval(run)


def _tree_sampler(run):
    from ..rollout.mcts_sampler import TreeSampler
    task = run.task
    if task is not None and hasattr(task, "reward"):
        reward, what = task.reward, f"{task.name} correctness of the whole solution"
    else:
        from ..scoring.reward_functions import RewardFunctions
        names = run.cfg.rewards
        if not names:
            raise RunError(f"{run.algo.name} searches with tree_search, whose leaf values need a reward",
                           hint="set rewards: [module:function] (called with the prompt and the solution after it)")
        reward = RewardFunctions(names, run.cfg.reward_weights, tokenizer=run.tokenizer)
        what = " + ".join(names)
    step_tokens = getattr(task, "step_tokens", None) or run.max_new_tokens
    run.say(f"tree search: steps end at a newline or EOS (at most {step_tokens} tokens); leaf values: {what} "
               f"at terminal nodes, one sampled rollout's reward elsewhere")
    return TreeSampler(run.tokenizer, reward, step_tokens=step_tokens, max_new_tokens=run.max_new_tokens,
                       device=run.device, prompt_format=run.prompt_format)


def _reward_model_eval(run) -> None:
    from ..models.reward_head import PairwiseEval, builtin_heldout_pairs, builtin_training_pairs, split_heldout
    if "logp" in run.algo.inputs or "logp_ref" in run.algo.inputs:
        raise RunError(f"{run.algo.name} reads rm_score and log-probs: a reward model has no LM head",
                       hint="train the reward model and the policy in separate stages (a pipeline)")
    if run.builtin and run.task is not None:
        run.records = builtin_training_pairs(run.task)
        run.say(f"reward model data: {len(run.records)} pairs, each training problem's answer against "
                   f"every other sum 0..18")
        pairs = builtin_heldout_pairs(run.task)
        run.task = PairwiseEval(pairs, run.task)
        run.say(f"eval: pairwise accuracy on {len(pairs)} held-out pairs (held-out problems' answer vs "
                   f"wrong sums within 2)")
        return
    if getattr(run, "eval_records", None) is not None:  # eval_data / eval_fraction (family/evaluation.py)
        run.task = PairwiseEval(run.eval_records, None)
        run.say(f"eval: pairwise accuracy on {len(run.eval_records)} held-out pairs")
        return
    run.records, held = split_heldout(run.records, run.cfg.seed)
    if held:
        run.task = PairwiseEval(held, None)
        run.say(f"eval: pairwise accuracy on {len(held)} held-out pairs ({len(run.records)} kept for training)")
    else:
        run.say("[yellow]eval: fewer than 10 pairs, none held out; no pairwise accuracy[/yellow]")
