"""Per-token log-probs of completions without materializing ``[batch, tokens, vocab]`` logits.

``completion_logprobs`` runs only the transformer body, keeps the hidden states at the
positions that predict valid completion tokens, and pushes those rows through the output
layer in tiles (row blocks x vocabulary slices, about 8 MB each in float32) with
:class:`ChunkedLinearLogProb`, a custom autograd Function that recomputes each tile's logits
in backward. Peak extra memory is a tile or two instead of the full logits tensor and the
log-softmax copy autograd would save for backward.

Layout (docs/contracts.md): ``input_ids`` = prompt (left-padded) ++ completion
(right-padded), ``[B, P + T]``; ``completion_mask`` ``[B, T]``; results are ``[B, T]``
with 0 at masked positions.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .loaders import body_and_head, unwrap_causal_lm


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h, weight, bias, scale, acc):
    z = F.linear(h, weight, bias).to(acc)
    if scale != 1.0:
        z.mul_(scale)
    return z


# Default tile of the output layer: rows x vocabulary columns such that one float32 tile is
# about 2M elements (8 MB). At vocab 32000 and 1,024 rows that is 1,024 x 2,048.
TILE_ELEMS = 1 << 21


def vocab_tile(rows: int, vocab: int, tile_elems: int = TILE_ELEMS) -> int:
    """Vocabulary columns per tile for a row block of ``rows`` rows (at least 128)."""
    return max(128, min(vocab, tile_elems // max(1, rows)))


class ChunkedLinearLogProb(torch.autograd.Function):
    """``logp[i] = log_softmax(scale * (h[i] @ W.T + b))[targets[i]]`` (and entropy), by tiles.

    forward(hidden [N, H], weight [V, H], bias [V] | None, targets [N], chunk_size, scale,
    with_entropy, vocab_chunk) -> (logp [N], entropy [N] or empty). Rows go in blocks of
    ``chunk_size``; within a block the vocabulary goes in slices of ``vocab_chunk`` columns
    (``None``: :func:`vocab_tile`), with an online (running-max) log-sum-exp and entropy, so
    the largest temporary is one ``[chunk_size, vocab_chunk]`` tile. Saved for backward:
    hidden, weight, bias, targets and per-row log-sum-exp (and entropy) -- nothing of size
    ``N * V``. Backward recomputes each tile's logits; d logp / d z = onehot - softmax and
    d entropy / d z = -p * (log p + entropy); each weight-gradient slice is written once per
    row block. The weight gradient is returned for the weight tensor itself, so a tied input
    embedding (GPT-2) accumulates both contributions.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward recomputes under the same autocast
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, with_entropy, vocab_chunk=None):
        acc = _acc_dtype(hidden.dtype)
        n, V = hidden.shape[0], weight.shape[0]
        rows = max(1, min(chunk_size, n))
        vc = min(V, vocab_chunk or vocab_tile(rows, V))
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            h, t = hidden[s:e], targets[s:e]
            m = s_ = u = tgt = None
            for vs in range(0, V, vc):
                ve = min(vs + vc, V)
                z = _chunk_logits(h, weight[vs:ve], None if bias is None else bias[vs:ve], scale, acc)
                idx = t - vs
                hit = (idx >= 0) & (idx < ve - vs)
                zt = z.gather(-1, idx.clamp(0, ve - vs - 1)[:, None]).squeeze(-1)
                tgt = torch.where(hit, zt, zt.new_zeros(()) if tgt is None else tgt)
                zm = z.amax(-1)
                m_new = zm if m is None else torch.maximum(m, zm)
                z.sub_(m_new[:, None])  # in place from here on: at most two tiles live
                if with_entropy:
                    ex = z.exp()
                    part_s, part_u = ex.sum(-1), ex.mul_(z).sum(-1)  # sum e^(z-m), sum e^(z-m) (z-m)
                    del ex
                    if m is None:
                        s_, u = part_s, part_u
                    else:
                        d = m - m_new
                        alpha = d.exp()
                        u = alpha * (u + d * s_) + part_u
                        s_ = alpha * s_ + part_s
                else:
                    part_s = z.exp_().sum(-1)
                    s_ = part_s if m is None else (m - m_new).exp() * s_ + part_s
                m = m_new
                del z
            l = s_.log() + m
            lse[s:e] = l
            logp[s:e] = tgt - l
            if with_entropy:  # H = log(sum e^(z-m)) - sum(e^(z-m) (z-m)) / sum(e^(z-m))
                ent[s:e] = s_.log() - u / s_
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.rows, ctx.vc, ctx.scale, ctx.with_entropy = rows, vc, scale, with_entropy
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
            return (None,) * 8
        acc = lse.dtype
        n, V = hidden.shape[0], weight.shape[0]
        rows, vc = ctx.rows, ctx.vc
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        w_acc = weight if weight.dtype == acc else None
        for s in range(0, n, rows):
            e = min(s + rows, n)
            h, t = hidden[s:e], targets[s:e]
            h_acc = h.to(acc)
            gh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
            g = g_logp[s:e, None].to(acc) if g_logp is not None else None
            ge = -g_ent[s:e, None].to(acc) if g_ent is not None else None
            for vs in range(0, V, vc):
                ve = min(vs + vc, V)
                w = weight[vs:ve]
                logq = _chunk_logits(h, w, None if bias is None else bias[vs:ve], ctx.scale, acc)
                logq.sub_(lse[s:e, None])
                gz = None
                if ge is not None:  # d entropy / dz = -p * (log p + H), built in logq's buffer
                    p = logq.exp()
                    gz = logq.add_(ent[s:e, None]).mul_(p).mul_(ge)
                else:
                    p = logq.exp_()  # one tile when entropy needs no gradient
                del logq
                if g is not None:  # d logp / dz = onehot - p
                    if gz is None:
                        gz = p.mul_(-g)
                    else:
                        gz.sub_(p.mul_(g))
                    idx = t - vs
                    hit = (idx >= 0) & (idx < ve - vs)
                    gz.scatter_add_(-1, idx.clamp(0, ve - vs - 1)[:, None], (g * hit[:, None].to(acc)))
                del p
                if ctx.scale != 1.0:
                    gz.mul_(ctx.scale)
                if need_h:
                    gh.addmm_(gz, w if w_acc is not None else w.to(acc))
                if need_w:
                    grad_w[vs:ve].addmm_(gz.t(), h_acc)
                if need_b:
                    grad_b[vs:ve].add_(gz.sum(0))
                del gz
            if need_h:
                grad_h[s:e] = gh.to(hidden.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def linear_logprobs(hidden, weight, bias, targets, *, chunk_size=1024, scale=1.0,
                    with_entropy=False, vocab_chunk=None):
    """Tiled ``(logp [N], entropy [N] | None)`` of ``targets`` under a linear output layer:
    ``chunk_size`` rows by ``vocab_chunk`` vocabulary columns per tile (``None``: about
    ``TILE_ELEMS`` elements per tile)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if vocab_chunk is not None and vocab_chunk < 1:
        raise ValueError("vocab_chunk must be >= 1")
    logp, ent = ChunkedLinearLogProb.apply(hidden, weight, bias, targets, int(chunk_size),
                                           float(scale), bool(with_entropy),
                                           None if vocab_chunk is None else int(vocab_chunk))
    return logp, (ent if with_entropy else None)


HEAD_LOGPROBS = "chunked_logprobs"  # the output layer's own log-probs under FSDP2 (parallel/fsdp2.py)


def linear_head_logprobs(head: nn.Linear, hidden, targets, **kw):
    """:func:`linear_logprobs` through the linear output layer ``head`` (its weight and bias
    read at call time: under FSDP2, the gathered ones)."""
    return linear_logprobs(hidden, head.weight, head.bias, targets, **kw)


def chunked_linear_head(lm: nn.Module) -> nn.Linear | None:
    """The output layer of causal LM ``lm`` when :func:`completion_logprobs` runs it through
    the tiled linear path (a plain ``nn.Linear``, no logit soft-cap); otherwise None."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or _logit_transform(lm.config)[1] is not None:
        return None
    return head


def _logit_transform(config) -> tuple[float, float | None]:
    """(multiplier, softcap) some architectures apply after the output layer."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite divides
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return scale, softcap


def _module_logprobs(hidden, head, targets, chunk_size, scale, softcap, with_entropy, temperature=1.0):
    """Fallback for output layers that are not a plain ``nn.Linear`` (e.g. LoRA-wrapped) or
    that soft-cap logits: same chunking, with activation checkpointing per chunk. The
    sampling temperature divides the final (soft-capped) logits."""
    acc = _acc_dtype(hidden.dtype)

    def one_chunk(h, t):
        z = head(h).to(acc) * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        if temperature != 1.0:
            z = z / temperature
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


def _shared_prompt_hidden(body, input_ids, attention_mask, position_ids, P):
    """``[B, T, H]`` hidden states predicting the completion tokens, with one body pass per
    *distinct* prompt: the prompt's keys/values (KV cache, part of the autograd graph) are
    repeated for every row that shares it, then the completions run on top of them. ``None``
    when every prompt is distinct or the body takes no cache argument."""
    from .kv_cache import cache_kwarg, new_cache
    B, L = input_ids.shape
    key = torch.cat([input_ids[:, :P], attention_mask[:, :P].to(input_ids.dtype)], 1)
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)
    U = uniq.shape[0]
    ck = cache_kwarg(body)
    if U == B or ck is None:
        return None
    first = torch.full((U,), B, dtype=torch.long, device=input_ids.device)
    first = first.scatter_reduce(0, inv, torch.arange(B, device=input_ids.device), "amin")
    cache = new_cache(body)
    out = body(input_ids=input_ids[first, :P], attention_mask=attention_mask[first, :P],
               position_ids=position_ids[first, :P], use_cache=True, **{ck: cache})
    h_prompt = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    parts = [h_prompt[:, -1:][inv]]  # the last prompt position predicts completion token 0
    if L - 1 > P:
        cache.batch_select_indices(inv)  # differentiable indexing: gradients reach the prompt pass
        out = body(input_ids=input_ids[:, P:L - 1], attention_mask=attention_mask[:, :L - 1],
                   position_ids=position_ids[:, P:L - 1], use_cache=True, **{ck: cache})
        parts.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])
    return torch.cat(parts, 1)


def full_logits_logprobs(model, input_ids, attention_mask, completion_mask, *, with_entropy=False,
                         temperature=1.0):
    """The textbook path, kept to measure what chunking saves: logits for every position of
    every row (``[B, L, V]`` float32), ``log_softmax``, gather. Same results as
    :func:`completion_logprobs`, at ``O(B * L * V)`` memory."""
    B, L = input_ids.shape
    T = completion_mask.shape[1]
    P = L - T
    lm = unwrap_causal_lm(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False).logits
    logq = (logits.to(_acc_dtype(logits.dtype)) / temperature).log_softmax(-1)[:, P - 1:L - 1]
    m = completion_mask.to(logq.dtype)
    result = {"logp": logq.gather(-1, input_ids[:, P:, None]).squeeze(-1) * m}
    if with_entropy:
        result["entropy"] = -(logq.exp() * logq).sum(-1) * m
    return result


def completion_logprobs(model, input_ids, attention_mask, completion_mask, *,
                        chunk_size=1024, with_entropy=False, return_hidden=False,
                        share_prompt=True, temperature=1.0):
    """Log-prob of each completion token given its prefix, ``[B, T]`` (0 where masked).

    ``model``: a causal LM (also a ``PolicyWithValueHead`` or a PEFT model around one).
    Position ids come from ``attention_mask`` (as in ``generate``), so left padding does not
    shift positions. Returns a dict with ``logp`` (float32, float64 for float64 models),
    ``entropy`` ``[B, T]`` if ``with_entropy`` (differentiable), and ``hidden`` ``[B, T, H]``
    -- the last hidden states that predict each completion token -- if ``return_hidden``.

    ``share_prompt``: rows with the same prompt (a group's completions, a pair's chosen and
    rejected) run the prompt through the body once and reuse its keys/values; the same
    numbers up to float rounding, fewer FLOPs.

    ``temperature``: log-probs (and entropy) of ``softmax(logits / temperature)``, the
    distribution a sampler at that temperature draws from (as TRL and verl compute them).
    """
    B, L = input_ids.shape
    T = completion_mask.shape[1]
    P = L - T
    if P < 1:
        raise ValueError(f"input_ids has {L} columns but completion_mask {T}: no prompt column")
    lm = unwrap_causal_lm(model)
    body, head = body_and_head(lm)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    hidden = _shared_prompt_hidden(body, input_ids, attention_mask, position_ids, P) \
        if share_prompt and B > 1 else None
    if hidden is None:
        out = body(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False)
        hidden_all = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden = hidden_all[:, P - 1:L - 1]  # position P-1+t predicts completion token t
    sel = completion_mask.bool()
    rows = hidden[sel]
    targets = input_ids[:, P:][sel]

    scale, softcap = _logit_transform(lm.config)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(head, nn.Linear) and softcap is None:
        # under FSDP2 the output layer's shards compute them (parallel/vocab_parallel.py)
        fn = getattr(head, HEAD_LOGPROBS, None) or functools.partial(linear_head_logprobs, head)
        logp_rows, ent_rows = fn(rows, targets, chunk_size=chunk_size, scale=scale / temperature,
                                 with_entropy=with_entropy)
    else:
        logp_rows, ent_rows = _module_logprobs(rows, head, targets, chunk_size, scale,
                                               softcap, with_entropy, temperature)
    result = {"logp": logp_rows.new_zeros(B, T).masked_scatter(sel, logp_rows)}
    if with_entropy:
        result["entropy"] = ent_rows.new_zeros(B, T).masked_scatter(sel, ent_rows)
    if return_hidden:
        result["hidden"] = hidden
    return result
