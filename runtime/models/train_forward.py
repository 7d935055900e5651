"""The training forward as one ``nn.Module``, so that ``accelerate`` can wrap it (DDP).

DDP reduces gradients through hooks it arms in its own ``forward``: a forward that bypasses
the wrapper (calling the body and the output layer of the LM directly, as the chunked
log-prob path does) would never be synchronised. :class:`TrainForward` is therefore the one
module the engine hands to ``accelerator.prepare``: its ``forward`` runs everything a
micro-batch's loss reads from the trained model -- ``logp`` (and ``entropy``, ``value``
when the spec reads them) through :func:`fastpath.forward_logprobs`, or ``rm_score`` when the
model being trained is a reward model -- so every trainable parameter is used inside the
wrapper.

:func:`zero_loss` gives the loss of a *padding* micro-batch: a process with fewer
micro-batches than another in the same update runs the forward on a one-token dummy input
and back-propagates ``0 * outputs``, so that every process takes part in the same number of
gradient reductions (DDP hangs otherwise) without changing the gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from .fastpath import forward_logprobs


class TrainForward(nn.Module):
    """``forward(batch_tensors, entropy, value) -> dict`` of the trained model's outputs.

    ``model``: the policy (a causal LM, a PEFT model, or a ``PolicyWithValueHead``), or a
    sequence classifier when ``reward_head`` is set. ``cfg``: the run configuration (its
    performance switches pick the log-prob path). ``pairs``: rows come as (chosen, rejected)
    pairs, which the fast path runs in one forward. ``temperature``: log-probs of
    ``softmax(logits / temperature)``, the distribution the sampler drew from.
    """

    def __init__(self, model: nn.Module, cfg, *, reward_head: bool = False, pairs: bool = False,
                 temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.reward_head = reward_head
        self.pairs = pairs
        self.temperature = float(temperature)

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, *, entropy: bool = False,
                value: bool = False) -> dict:
        ids = torch.cat([prompt_ids, completion_ids], 1)
        att = torch.cat([prompt_mask, completion_mask], 1)
        if self.reward_head:  # rm_score: the reward model being trained (runtime/models/reward_head.py)
            from .reward_head import sequence_scores
            return {"rm_score": sequence_scores(self.model, ids, att)}
        out = forward_logprobs(self.cfg, self.model, ids, att, completion_mask, entropy=entropy, value=value,
                               pairs=self.pairs, temperature=self.temperature)
        if value:
            out["value"] = self.model.values_from_hidden(out.pop("hidden")) * completion_mask.to(torch.float32)
        return out


def dummy_micro_batch(pad_id: int, device) -> dict:
    """A one-row micro-batch (one prompt token, one completion token) for padding updates."""
    one = torch.ones((1, 1), dtype=torch.long, device=device)
    return {"prompt_ids": one * pad_id, "prompt_mask": one, "completion_ids": one * pad_id,
            "completion_mask": one}


def zero_loss(outputs: dict) -> torch.Tensor:
    """``0 * sum(outputs)``: touches every parameter the forward used, adds nothing to a gradient."""
    return sum(v.sum() for v in outputs.values() if torch.is_tensor(v) and v.requires_grad) * 0.0
