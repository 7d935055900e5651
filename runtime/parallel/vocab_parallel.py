"""Log-probs through the output layer's FSDP2 shards, never gathering it (vocabulary-parallel).

FSDP2 shards the output layer's weight ``[V, H]`` on dim 0: each process holds the rows of a
slice of the vocabulary. Gathering it for the log-probs (as FSDP2 does for every unit) puts
the whole weight and the whole gradient of the largest unit (``V x H``: more than half of a
small model's parameters) on every process at the start of the backward, under all the
activations. Here each process keeps its slice and the hidden states travel instead
(``N x H`` rows, far smaller than ``V x H`` for the sequence lengths of a micro-batch):

forward: the rows of every process are all-gathered; each process computes, over its slice
of the vocabulary and in tiles (as models/logprobs.py's ``ChunkedLinearLogProb``), the
running max, the sum of ``exp`` and the target's logit (and, for the entropy, the sum of
``exp(z) z``); one all-reduce combines them into each row's log-normaliser; each process
keeps its own rows' log-probs.

backward: the upstream gradients of every row are all-gathered; each process recomputes its
tiles and gets the gradient of its weight slice from every row -- divided by the number of
processes, FSDP2's gradient average -- and partial gradients of every row, which a
reduce-scatter sums and returns to the rows' process. The weight's gradient lands on its
``DTensor`` shard as is: the output layer's FSDP unit never gathers and never reduces.

Every process must call it as often as the others (it is a collective); the engine's
training and no-grad forwards do (padding micro-batches, parallel/fsdp2.py's frozen
forward counts). Used by parallel/fsdp2.py for a bias-free linear output layer without
logit soft-capping.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..models.logprobs import vocab_tile

TILE_ELEMS = 1 << 19  # a logits tile: 2 MB in float32 (the peak is the activations' plus a tile)


def _logits(h, w, scale, acc):
    z = (h @ w.T).to(acc)
    return z.mul_(scale) if scale != 1.0 else z


def _gather_rows(x: torch.Tensor, n_max: int, world: int, group) -> torch.Tensor:
    """``[world * n_max, ...]``: ``x`` (``n <= n_max`` rows) of every process, zero-padded."""
    pad = x.new_zeros((n_max, *x.shape[1:]))
    pad[:x.shape[0]] = x
    out = x.new_empty((world * n_max, *x.shape[1:]))
    dist.all_gather_single(out, pad.contiguous(), group=group)
    return out


def _row_counts(n: int, device, world: int, group) -> list[int]:
    counts = torch.empty(world, dtype=torch.long, device=device)
    dist.all_gather_single(counts, torch.tensor([n], dtype=torch.long, device=device), group=group)
    return [int(c) for c in counts]


class VocabParallelLogProb(torch.autograd.Function):
    """``(logp [n], entropy [n] or empty)`` of this process's rows ``hidden [n, H]`` under the
    full output layer, from this process's weight slice ``w [V_local, H]`` (vocabulary ids
    ``lo .. lo + V_local``); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, w, targets, lo, scale, with_entropy, chunk_size, mesh):
        group = mesh.get_group()  # (the mesh names its group; ctx keeps no process group alive)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = hidden.shape[0]
        counts = _row_counts(n, hidden.device, world, group)
        n_max = max(counts)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        h_all = _gather_rows(hidden.detach(), n_max, world, group)
        t_all = _gather_rows(targets, n_max, world, group)
        rows, v_loc = h_all.shape[0], w.shape[0]
        m = torch.full((rows,), float("-inf"), dtype=acc, device=hidden.device)
        s = torch.zeros(rows, dtype=acc, device=hidden.device)
        zt = torch.zeros(rows, dtype=acc, device=hidden.device)
        ez = torch.zeros(rows, dtype=acc, device=hidden.device)
        wc = w.detach().to(hidden.dtype)
        step = max(1, min(chunk_size, rows))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            h, t = h_all[r0:r1], t_all[r0:r1] - lo
            vc = vocab_tile(r1 - r0, max(1, v_loc), TILE_ELEMS)
            for v0 in range(0, v_loc, vc):
                v1 = min(v_loc, v0 + vc)
                z = _logits(h, wc[v0:v1], scale, acc)
                hit = (t >= v0) & (t < v1)
                if hit.any():
                    idx = hit.nonzero().squeeze(-1)
                    zt[r0 + idx] += z[idx, t[idx] - v0]
                new_m = torch.maximum(m[r0:r1], z.max(-1).values)
                corr = (m[r0:r1] - new_m).exp()
                if with_entropy:
                    zz = z.clone()
                e = z.sub_(new_m[:, None]).exp_()  # in place: one tile buffer
                s[r0:r1] = s[r0:r1] * corr + e.sum(-1)
                if with_entropy:
                    ez[r0:r1] = ez[r0:r1] * corr + (e * zz).sum(-1)
                m[r0:r1] = new_m
        big = m.clone()
        dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
        corr = (m - big).exp()
        stats = torch.stack([s * corr, zt, ez * corr])
        dist.all_reduce(stats, group=group)
        S, ZT, EZ = stats
        log_z = big + S.log()
        mean_z = EZ / S  # E_p[z], for the entropy log Z - E_p[z]
        mine = slice(rank * n_max, rank * n_max + n)
        logp = (ZT - log_z)[mine]
        ent = (log_z - mean_z)[mine] if with_entropy else logp.new_empty(0)
        ctx.save_for_backward(h_all, t_all, w, log_z, mean_z)
        ctx.meta = (lo, scale, with_entropy, chunk_size, mesh, n, n_max, world, rank, hidden.dtype)
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        h_all, t_all, w, log_z, mean_z = ctx.saved_tensors
        lo, scale, with_entropy, chunk_size, mesh, n, n_max, world, rank, hdtype = ctx.meta
        group = mesh.get_group()
        acc = log_z.dtype
        g_lp = _gather_rows(g_logp.to(acc).contiguous(), n_max, world, group)
        g_en = _gather_rows(g_ent.to(acc).contiguous(), n_max, world, group) if with_entropy else None
        rows, v_loc = h_all.shape[0], w.shape[0]
        wc = w.to(hdtype)
        grad_h = torch.zeros((rows, h_all.shape[1]), dtype=acc, device=h_all.device)
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device)
        step = max(1, min(chunk_size, rows))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            h, t = h_all[r0:r1], t_all[r0:r1] - lo
            gl = g_lp[r0:r1]
            vc = vocab_tile(r1 - r0, max(1, v_loc), TILE_ELEMS)
            for v0 in range(0, v_loc, vc):
                v1 = min(v_loc, v0 + vc)
                z = _logits(h, wc[v0:v1], scale, acc)
                if with_entropy:
                    dz = (z - mean_z[r0:r1, None]).mul_(g_en[r0:r1, None])
                p = z.sub_(log_z[r0:r1, None]).exp_()  # in place: one tile buffer
                if with_entropy:
                    dz.mul_(p)
                gz = p.mul_(-gl[:, None])
                if with_entropy:
                    gz.sub_(dz)
                    del dz
                hit = (t >= v0) & (t < v1)
                if hit.any():
                    idx = hit.nonzero().squeeze(-1)
                    gz[idx, t[idx] - v0] += gl[idx]
                if scale != 1.0:
                    gz.mul_(scale)
                grad_h[r0:r1] += gz @ wc[v0:v1].to(acc)
                grad_w[v0:v1] += gz.T @ h.to(acc)
        grad_w /= world  # FSDP2 averages gradients over processes
        mine = torch.empty((n_max, grad_h.shape[1]), dtype=acc, device=grad_h.device)
        dist.reduce_scatter_single(mine, grad_h, group=group)
        return mine[:n].to(hdtype), grad_w.to(w.dtype), None, None, None, None, None, None


def sharded_logprobs(head, hidden, targets, *, chunk_size=1024, scale=1.0, with_entropy=False):
    """Log-probs (and entropy) of ``targets`` through ``head``, an FSDP2-sharded bias-free linear
    output layer: vocabulary-parallel while its weight is a sharded ``DTensor``; through the
    whole weight when it is gathered (generation and evaluation, parallel/fsdp2.py's
    ``gathered``)."""
    from torch.distributed.tensor import DTensor
    from ..models.logprobs import linear_head_logprobs
    weight = head.weight
    if not isinstance(weight, DTensor):
        return linear_head_logprobs(head, hidden, targets, chunk_size=chunk_size, scale=scale,
                                    with_entropy=with_entropy)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    logp, ent = VocabParallelLogProb.apply(hidden, weight.to_local(), targets, int(offset[0]), float(scale),
                                           bool(with_entropy), int(chunk_size), weight.device_mesh)
    return logp, (ent if with_entropy else None)
