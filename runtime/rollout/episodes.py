"""``rollout(prompt, env = env, n, max_turns, temperature, top_p, max_tokens)``: multi-turn episodes.

Each prompt gets ``n`` episodes with the run configuration's environment and tools
(envs.py, tools.py). The episodes of a call run as one batch: each turn, every unfinished
episode generates together (``sampling.sample_groups``, KV-cached within the turn; each turn
prefills its episode's whole context again -- no KV cache across turns), then each
environment steps on its turn's text. A turn ends at EOS (the end of a chat turn, not of
the episode), at the end of a tool call, or after ``max_tokens`` tokens (default: the run's
``max_new_tokens``). An episode ends when its environment says done, when a tools-only
episode's turn calls no tool, after ``max_turns`` turns, or when its context is full.

A row is the whole episode: ``c`` holds the policy's turns and the observations in order,
``m`` is 1 on the policy's tokens and 0 on the observations' (data/token_rows.py makes it
the batch's ``mask`` and ``length``, so observation tokens carry no gradient and count in
no token normalizer; they stay in the attention mask, the context of later turns).
``text`` is the whole episode as text (what reward functions see), ``env_reward`` the sum
of the environment's rewards (``env_reward(response)``), ``turns`` / ``tool_calls`` its
counts. ``stats`` (logged each step as ``episodes/*``) holds the last call's means.

Checkpoints are taken between rollouts (the loop's only checkpoint point), so no episode
is ever in flight at a checkpoint: an environment lives for one episode within one call,
and a resumed run replays the same episodes from the round's seed.
"""

from __future__ import annotations

import torch

from ..errors import RunError
from ..models.loaders import unwrap_causal_lm
from . import sampling
from .base import Sampler, register
from .envs import Episode, resolve_env_class
from .generation import _eos_ids


@register("rollout")
class Rollout(Sampler):
    def __init__(self, plan, run):
        super().__init__(plan, run)
        cfg = run.cfg
        self.env_name = cfg.env
        self.env_cls = resolve_env_class(cfg.env) if cfg.env else None
        self.toolbox = None
        if cfg.tools:
            from .tools import ToolBox
            self.toolbox = ToolBox(list(cfg.tools), timeout=cfg.tool_timeout, max_chars=cfg.tool_max_chars,
                                   call_tags=cfg.tool_call_tags, result_tags=cfg.tool_result_tags)
        if self.env_cls is None and self.toolbox is None:
            raise RunError(f"{run.algo.name} samples episodes with rollout(prompt, env = env, ...), but the run "
                           "configuration names no environment",
                           hint="set env: module:Class (reset(row), step(text)) and/or tools: [module:function]")
        self.stats: dict = {}

    # -- prompts -------------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> list[int]:
        run = self.run
        fmt = run.prompt_format
        if self.toolbox is not None and fmt.templated:  # the tools' schemas go to the chat template
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            try:
                text = run.tokenizer.apply_chat_template(messages, tools=self.toolbox.schemas,
                                                         add_generation_prompt=True, tokenize=False)
            except Exception as e:
                raise RunError(f"the chat template failed with the tools' schemas: {type(e).__name__}: {e}") from e
            return list(run.tokenizer(text, add_special_tokens=False)["input_ids"])
        return run.tok_prompt(prompt)

    def _encode(self, text: str) -> list[int]:
        return list(self.run.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- one turn of every unfinished episode ----------------------------------------------------
    def _turn(self, lm, contexts: list[list[int]], gen, eos: list[int], pad: int) -> list[list[int]]:
        """The next turn's token ids of each context (up to and including EOS)."""
        device = next(lm.parameters()).device
        L = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), L), pad, dtype=torch.long)
        att = torch.zeros((len(contexts), L), dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, L - len(c):] = torch.tensor(c)
            att[i, L - len(c):] = 1
        temperature = float(self.option("temperature"))
        max_tokens = int(self.option("max_tokens", self.run.max_new_tokens))
        if sampling.supported(lm):
            out = sampling.sample_groups(lm, ids.to(device), att.to(device), 1, max_new_tokens=max_tokens,
                                         eos_ids=eos, pad_id=pad, temperature=temperature,
                                         top_p=float(self.option("top_p")), greedy=temperature == 0, generator=gen)
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                kw = dict(do_sample=True, temperature=temperature, top_p=float(self.option("top_p")), top_k=0) \
                    if temperature > 0 else dict(do_sample=False)
                out = lm.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_tokens,
                                  pad_token_id=pad, eos_token_id=eos or None, **kw)[:, L:]
        turns = []
        for row in out.cpu().tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            turns.append(row[:cut])
        return turns

    def _stop(self, toks: list[int]) -> list[int]:
        """The turn, cut after its first tool call's end (a stopping rule: the tokens kept are
        exactly as sampled, those after the cut are dropped)."""
        stops = self.toolbox.stops if self.toolbox is not None else ()
        tok = self.run.tokenizer
        if stops and any(s in tok.decode(toks, skip_special_tokens=True) for s in stops):
            for k in range(1, len(toks) + 1):
                if any(s in tok.decode(toks[:k], skip_special_tokens=True) for s in stops):
                    return toks[:k]
        return toks

    # -- the sampler -----------------------------------------------------------------------------
    def sample(self, recs, seed):
        run = self.run
        lm = unwrap_causal_lm(run.policy)
        tok = run.tokenizer
        eos = _eos_ids(lm, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        n, max_turns = int(self.option("n")), int(self.option("max_turns"))
        context = getattr(lm.config, "max_position_embeddings", None)
        max_tokens = int(self.option("max_tokens", run.max_new_tokens))
        gen = torch.Generator(device=next(lm.parameters()).device)
        gen.manual_seed(int(seed))
        counts0 = dict(self.toolbox.counts) if self.toolbox is not None else {}
        eps, rows = [], []
        for rec in recs:
            p = self._prompt_ids(rec["prompt"])
            for _ in range(n):
                ep = Episode(self.env_cls, self.toolbox, self.env_name or "tools")
                first = ep.reset(rec)
                rows.append({"p": p + (self._encode(first) if first else []), "c": [], "m": [], "rec": rec})
                eps.append(ep)
        live = list(range(len(eps)))
        was_training = lm.training
        lm.eval()
        try:
            with torch.no_grad():
                for turn in range(max_turns):
                    if context:  # an episode whose context is full ends
                        live = [i for i in live if len(rows[i]["p"]) + len(rows[i]["c"]) + max_tokens <= context]
                    if not live:
                        break
                    outs = self._turn(lm, [rows[i]["p"] + rows[i]["c"] for i in live], gen, eos, pad)
                    still = []
                    for i, toks in zip(live, outs):
                        toks = self._stop(toks)
                        rows[i]["c"] += toks
                        rows[i]["m"] += [1] * len(toks)
                        obs, done = eps[i].step(tok.decode(toks, skip_special_tokens=True))
                        if done or turn + 1 == max_turns:
                            continue
                        if obs:
                            ids = self._encode(obs)
                            rows[i]["c"] += ids
                            rows[i]["m"] += [0] * len(ids)
                        still.append(i)
                    live = still
        finally:
            lm.train(was_training)
        for r, ep in zip(rows, eps):
            r["text"] = tok.decode(r["c"], skip_special_tokens=True)
            r.update(env_reward=ep.reward, turns=ep.turns, tool_calls=ep.tool_calls)
        self._record(rows, counts0)
        groups = [rows[g * n:(g + 1) * n] for g in range(len(recs))]
        return groups

    def _record(self, rows, counts0) -> None:
        k = max(1, len(rows))
        self.stats = {"episodes/turns_mean": sum(r["turns"] for r in rows) / k,
                      "episodes/tool_calls_mean": sum(r["tool_calls"] for r in rows) / k,
                      "episodes/env_reward_mean": sum(r["env_reward"] for r in rows) / k}
        if self.toolbox is not None:
            c = self.toolbox.counts
            self.stats.update({f"episodes/tool_{name}": float(c[name] - counts0[name])
                               for name in ("errors", "timeouts", "truncated")})
        self.run.episode_stats = self.stats
