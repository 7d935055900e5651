"""``rollout(prompt, env = env, n, max_turns, temperature, top_p, max_tokens, model)``: multi-turn episodes.

Each prompt gets ``n`` episodes, sampled from the policy (``model = reference``: from the
reference, or with LoRA and no separate reference the policy with its adapters disabled, as
``generate``), with the run configuration's environment and tools
(envs.py, tools.py; on the built-in agentic task, its own calculator, tasks/tool_task.py).
The episodes of a call run as one batch (``play``): each turn, every unfinished episode
generates together (``Turns``: ``sampling.sample_groups``, KV-cached within the turn; each
turn prefills its episode's whole context again -- no KV cache across turns), then each
environment steps on its turn's text. A turn ends at EOS (the end of a chat turn, not of
the episode), at the end of a tool call, or after ``max_tokens`` tokens (default: the run's
``max_new_tokens``); an end-of-call marker that is one token stops that row's generation
at once, a longer one cuts the turn after it. An episode ends when its environment says
done, when a tools-only episode's turn calls no tool, after ``max_turns`` turns, or when its
context is full.

A row is the whole episode: ``c`` holds the policy's turns and the observations in order,
``m`` is 1 on the policy's tokens and 0 on the observations' (data/token_rows.py makes it
the batch's ``mask`` and ``length``, so observation tokens carry no gradient and count in
no token normalizer; they stay in the attention mask, the context of later turns).
``text`` is the whole episode as text (what reward functions see), ``env_reward`` the sum
of the environment's rewards (``env_reward(response)``), ``turns`` / ``tool_calls`` its
counts. When the spec reads ``logp_sampler``, ``ls`` holds the log-prob of each policy token
under the distribution the sampler drew it from (temperature and top-p applied, through the
sampler's own forward; 0 on the observations'). ``stats`` (logged each step as
``episodes/*``) holds the last call's means.

Checkpoints are taken between rollouts (the loop's only checkpoint point), so no episode
is ever in flight at a checkpoint: an environment lives for one episode within one call,
and a resumed run replays the same episodes from the round's seed.
"""

from __future__ import annotations

import torch

from ..data.token_rows import left_pad
from ..errors import RunError
from ..models.loaders import unwrap_causal_lm
from . import sampling
from .base import Sampler, register
from .envs import Episode, resolve_env_class
from .generation import _eos_ids


class Turns:
    """One turn of a batch of episode contexts: the next turn's tokens of each (up to and
    including its end: EOS, or a one-token end-of-call marker), and with ``logprobs`` the
    sampler's log-prob of each."""

    def __init__(self, lm, tok, *, temperature: float, top_p: float, max_tokens: int, seed: int,
                 stops=(), fast: bool = True, logprobs: bool = False):
        self.lm, self.tok = lm, tok
        self.temperature, self.top_p, self.max_tokens = float(temperature), float(top_p), int(max_tokens)
        self.fast, self.logprobs = fast, logprobs
        self.device = next(lm.parameters()).device
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(seed))
        self.eos = _eos_ids(lm, tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos[0]
        self.stops = tuple(stops)
        # one-token end-of-call markers end generation like EOS (the turn is cut there anyway)
        one = [tok(s, add_special_tokens=False)["input_ids"] for s in self.stops if s]
        self.ends = list(self.eos) + [ids[0] for ids, s in zip(one, self.stops) if len(ids) == 1
                                      and tok.decode(ids) == s and ids[0] not in self.eos]

    def __call__(self, contexts: list[list[int]]) -> list[tuple[list[int], list[float] | None]]:
        ids, att = left_pad(contexts, self.pad)
        L = ids.shape[1]
        t, greedy = self.temperature, self.temperature == 0
        lps = None
        if self.fast and sampling.supported(self.lm):
            steps = [] if self.logprobs else None
            out = sampling.sample_groups(self.lm, ids.to(self.device), att.to(self.device), 1,
                                         max_new_tokens=self.max_tokens, eos_ids=self.ends, pad_id=self.pad,
                                         temperature=t, top_p=self.top_p, greedy=greedy, generator=self.gen,
                                         logprobs=steps)
            if steps is not None:
                lps = torch.stack(steps, 1).cpu().tolist()
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
            dev = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=dev):
                torch.manual_seed(seed)
                kw = dict(do_sample=True, temperature=t, top_p=self.top_p, top_k=0) if not greedy \
                    else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
                if self.logprobs:  # the processed scores: logits after temperature / top-p
                    kw.update(output_scores=True, return_dict_in_generate=True)
                res = self.lm.generate(input_ids=ids.to(self.device), attention_mask=att.to(self.device),
                                       max_new_tokens=self.max_tokens, pad_token_id=self.pad,
                                       eos_token_id=self.ends or None, **kw)
            out = (res.sequences if self.logprobs else res)[:, L:]
            if self.logprobs:
                lps = torch.stack([torch.log_softmax(sc.float(), -1).gather(-1, out[:, k:k + 1]).squeeze(-1)
                                   for k, sc in enumerate(res.scores)], 1).cpu().tolist()
        turns = []
        for i, row in enumerate(out.cpu().tolist()):
            cut = next((k + 1 for k, tk in enumerate(row) if tk in self.ends), len(row))
            cut = self._stop(row[:cut])
            turns.append((row[:cut], lps[i][:cut] if lps is not None else None))
        return turns

    def _stop(self, toks: list[int]) -> int:
        """The length of the turn cut after its first end-of-call marker (a stopping rule: the
        tokens kept are exactly as sampled, those after the cut are dropped)."""
        tok = self.tok
        if self.stops and any(s in tok.decode(toks, skip_special_tokens=True) for s in self.stops):
            for k in range(1, len(toks) + 1):
                if any(s in tok.decode(toks[:k], skip_special_tokens=True) for s in self.stops):
                    return k
        return len(toks)


def play(turns: Turns, prompts: list[list[int]], eps: list[Episode], *, max_turns: int,
         context: int | None = None) -> list[dict]:
    """Run the episodes ``eps`` (one per prompt's token ids) to their ends, all unfinished
    ones generating together each turn; one row per episode (see the module docstring)."""
    tok = turns.tok
    rows = []
    for p, ep in zip(prompts, eps):
        first = ep.first  # reset's observation
        ids = list(p) + (_encode(tok, first) if first else [])
        if context and first and len(ids) + turns.max_tokens > context:
            raise RunError(f"env {ep.name}: the prompt and reset()'s observation, {len(ids):,} tokens "
                           f"({first[:50]!r}...), leave no room for a turn of {turns.max_tokens} tokens in the "
                           f"model's context of {context:,} positions",
                           hint="shorten reset()'s observation, lower env_max_chars or max_tokens / max_new_tokens")
        rows.append({"p": ids, "c": [], "m": [], **({"ls": []} if turns.logprobs else {})})
    live = list(range(len(eps)))
    lm = turns.lm
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            for turn in range(max_turns):
                if context:  # an episode whose context is full ends
                    live = [i for i in live if len(rows[i]["p"]) + len(rows[i]["c"]) + turns.max_tokens <= context]
                if not live:
                    break
                outs = turns([rows[i]["p"] + rows[i]["c"] for i in live])
                still = []
                for i, (toks, lps) in zip(live, outs):
                    r = rows[i]
                    r["c"] += toks
                    r["m"] += [1] * len(toks)
                    if "ls" in r:
                        r["ls"] += lps
                    obs, done = eps[i].step(tok.decode(toks, skip_special_tokens=True))
                    if done or turn + 1 == max_turns:
                        continue
                    if obs:
                        ids = _encode(tok, obs)
                        room = context - len(r["p"]) - len(r["c"]) if context else len(ids)
                        if len(ids) > room:  # stop at the context: the episode ends before its next turn
                            ids = ids[:max(room, 0)]
                            eps[i].truncated += 1
                        r["c"] += ids
                        r["m"] += [0] * len(ids)
                        if "ls" in r:
                            r["ls"] += [0.0] * len(ids)
                    still.append(i)
                live = still
    finally:
        lm.train(was_training)
    for r, ep in zip(rows, eps):
        r["text"] = tok.decode(r["c"], skip_special_tokens=True)
        r.update(env_reward=ep.reward, turns=ep.turns, tool_calls=ep.tool_calls, env_truncated=ep.truncated)
    return rows


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


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
                                   max_stuck=cfg.tool_max_stuck,
                                   call_tags=cfg.tool_call_tags, result_tags=cfg.tool_result_tags)
        elif self.env_cls is None and getattr(run, "task", None) is not None and hasattr(run.task, "toolbox"):
            self.toolbox = run.task.toolbox()  # the built-in agentic task's own tools (tasks/tool_task.py)
            self.env_name = run.task.name
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
            return _encode(run.tokenizer, text)
        return run.tok_prompt(prompt)

    # -- the sampler -----------------------------------------------------------------------------
    def sample(self, recs, seed):
        run = self.run
        model, ctx = self.sampling_model(run.policy)  # model = reference: the reference, or LoRA's base
        lm = unwrap_causal_lm(model)
        n = int(self.option("n"))
        turns = self.make_turns(lm, run.tokenizer, temperature=float(self.option("temperature")),
                      top_p=float(self.option("top_p")), max_tokens=int(self.option("max_tokens", run.max_new_tokens)),
                      seed=seed, stops=self.toolbox.stops if self.toolbox is not None else (),
                      fast=run.cfg.fast_sampling, logprobs="logp_sampler" in run.current.inputs)
        counts0 = dict(self.toolbox.counts) if self.toolbox is not None else {}
        eps, prompts, owners = [], [], []
        for rec in recs:
            p = self._prompt_ids(rec["prompt"])
            for _ in range(n):
                ep = Episode(self.env_cls, self.toolbox, self.env_name or "tools", max_chars=run.cfg.env_max_chars)
                ep.reset(rec)
                eps.append(ep)
                prompts.append(p)
                owners.append(rec)
        from ..parallel.wrap import gathered
        with ctx, gathered(run, model):  # whole weights for generation under FSDP2
            rows = play(turns, prompts, eps, max_turns=int(self.option("max_turns")),
                        context=getattr(lm.config, "max_position_embeddings", None))
        for r, rec in zip(rows, owners):
            r["rec"] = rec
        self._record(rows, counts0)
        return [rows[g * n:(g + 1) * n] for g in range(len(recs))]

    def make_turns(self, lm, tok, **kw) -> Turns:
        """What draws each turn's tokens (the vLLM engine's: rollout/vllm_samplers.py)."""
        return Turns(lm, tok, **kw)

    def _record(self, rows, counts0) -> None:
        k = max(1, len(rows))
        self.stats = {"episodes/turns_mean": sum(r["turns"] for r in rows) / k,
                      "episodes/tool_calls_mean": sum(r["tool_calls"] for r in rows) / k,
                      "episodes/env_reward_mean": sum(r["env_reward"] for r in rows) / k,
                      "episodes/env_truncated": float(sum(r.get("env_truncated", 0) for r in rows))}
        if self.toolbox is not None:
            c = self.toolbox.counts
            self.stats.update({f"episodes/tool_{name}": float(c[name] - counts0[name])
                               for name in ("errors", "timeouts", "truncated")})
        self.run.episode_stats = self.stats
