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


def split_pairs(x):
    """Our interleaved (chosen, rejected) rows → TRL's [all chosen; all rejected]."""
    return torch.cat([x[0::2], x[1::2]])


def trl_dpo(batch, loss_type, beta, ref=None, **attrs):
    """TRL's DPOTrainer._compute_loss (precomputed reference log-probs) on our pair batch:
    (loss, d loss / d logp)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    leaf = batch["logp"].clone().requires_grad_(True)
    mask = split_pairs(batch["mask"])
    lm = StubLM()
    ids = torch.zeros(mask.shape[0], mask.shape[1] + 1, dtype=torch.long)
    lm.add(ids, split_pairs(leaf) * mask)
    ref = (batch["logp_ref"] * batch["mask"]).sum(1) if ref is None else ref
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": with_prompt_token(mask),
              "ref_chosen_logps": ref[0::2], "ref_rejected_logps": ref[1::2]}
    settings = dict(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                    loss_types=[loss_type] if isinstance(loss_type, str) else list(loss_type), beta=beta,
                    label_smoothing=0.0, use_weighting=False, f_alpha_divergence_coef=1.0,
                    args=SimpleNamespace(discopop_tau=0.05))
    settings["loss_weights"] = [1.0] * len(settings["loss_types"])
    settings.update(attrs)
    me = trainer_self(**settings)
    loss = DPOTrainer._compute_loss(me, lm, inputs, False)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def trl_grpo(batch, advantages, loss_type, *, is_ratio=None, **attrs):
    """TRL's GRPOTrainer._compute_loss on our batch (log-probs replaced on the instance)."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    leaf = batch["logp"].clone().requires_grad_(True)
    mask = batch["mask"]
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None, sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                           vespo_lambda_neg=2.0, steps_per_generation=1)
    settings = dict(top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
                    beta=0.0, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2, use_vllm=is_ratio is not None,
                    vllm_importance_sampling_correction=is_ratio is not None, current_gradient_accumulation_steps=1,
                    _entropy_bonus_enabled=False, args=args)
    settings.update(attrs)
    me = trainer_self(**settings)
    me._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.zeros_like(leaf), None)
    me.get_gamma_weights = GRPOTrainer.get_gamma_weights
    me.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    ids = torch.zeros(mask.shape[0], 1, dtype=torch.long)
    inputs = {"prompt_ids": ids, "prompt_mask": torch.ones_like(ids), "completion_ids": mask.long(),
              "completion_mask": mask.long(), "advantages": advantages, "old_per_token_logps": batch["logp_old"],
              "ref_per_token_logps": batch["logp_ref"], "num_items_in_batch": mask.sum()}
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad
