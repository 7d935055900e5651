"""What the LM engine builds beyond policy / reference / critic, from what a spec requires.

``setup_extras(engine)`` runs during ``TokenPolicy._build`` (token_policy.py) and sets

- ``engine.prompt_format``: how prompts become the policy's input -- the tokenizer's chat
  template or the raw text, per the ``chat_template`` setting (``prompts.py``); checked
  against the data's prompts here, so a conversational prompt without a template fails
  before training;
- ``engine.iterate``: the frozen iterate pi_t of self-play iterations (``iterations.py``),
  or None;
- ``engine.embedder``: ``embedding(response)`` for the active selectors
  (``embedding.py``), or None;
- ``engine.tree_sampler``: the ``tree_search`` sampler (``mcts_sampler.py``), or None;
- for a reward-model spec (``rm_score``): the held-out pairs and ``engine.task``'s
  ``eval_score`` = pairwise accuracy on them (``reward_head.py``).
"""

from __future__ import annotations

from ..errors import RunError


def setup_extras(engine) -> None:
    algo, cfg = engine.algo, engine.cfg
    from ..data.prompts import PromptFormat
    engine.prompt_format = PromptFormat(engine.tokenizer, getattr(cfg, "chat_template", "auto"),
                                        source=engine.model_dir, kwargs=getattr(cfg, "chat_template_kwargs", None),
                                        max_length=getattr(cfg, "max_prompt_length", None), say=engine.say)
    recs = engine.records if isinstance(engine.records, list) else engine.records.head(64)  # streamed: its head
    engine.prompt_format.check_records(recs, cfg.data or "the built-in task")
    from ..data.token_rows import count_long_prompts  # max_prompt_length
    count_long_prompts(engine)
    if engine.prompt_format.templated:
        which = (cfg.chat_template if cfg.chat_template not in ("auto", "on")
                 else f"the tokenizer in {engine.model_dir}")
        engine.say(f"prompts: through the chat template of {which}")
    if engine.reward_head:  # scored downstream as trained (rewards.SequenceScorer)
        from ..models.reward_head import mark_template
        mark_template(engine.policy, engine.prompt_format.templated)
    from ..models.iterations import build_iterate
    engine.iterate = build_iterate(engine)
    if engine.iterate is not None:
        import math
        n = algo.plan.iterations
        engine.say(f"self-play: {n} iterations of {math.ceil(engine.steps / n)} steps; the iterate pi_t "
                   f"(the policy at the iteration's start, frozen) samples and gives logp_old"
                   + ("; it is the reference (replaced at each iteration)" if engine.iterate is engine.reference
                      else "; the reference stays the initial model"))
    from ..models.iterations import overridden_schedules
    for k in sorted(overridden_schedules(algo)):
        engine.say(f"{k} = {algo.params[k]} at every iteration (set for this run, in place of the spec's "
                   f"schedule {list(dict(algo.plan.schedules)[k])})")
    engine.embedder = None
    if "embedding" in algo.inputs:
        from ..scoring.embedding import Embeddings
        engine.embedder = Embeddings(engine.policy, getattr(cfg, "embedding_model", None), device=engine.device,
                                     chunk_size=cfg.chunk_size, trust_remote_code=cfg.trust_remote_code)
        engine.say(f"embedding: {engine.embedder.source}")
    engine.tree_sampler = None
    if "tree_search" in algo.requires:
        engine.tree_sampler = _tree_sampler(engine)
    if engine.reward_head:
        _reward_model_eval(engine)


def _tree_sampler(engine):
    from ..rollout.mcts_sampler import TreeSampler
    task = engine.task
    if task is not None and hasattr(task, "reward"):
        reward, what = task.reward, f"{task.name} correctness of the whole solution"
    else:
        from ..scoring.reward_functions import RewardFunctions
        names = engine.cfg.rewards
        if not names:
            raise RunError(f"{engine.algo.name} searches with tree_search, whose leaf values need a reward",
                           hint="set rewards: [module:function] (called with the prompt and the solution after it)")
        reward = RewardFunctions(names, engine.cfg.reward_weights, tokenizer=engine.tokenizer)
        what = " + ".join(names)
    step_tokens = getattr(task, "step_tokens", None) or engine.max_new_tokens
    engine.say(f"tree search: steps end at a newline or EOS (at most {step_tokens} tokens); leaf values: {what} "
               f"at terminal nodes, one sampled rollout's reward elsewhere")
    return TreeSampler(engine.tokenizer, reward, step_tokens=step_tokens, max_new_tokens=engine.max_new_tokens,
                       device=engine.device, prompt_format=engine.prompt_format)


def _reward_model_eval(engine) -> None:
    from ..models.reward_head import PairwiseEval, builtin_heldout_pairs, builtin_training_pairs, split_heldout
    if "logp" in engine.algo.inputs or "logp_ref" in engine.algo.inputs:
        raise RunError(f"{engine.algo.name} reads rm_score and log-probs: a reward model has no LM head",
                       hint="train the reward model and the policy in separate stages (a pipeline)")
    if engine.builtin and engine.task is not None:
        engine.records = builtin_training_pairs(engine.task)
        engine.say(f"reward model data: {len(engine.records)} pairs, each training problem's answer against "
                   f"every other sum 0..18")
        pairs = builtin_heldout_pairs(engine.task)
        engine.task = PairwiseEval(pairs, engine.task)
        engine.say(f"eval: pairwise accuracy on {len(pairs)} held-out pairs (held-out problems' answer vs "
                   f"wrong sums within 2)")
        return
    if getattr(engine, "eval_records", None) is not None:  # eval_data / eval_fraction (family/evaluation.py)
        engine.task = PairwiseEval(engine.eval_records, None)
        engine.say(f"eval: pairwise accuracy on {len(engine.eval_records)} held-out pairs")
        return
    engine.records, held = split_heldout(engine.records, engine.cfg.seed)
    if held:
        engine.task = PairwiseEval(held, None)
        engine.say(f"eval: pairwise accuracy on {len(held)} held-out pairs ({len(engine.records)} kept for training)")
    else:
        engine.say("[yellow]eval: fewer than 10 pairs, none held out; no pairwise accuracy[/yellow]")
