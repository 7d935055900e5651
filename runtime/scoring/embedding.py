"""``embedding(response)``: one vector per sampled response, for the active selectors.

Selectors such as ``coreset(r, embedding(response), k)`` and ``opt_select(...)`` read an
``embedding`` input ``[B, D]`` in the score stage (before selection, for every sampled
row). Two sources:

- default: the policy's own last hidden states, averaged over the response: the states
  ``completion_logprobs(..., return_hidden=True)`` returns -- the ones that predict each
  valid response token -- under ``no_grad``, masked mean over the response's tokens;
- ``embedding_model: DIR`` in the run config: a local ``AutoModel`` (any encoder or
  decoder) and its tokenizer; the embedding is the mean of its last hidden states over the
  response text's tokens (the prompt is not included).
"""

from __future__ import annotations


import torch



@torch.no_grad()
def policy_embeddings(model, batch: dict, chunk_size: int = 1024, micro_rows: int = 64) -> torch.Tensor:
    """``[B, H]`` float32: masked mean of the policy's hidden states over each response."""
    from ..models.logprobs import completion_logprobs
    rows = batch["completion_mask"].shape[0]
    outs = []
    for s in range(0, rows, micro_rows):
        sl = slice(s, s + micro_rows)
        ids = torch.cat([batch["prompt_ids"][sl], batch["completion_ids"][sl]], 1)
        att = torch.cat([batch["prompt_mask"][sl], batch["completion_mask"][sl]], 1)
        cm = batch["completion_mask"][sl]
        h = completion_logprobs(model, ids, att, cm, chunk_size=chunk_size, return_hidden=True)["hidden"]
        m = cm.to(h.dtype).unsqueeze(-1)
        outs.append(((h * m).sum(1) / m.sum(1).clamp_min(1.0)).float())
    return torch.cat(outs) if outs else torch.zeros(0, 0)


class TextEmbedder:
    """Mean-pooled last hidden states of a separate local model over the response text."""

    def __init__(self, path, device=None, batch_size: int = 64, trust_remote_code: bool = False):
        from transformers import AutoModel

        from ..models.loaders import load_frozen_local
        self.tok, self.model, p = load_frozen_local(
            path, AutoModel, "embedding model", "embedding_model: a directory written by save_pretrained", device,
            trust_remote_code=trust_remote_code, setting="embedding_model")
        self.batch_size = batch_size
        self.path = str(p)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok([t if t else " " for t in texts[s:s + self.batch_size]], padding=True,
                           return_tensors="pt").to(device)
            h = self.model(**enc)
            h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0]
            m = enc["attention_mask"].to(h.dtype).unsqueeze(-1)
            out.append(((h * m).sum(1) / m.sum(1).clamp_min(1.0)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


class Embeddings:
    """What the engine calls: ``embeddings(batch, texts) -> [B, D]`` for the sampled rows."""

    def __init__(self, policy, path=None, device=None, chunk_size: int = 1024, trust_remote_code: bool = False):
        self.policy = policy
        self.chunk_size = chunk_size
        self.text = TextEmbedder(path, device=device, trust_remote_code=trust_remote_code) if path else None
        self.source = f"embedding model {path}" if path else "the policy's mean last hidden state over the response"

    def __call__(self, batch: dict, texts: list[str]) -> torch.Tensor:
        if self.text is not None:
            return self.text(texts).to(batch["mask"].device)
        return policy_embeddings(self.policy, batch, chunk_size=self.chunk_size).to(batch["mask"].device)
