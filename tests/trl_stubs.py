"""Calling TRL 1.16's own loss code on hand-built tensors (tests/test_trl_losses.py).

TRL's `_compute_loss` methods take a model; here the model is a stub that returns the
per-token log-probs a test chose (as TRL's fused LM head does: 0 at positions whose label is
-100), and `self` is a namespace holding only the attributes the method reads. Layouts:
one prompt token, then the completion, so TRL's shifted completion mask is the test's mask.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch


class _Acc:
    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def trainer_self(**attrs):
    base = dict(accelerator=_Acc(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
                _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    base.update(attrs)
    return SimpleNamespace(**base)


class StubLM:
    """model(input_ids=..., labels=..., fused_lm_head=True) → the log-probs registered for
    those input ids (by identity), shaped like TRL's fused LM head output."""

    def __init__(self):
        self.table = []

    def add(self, input_ids, logp_shifted):
        self.table.append((input_ids, logp_shifted))

    def __call__(self, input_ids=None, labels=None, **kw):
        for ids, lp in self.table:
            if ids is input_ids:
                B, L = lp.shape
                return SimpleNamespace(log_probs=lp, entropy=torch.zeros(B, L, dtype=lp.dtype),
                                       mean_logits=torch.zeros(B, L, dtype=lp.dtype),
                                       is_top1=torch.zeros(B, L, dtype=torch.bool), aux_loss=None)
        raise AssertionError("unexpected input_ids")


def with_prompt_token(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] completion mask → [B, 1 + T] (a prompt token first), TRL's completion_mask."""
    return torch.cat([torch.zeros(mask.shape[0], 1, dtype=torch.long), mask.long()], 1)
