"""Rows of a causal-LM rollout: data records in, token lists and padded tensors out.

A row is a dict ``{"p": prompt ids, "c": completion ids, "text": completion text, "rec": data
record}`` (an episode adds ``"m"``: 1 on the policy's tokens of ``c``, 0 on the environment's) (a tree-search row may add its own ``"prompt"``, the prefix it continues). A group
is a list of rows; groups are contiguous in a batch.
"""

from __future__ import annotations

import random

import torch

from ..seeds import mix as _mix


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[len(seqs), L]`` ids and attention mask, each sequence right-aligned (left padding)."""
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s)
            att[i, L - len(s):] = 1
    return ids.to(device), att.to(device)


def next_records(run) -> list[dict]:
    """This process's slice of the next global batch of records (epoch-wise seeded shuffles)."""
    B = run.batch_size
    if hasattr(run.records, "take"):  # streamed (data/stream.py): every process reads the same global batch
        rows = run.records.take(B)
        run.state.cursor += B
        lo = run.rank * run.local_batch
        return rows[lo:lo + run.local_batch]
    n = len(run.records)
    rows = []
    for j in range(run.cursor, run.cursor + B):
        epoch, pos = divmod(j, n)
        rows.append(run.records[_perm(run, epoch)[pos]])
    run.state.cursor += B
    lo = run.rank * run.local_batch
    return rows[lo:lo + run.local_batch]


def _perm(run, epoch: int) -> list[int]:
    if getattr(run, "_perm_epoch", None) != epoch:
        g = random.Random(_mix(run.cfg.seed, epoch, 7))
        perm = list(range(len(run.records)))
        g.shuffle(perm)
        run._perm_epoch, run._perm_cache = epoch, perm
    return run._perm_cache


def count_long_prompts(run) -> None:
    """Before training, with ``max_prompt_length`` and data in memory: say how many prompts
    will be truncated (tokenizing each prompt once)."""
    limit = getattr(run.cfg, "max_prompt_length", None)
    if not limit or not isinstance(run.records, list):
        return
    n = sum(len(run.prompt_format.ids(r["prompt"], fit=False)) > limit for r in run.records if not r.get("lm_text"))
    run.say(f"prompts: {n} of {len(run.records)} longer than max_prompt_length {limit} tokens"
            + ("; they are truncated from the left" if n else ""))


def tok_completion(tokenizer, text: str) -> list[int]:
    """A response's token ids, with EOS."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def scorer_prompt(tokenizer, row: dict):
    """The prompt that scorers (rewards, reward and preference models) get for a row: the
    row's own ``prompt`` (a tree-search prefix), else its data record's -- as written in the
    data, a string or a list of messages, not the chat-templated text the policy saw."""
    if "prompt" in row:
        return row["prompt"]
    rec = row.get("rec") or {}
    if "prompt" in rec:
        return rec["prompt"]
    return tokenizer.decode(row["p"], skip_special_tokens=True)


def tensors(rows: list[dict], pad: int, device, *, labels: bool = False) -> dict:
    """Prompts left-padded, completions right-padded: ``prompt_ids``, ``prompt_mask``,
    ``completion_ids``, ``completion_mask`` (long: every completion token, the attention mask),
    ``mask`` (float: the actions) and ``length`` (actions per row) -- the same except for rows
    with an action mask ``m`` (episodes: 0 on the environment's tokens); with rows
    that carry the sampler's log-probs (``ls``), ``logp_sampler``; with ``labels`` (data
    unpaired), each record's ``label`` (1 desirable, 0 undesirable)."""
    B = len(rows)
    P = max(len(r["p"]) for r in rows)
    T = max(1, max(len(r["c"]) for r in rows))
    pid = torch.full((B, P), pad, dtype=torch.long)
    pm = torch.zeros((B, P), dtype=torch.long)
    cid = torch.full((B, T), pad, dtype=torch.long)
    cm = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(rows):
        p, c = r["p"], r["c"]
        if p:
            pid[i, P - len(p):] = torch.tensor(p)
            pm[i, P - len(p):] = 1
        if c:
            cid[i, :len(c)] = torch.tensor(c)
            cm[i, :len(c)] = 1
    d = device
    out = {"prompt_ids": pid.to(d), "prompt_mask": pm.to(d), "completion_ids": cid.to(d),
           "completion_mask": cm.to(d), "mask": cm.to(d, torch.float32),
           "length": cm.sum(1).to(d, torch.float32)}
    if any("m" in r for r in rows):  # episodes (rollout/episodes.py): observation tokens are context, not actions
        m = torch.zeros((B, T), dtype=torch.float32)
        for i, r in enumerate(rows):
            act = r.get("m", [1] * len(r["c"]))
            m[i, :len(act)] = torch.tensor(act, dtype=torch.float32)
        out["mask"], out["length"] = m.to(d), m.sum(1).to(d)
    if all("ls" in r for r in rows):  # logp_sampler
        ls = torch.zeros((B, T), dtype=torch.float32)
        for i, r in enumerate(rows):
            ls[i, :len(r["ls"])] = torch.tensor(r["ls"], dtype=torch.float32)
        out["logp_sampler"] = ls.to(d)
    if labels:  # label: 1 desirable, 0 undesirable
        out["label"] = torch.tensor([float(r["rec"]["label"]) for r in rows], device=d)
    return out
