"""The ``tree_search(prompt, simulations, branching, depth, c_puct[, temperature])`` sampler.

For each prompt the engine runs the MCTS of ``tree_search`` (PUCT selection, expansion on a
node's second visit, evaluation, backup) with the two callbacks bound to the policy LM:

- ``propose(prefix, k)``: ``k`` one-step continuations sampled from the policy at the
  call's ``temperature`` (default 1), each ending at the first token that contains a
  newline (the step keeps its text up to and including the newline) or at EOS (the step is
  then terminal: it ends the solution); a step that reaches ``step_tokens`` without either
  is terminal as well. Its prior is ``exp(mean token log-prob)`` of the sampled tokens
  (the stop token included) under the policy -- the length-normalised probability --
  which ``tree_search.expand`` normalises over the siblings;
- ``value_fn(prefix, terminal)``: at a terminal node, the task's reward of the solution
  (``prefix`` minus the prompt); otherwise the reward of **one sampled rollout** from the
  node to EOS (at the same temperature, ``max_new_tokens`` tokens at most) -- a one-sample
  Monte-Carlo estimate of the node's value, as in MCTS-rollout / ReST-MCTS*.

The reward: on the built-in default, ``StepTask`` correctness of the whole solution (1 if
every step is the right partial sum and the answer is right); with ``--data``, the run's
``rewards`` (required; TRL's signature, scoring/reward_functions.py) with the completion =
everything after the prompt.

Prompts go through the run's ``prompt_format`` (runtime/data/prompts.py): the tree's root is the
prompt's text as the policy sees it (chat-templated when the run uses a template), steps are
appended to that text, and the reward gets the data row's prompt as written.

All prompts of a batch are searched in lockstep -- simulation ``s`` of every tree, then
``s + 1`` -- so each simulation costs one batched ``generate`` for the expansions and one
for the rollouts. Trees never interact, and each tree's sequence of select / expand /
evaluate / backup is exactly ``tree_search.search``'s (``search_many`` equals ``search``
prompt by prompt for deterministic callbacks; tested).

Training rows: ``tree_search.sibling_pairs`` of every tree, one group per pair: the
prompt is the pair's ``prefix`` (prompt + the steps before), ``chosen`` / ``rejected``
are the two sibling step texts (a terminal step is scored with EOS appended). A batch
needs ``batch_size`` pairs: pairs beyond that are kept for the next step (a search yields
several pairs per prompt; they are a step or two old when used, and are not part of a
checkpoint, so a resumed run searches afresh).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.token_rows import left_pad
from ..errors import RunError
from .tree_search import Node, backup, best_child, expand, select, sibling_pairs


def search_many(prompts, propose_many, value_many, simulations: int, branching: int, depth: int,
                c_puct: float, rule: str = "puct") -> list[Node]:
    """``tree_search.search`` for several prompts at once, simulation by simulation.

    ``propose_many([prefix, ...], k) -> [[(text, prior, terminal), ...], ...]`` and
    ``value_many([(tree, prefix, terminal), ...]) -> [float, ...]`` are the batched callbacks
    (``tree`` is the prompt's index in ``prompts``).
    """
    roots = [Node(text="", prefix=p) for p in prompts]
    for _ in range(simulations):
        leaves = [select(r, c_puct, rule) for r in roots]
        grow = [i for i, n in enumerate(leaves)
                if not n.terminal and n.depth < depth and (n.visits > 0 or n is roots[i])]
        if grow:
            proposals = propose_many([leaves[i].prefix for i in grow], branching)
            for i, props in zip(grow, proposals):
                if expand(leaves[i], lambda prefix, k, props=props: props, branching):
                    leaves[i] = best_child(leaves[i], c_puct, rule)
        values = value_many([(i, n.prefix, n.terminal) for i, n in enumerate(leaves)])
        for n, v in zip(leaves, values):
            backup(n, float(v))
    return roots


class TreeSampler:
    """The engine's ``tree_search`` sampler (see the module docstring)."""

    def __init__(self, tokenizer, reward, *, step_tokens: int, max_new_tokens: int, device=None,
                 prompt_format=None):
        from ..data.prompts import PromptFormat
        self.tok = tokenizer
        self.fmt = prompt_format or PromptFormat.raw(tokenizer)
        self.special = self.fmt.add_special_tokens  # a templated root holds its special tokens
        self.reward = reward               # scorer(prompts, completions, records) -> [B] floats
        self.step_tokens = int(step_tokens)
        self.max_new_tokens = int(max_new_tokens)
        self.device = device
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.newline_ids = self._newline_ids(tokenizer)
        if not self.newline_ids:
            raise RunError("tree_search: the tokenizer has no token that contains a newline, "
                           "so a step (one line) cannot end")
        self.buffer: list[list[dict]] = []
        self.stats: dict[str, float] = {}

    @staticmethod
    def _newline_ids(tok) -> list[int]:
        ids = []
        special = set(tok.all_special_ids)
        for i in range(len(tok)):
            if i not in special and "\n" in tok.decode([i]):
                ids.append(i)
        return ids

    # -- model calls ----------------------------------------------------------------------
    def _encode(self, texts: list[str]):
        seqs = [list(self.tok(t, add_special_tokens=self.special)["input_ids"]) for t in texts]
        return left_pad(seqs, self.pad, self.device)

    @torch.no_grad()
    def _generate(self, model, texts, n, max_new, stop_ids, temperature, seed, want_logp=False):
        from ..models.loaders import unwrap_causal_lm
        lm = unwrap_causal_lm(model)
        ids, att = self._encode(texts)
        ids, att = ids.repeat_interleave(n, 0), att.repeat_interleave(n, 0)
        kw = dict(max_new_tokens=max_new, pad_token_id=self.pad, eos_token_id=list(stop_ids), use_cache=True,
                  return_dict_in_generate=True, output_logits=want_logp)
        if temperature > 0:
            kw.update(do_sample=True, temperature=float(temperature), top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        was = lm.training
        lm.eval()
        try:
            with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = lm.generate(input_ids=ids, attention_mask=att, **kw)
        finally:
            lm.train(was)
        seq = out.sequences[:, ids.shape[1]:].cpu()
        logp = None
        if want_logp:
            logits = torch.stack(out.logits, 1).float().cpu()          # raw logits, [B, T, V]
            logp = F.log_softmax(logits, -1).gather(-1, seq[:, :logits.shape[1], None]).squeeze(-1)
        return seq, logp

    def _propose_many(self, model, temperature, seed):
        stop = set(self.newline_ids) | ({self.eos} if self.eos is not None else set())

        def propose_many(prefixes, k):
            seq, logp = self._generate(model, prefixes, k, self.step_tokens, sorted(stop), temperature,
                                       seed(), want_logp=True)
            out = [[] for _ in prefixes]
            for r in range(seq.shape[0]):
                row = seq[r].tolist()
                end = next((j for j, t in enumerate(row) if t in stop), None)
                if end is None:                                   # ran out of tokens: a terminal step
                    body, terminal, n_tok = row, True, len(row)
                elif row[end] == self.eos:
                    body, terminal, n_tok = row[:end], True, end + 1
                else:
                    body, terminal, n_tok = row[:end + 1], False, end + 1
                text = self.tok.decode(body, skip_special_tokens=True)
                if not terminal:
                    text = text[:text.index("\n") + 1] if "\n" in text else text + "\n"
                if not text.strip() and not terminal:
                    text = "\n"
                lp = float(logp[r, :n_tok].mean()) if n_tok > 0 else 0.0
                out[r // k].append((text, float(torch.tensor(lp).exp()), terminal))
            return out
        return propose_many

    def _value_many(self, model, recs, temperature, seed):
        def value_many(items):
            vals = [0.0] * len(items)
            texts = {j: "" for j, (_, _, terminal) in enumerate(items) if terminal}
            pending = [j for j, (_, _, terminal) in enumerate(items) if not terminal]
            if pending:
                seq, _ = self._generate(model, [items[j][1] for j in pending], 1, self.max_new_tokens,
                                        [self.eos] if self.eos is not None else [], temperature, seed())
                for j, row in zip(pending, seq.tolist()):
                    if self.eos is not None and self.eos in row:
                        row = row[:row.index(self.eos)]
                    texts[j] = self.tok.decode(row, skip_special_tokens=True)
            idx = sorted(texts)
            if idx:
                rows = [recs[items[j][0]] for j in idx]
                prompts = [r["prompt"] for r in rows]
                comps = [items[j][1][len(self.fmt.text(r["prompt"])):] + texts[j] for j, r in zip(idx, rows)]
                r = self.reward(prompts, comps, rows)
                r = r.tolist() if torch.is_tensor(r) else list(r)
                for j, v in zip(idx, r):
                    vals[j] = float(v)
            return vals
        return value_many

    # -- the sampler ----------------------------------------------------------------------
    def search(self, model, recs, *, simulations, branching, depth, c_puct, temperature=1.0, seed=0,
               rule="puct") -> list[Node]:
        counter = [0]

        def next_seed():
            counter[0] += 1
            return (int(seed) * 1000003 + counter[0]) % (1 << 31)

        prompts = [self.fmt.text(r["prompt"]) for r in recs]  # the roots
        return search_many(prompts, self._propose_many(model, temperature, next_seed),
                           self._value_many(model, recs, temperature, next_seed),
                           int(simulations), int(branching), int(depth), float(c_puct), rule)

    def _row(self, prefix, step, terminal, rec) -> dict:
        c = list(self.tok(step, add_special_tokens=False)["input_ids"])
        if terminal and self.eos is not None:
            c.append(self.eos)
        row = {"p": list(self.tok(prefix, add_special_tokens=self.special)["input_ids"]), "c": c, "text": step,
               "rec": rec}
        if isinstance(rec["prompt"], str):  # scorers get the data's prompt + the steps before
            row["prompt"] = rec["prompt"] + prefix[len(self.fmt.text(rec["prompt"])):]
        return row

    def groups(self, model, recs, *, simulations, branching, depth, c_puct, temperature=1.0, seed=0,
               rule="puct") -> list[list[dict]]:
        """``len(recs)`` (chosen, rejected) groups when the search yields enough pairs (the
        buffer first, then a lockstep search over ``recs``); fewer otherwise."""
        want = len(recs)
        if len(self.buffer) < want:
            roots = self.search(model, recs, simulations=simulations, branching=branching, depth=depth,
                                c_puct=c_puct, temperature=temperature, seed=seed, rule=rule)
            n_pairs, root_q = 0, []
            for root, rec in zip(roots, recs):
                root_q.append(root.q)
                for pr in sibling_pairs(root):
                    self.buffer.append([self._row(pr.prefix, pr.chosen, pr.chosen_terminal, rec),
                                        self._row(pr.prefix, pr.rejected, pr.rejected_terminal, rec)])
                    n_pairs += 1
            self.stats = {"search/pairs_per_prompt": n_pairs / max(1, len(recs)),
                          "search/root_q": sum(root_q) / max(1, len(root_q))}
        out, self.buffer = self.buffer[:want], self.buffer[want:]
        return out
