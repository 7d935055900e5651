"""Per-token log-probs of completions without materializing ``[batch, tokens, vocab]`` logits.

``completion_logprobs`` runs only the transformer body, keeps the hidden states at the
positions that predict valid completion tokens, and pushes those rows through the output
layer in chunks with :class:`ChunkedLinearLogProb`, a custom autograd Function that
recomputes each chunk's logits in backward. Peak extra memory is one
``[chunk_size, vocab]`` float32 buffer (two with entropy) instead of the full logits tensor
and the log-softmax copy autograd would save for backward.

Layout (docs/contracts.md): ``input_ids`` = prompt (left-padded) ++ completion
(right-padded), ``[B, P + T]``; ``completion_mask`` ``[B, T]``; results are ``[B, T]``
with 0 at masked positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .models import body_and_head, unwrap_causal_lm


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h, weight, bias, scale, acc):
    z = F.linear(h, weight, bias).to(acc)
    if scale != 1.0:
        z.mul_(scale)
    return z


class ChunkedLinearLogProb(torch.autograd.Function):
    """``logp[i] = log_softmax(scale * (h[i] @ W.T + b))[targets[i]]`` (and entropy), by chunks.

    forward(hidden [N, H], weight [V, H], bias [V] | None, targets [N], chunk_size, scale,
    with_entropy) -> (logp [N], entropy [N] or empty). Saved for backward: hidden, weight,
    bias, targets and per-row log-sum-exp (and entropy) -- nothing of size ``N * V``.
    Backward recomputes each chunk's logits; d logp / d z = onehot - softmax and
    d entropy / d z = -p * (log p + entropy). The weight gradient is returned for the weight
    tensor itself, so a tied input embedding (GPT-2) accumulates both contributions.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward recomputes under the same autocast
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, with_entropy):
        acc = _acc_dtype(hidden.dtype)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(hidden[s:e], weight, bias, scale, acc)
            target = z.gather(-1, targets[s:e, None]).squeeze(-1)
            mx = z.amax(-1, keepdim=True)
            z.sub_(mx)  # in place from here on: at most two [chunk, V] buffers live
            if with_entropy:
                ex = z.exp()
                total = ex.sum(-1)
                # H = log(sum e^z) - sum(e^z * z) / sum(e^z), with z shifted by its max
                ent[s:e] = total.log() - ex.mul_(z).sum(-1) / total
                del ex
            else:
                total = z.exp_().sum(-1)
            l = total.log() + mx.squeeze(-1)
            lse[s:e] = l
            logp[s:e] = target - l
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.chunk_size, ctx.scale, ctx.with_entropy = chunk_size, scale, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not ctx.with_entropy:
            g_ent = None
        if g_logp is None and g_ent is None:
            return (None,) * 7
        acc = lse.dtype
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            logq = _chunk_logits(h, weight, bias, ctx.scale, acc).sub_(lse[s:e, None])
            gz = None
            if g_ent is not None:  # d entropy / dz = -p * (log p + H), built in logq's buffer
                p = logq.exp()
                gz = logq.add_(ent[s:e, None]).mul_(p).mul_(-g_ent[s:e, None].to(acc))
            else:
                p = logq.exp_()  # one [chunk, V] buffer when entropy needs no gradient
            del logq
            if g_logp is not None:  # d logp / dz = onehot - p
                g = g_logp[s:e, None].to(acc)
                if gz is None:
                    gz = p.mul_(-g)
                else:
                    gz.sub_(p.mul_(g))
                gz.scatter_add_(-1, targets[s:e, None], g)
            del p
            if ctx.scale != 1.0:
                gz.mul_(ctx.scale)
            if need_h:
                grad_h[s:e] = (gz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(gz.t(), h.to(acc))
            if need_b:
                grad_b.add_(gz.sum(0))
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_logprobs(hidden, weight, bias, targets, *, chunk_size=1024, scale=1.0,
                    with_entropy=False):
    """Chunked ``(logp [N], entropy [N] | None)`` of ``targets`` under a linear output layer."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    logp, ent = ChunkedLinearLogProb.apply(hidden, weight, bias, targets, int(chunk_size),
                                           float(scale), bool(with_entropy))
    return logp, (ent if with_entropy else None)


def _logit_transform(config) -> tuple[float, float | None]:
    """(multiplier, softcap) some architectures apply after the output layer."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite divides
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return scale, softcap


def _module_logprobs(hidden, head, targets, chunk_size, scale, softcap, with_entropy):
    """Fallback for output layers that are not a plain ``nn.Linear`` (e.g. LoRA-wrapped) or
    that soft-cap logits: same chunking, with activation checkpointing per chunk."""
    acc = _acc_dtype(hidden.dtype)

    def one_chunk(h, t):
        z = head(h).to(acc) * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        logq = z.log_softmax(-1)
        lp = logq.gather(-1, t[:, None]).squeeze(-1)
        en = -(logq.exp() * logq).sum(-1) if with_entropy else lp.new_empty(0)
        return lp, en

    lps, ens = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled():
            lp, en = checkpoint(one_chunk, h, t, use_reentrant=False)
        else:
            lp, en = one_chunk(h, t)
        lps.append(lp)
        ens.append(en)
    empty = hidden.new_empty(0, dtype=acc)
    logp = torch.cat(lps) if lps else empty
    ent = (torch.cat(ens) if ens else empty) if with_entropy else None
    return logp, ent


def completion_logprobs(model, input_ids, attention_mask, completion_mask, *,
                        chunk_size=1024, with_entropy=False, return_hidden=False):
    """Log-prob of each completion token given its prefix, ``[B, T]`` (0 where masked).

    ``model``: a causal LM (also a ``PolicyWithValueHead`` or a PEFT model around one).
    Position ids come from ``attention_mask`` (as in ``generate``), so left padding does not
    shift positions. Returns a dict with ``logp`` (float32, float64 for float64 models),
    ``entropy`` ``[B, T]`` if ``with_entropy`` (differentiable), and ``hidden`` ``[B, T, H]``
    -- the last hidden states that predict each completion token -- if ``return_hidden``.
    """
    B, L = input_ids.shape
    T = completion_mask.shape[1]
    P = L - T
    if P < 1:
        raise ValueError(f"input_ids has {L} columns but completion_mask {T}: no prompt column")
    lm = unwrap_causal_lm(model)
    body, head = body_and_head(lm)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = body(input_ids=input_ids, attention_mask=attention_mask,
               position_ids=position_ids, use_cache=False)
    hidden_all = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden_all[:, P - 1:L - 1]  # position P-1+t predicts completion token t
    sel = completion_mask.bool()
    rows = hidden[sel]
    targets = input_ids[:, P:][sel]

    scale, softcap = _logit_transform(lm.config)
    if isinstance(head, nn.Linear) and softcap is None:
        logp_rows, ent_rows = linear_logprobs(rows, head.weight, head.bias, targets,
                                              chunk_size=chunk_size, scale=scale,
                                              with_entropy=with_entropy)
    else:
        logp_rows, ent_rows = _module_logprobs(rows, head, targets, chunk_size, scale,
                                               softcap, with_entropy)
    result = {"logp": logp_rows.new_zeros(B, T).masked_scatter(sel, logp_rows)}
    if with_entropy:
        result["entropy"] = ent_rows.new_zeros(B, T).masked_scatter(sel, ent_rows)
    if return_hidden:
        result["hidden"] = hidden
    return result
