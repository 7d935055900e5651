"""Forward + backward time of the compiled loss vs a hand-written eager PyTorch loss.

    .venv/bin/python bench/loss_step.py [--B 64] [--T 1024] [--reps 40] [--threads 1] [--no-torch-compile]

For grpo, dapo, dpo and ppo (built-in specs, default parameters), on CPU in float32, one
process: the rollout stages (`algo.prepare`: group advantages, GAE, whitening, returns) run once
before timing; the hand-written loss gets the same precomputed values (computed by hand). Each
repeat times `loss = f(); loss.backward()` for every variant in turn (interleaved, order
rotated each repeat) after warm-up; the table reports medians, the ratio compiled /
hand-written (goal <= 1.0), and the bytes of tensors saved for backward (unique storages seen
by `torch.autograd.graph.saved_tensors_hooks`, a proxy for activation memory). The compiled
loss also computes its logged metrics (ratio mean, clip fraction, ...) under no_grad; the
hand-written one computes none. `--torch-compile` rows run `algo.use_torch_compile()`
(inductor); its compile time is reported and failures are caught and printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import alignspec

EPS = 0.2


# ----------------------------------------------------------------------------- hand-written losses
def hand_grpo(b, p):
    logp, mask = b["logp"], b["mask"]
    A = b["A_hand"][:, None]
    ratio = torch.exp(logp - logp.detach())
    pg = torch.min(ratio * A, torch.clamp(ratio, 1 - p["eps"], 1 + p["eps"]) * A)
    d = b["logp_ref"] - logp
    kl = torch.exp(d) - d - 1
    per_token = (pg - p["beta"] * kl) * mask
    return -(per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def hand_dapo(b, p):
    logp, mask = b["logp"], b["mask"]
    A = b["A_hand"][:, None]
    ratio = torch.exp(logp - logp.detach())
    pg = torch.min(ratio * A, torch.clamp(ratio, 1 - p["eps"], 1 + p["eps_high"]) * A)
    return -(pg * mask).sum() / mask.sum().clamp(min=1)


def hand_dpo(b, p):
    h = p["beta"] * ((b["logp"] - b["logp_ref"]) * b["mask"]).sum(-1)
    return -torch.nn.functional.logsigmoid(h[0::2] - h[1::2]).mean()


def hand_ppo(b, p):
    logp, mask, A, R, vo, v = b["logp"], b["mask"], b["A_hand"], b["R_hand"], b["value_old"], b["value"]
    ratio = torch.exp(logp - b["logp_old"])
    pg = torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - p["eps"], 1 + p["eps"]))
    vc = torch.max(torch.min(v, vo + p["eps_value"]), vo - p["eps_value"])
    vf = 0.5 * torch.max((v - R) ** 2, (vc - R) ** 2)
    n = mask.sum()
    return (pg * mask).sum() / n + p["vf_coef"] * ((vf * mask).sum() / n)


HAND = {"grpo": hand_grpo, "dapo": hand_dapo, "dpo": hand_dpo, "ppo": hand_ppo}
LEAVES = {"grpo": ["logp"], "dapo": ["logp"], "dpo": ["logp"], "ppo": ["logp", "value"]}


# ----------------------------------------------------------------------------- data and rollout by hand
def make_batch(name, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None])  # bool, as the runtime passes it (both losses accept bool or float)
    logp = -(torch.rand(B, T, generator=g) * 3 + 0.01)
    b = {
        "mask": mask,
        "logp": logp,
        "logp_old": logp + 0.1 * torch.randn(B, T, generator=g),
        "logp_ref": logp + 0.3 * torch.randn(B, T, generator=g),
        "value_old": torch.randn(B, T, generator=g),
        "reward": torch.randn(B, generator=g),
        "reward_model": torch.randn(B, generator=g),
    }
    b["value"] = b["value_old"] + 0.2 * torch.randn(B, T, generator=g)
    b["length"] = mask.sum(-1)
    return b


def hand_rollout(name, b, p, n):
    """Advantages for the hand-written losses (not timed)."""
    out = {}
    if name in ("grpo", "dapo"):
        r = b["reward"].view(-1, n)
        out["A_hand"] = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    elif name == "ppo":
        mask = b["mask"]
        last = mask.sum(-1).long() - 1
        rewards = -p["kl_coef"] * (b["logp_old"] - b["logp_ref"]) * mask
        rewards[torch.arange(mask.shape[0]), last] += b["reward_model"]
        values = b["value_old"] * mask
        adv = torch.zeros_like(values)
        lastgae = torch.zeros(mask.shape[0])
        for t in reversed(range(mask.shape[1])):  # right padding: zeros past the end
            nextv = values[:, t + 1] if t + 1 < mask.shape[1] else 0.0
            delta = rewards[:, t] + p["gamma"] * nextv - values[:, t]
            lastgae = delta + p["gamma"] * p["lam"] * lastgae
            adv[:, t] = lastgae
        adv = adv * mask
        out["R_hand"] = adv + b["value_old"]
        mean = (adv * mask).sum() / mask.sum()
        var = (((adv - mean) ** 2) * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
        out["A_hand"] = (adv - mean) * torch.rsqrt(var + 1e-8) * mask
    return out


# ----------------------------------------------------------------------------- measurement
class Variant:
    def __init__(self, label, fn, batch, leaves):
        self.label, self.fn, self.batch, self.leaves = label, fn, batch, leaves
        self.times = []
        self.error = None

    def step(self):
        b = dict(self.batch)
        for k in self.leaves:
            b[k].grad = None
        t0 = time.perf_counter()
        loss = self.fn(b)
        loss.backward()
        self.times.append(time.perf_counter() - t0)
        return loss

    def saved_mb(self):
        seen = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except Exception:  # noqa: BLE001 - e.g. tensors without storage
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.fn(dict(self.batch))
        loss.backward()
        return sum(seen.values()) / 2**20


def leaves_of(batch, names):
    out = dict(batch)
    for k in names:
        out[k] = batch[k].detach().clone().requires_grad_(True)
    return out


def run(names, B, T, reps, warmup, use_tc):
    rows = []
    for name in names:
        algo = alignspec.compile(name)
        p = algo.params
        raw = make_batch(name, B, T)
        prepared = algo.prepare({k: raw[k] for k in algo.inputs})
        prepared = {k: v for k, v in prepared.items() if k not in ("_rollout_metrics", "_keep", "_rows")}
        hand_batch = {**raw, **hand_rollout(name, raw, p, algo.group_size)}
        leaves = LEAVES[name]
        variants = [
            Variant("hand-written", lambda b, f=HAND[name]: f(b, p), leaves_of(hand_batch, leaves), leaves),
            Variant("compiled", lambda b, a=algo: a.step_loss(b, with_metrics=False).loss,
                    leaves_of(prepared, leaves), leaves),
            Variant("compiled+metrics", lambda b, a=algo: a.step_loss(b).loss, leaves_of(prepared, leaves), leaves),
        ]
        # the two losses agree (same formula)
        l_hand = variants[0].fn(dict(variants[0].batch)).item()
        l_comp = variants[1].fn(dict(variants[1].batch)).item()
        agree = abs(l_hand - l_comp) <= 1e-4 * max(1.0, abs(l_hand))
        compile_s = None
        if use_tc:
            try:
                tc = alignspec.compile(name).use_torch_compile()
                v = Variant("torch.compile", lambda b, a=tc: a.step_loss(b, with_metrics=False).loss,
                            leaves_of(prepared, leaves), leaves)
                t0 = time.perf_counter()
                for _ in range(3):
                    v.step()
                compile_s = time.perf_counter() - t0
                v.times.clear()
                variants.append(v)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                compile_s = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        for v in variants:
            for _ in range(warmup):
                v.step()
            v.times.clear()
        for r in range(reps):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                v.step()
        med = {v.label: statistics.median(v.times) for v in variants}
        saved = {}
        for v in variants:
            try:
                saved[v.label] = v.saved_mb()
            except Exception as e:  # noqa: BLE001
                saved[v.label] = None
                v.error = f"saved-tensor hooks: {type(e).__name__}"
        rows.append((name, med, saved, agree, l_hand, l_comp, compile_s))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-torch-compile", dest="tc", action="store_false")
    ap.add_argument("--algos", default="grpo,dapo,dpo,ppo")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: steadier medians on a shared machine; 0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, float32, B={args.B}, T={args.T}, "
          f"{args.reps} interleaved repeats (median), forward + backward")
    rows = run(args.algos.split(","), args.B, args.T, args.reps, args.warmup, args.tc)
    head = (f"{'algo':<6} {'hand ms':>8} {'compiled ms':>11} {'ratio':>6} {'+metrics':>8} {'saved MB hand':>13} "
            f"{'saved MB comp':>13}  {'torch.compile ms':>16} {'ratio':>6}  same loss")
    print(head)
    print("-" * len(head))
    notes = []
    for name, med, saved, agree, lh, lc, cs in rows:
        h, c = med["hand-written"], med["compiled"]
        tc = med.get("torch.compile")
        tc_txt = f"{tc * 1e3:16.2f} {tc / h:6.2f}" if tc is not None else f"{'n/a':>16} {'':>6}"
        fmt = lambda x: f"{x:13.1f}" if x is not None else f"{'n/a':>13}"  # noqa: E731
        cm = med["compiled+metrics"]
        print(f"{name:<6} {h * 1e3:8.2f} {c * 1e3:11.2f} {c / h:6.2f} {cm / h:8.2f} {fmt(saved['hand-written'])} "
              f"{fmt(saved['compiled'])}  {tc_txt}  {'yes' if agree else f'NO ({lh:.6g} vs {lc:.6g})'}")
        if cs is not None:
            extra = (f", saved MB {saved['torch.compile']:.1f}" if isinstance(cs, float)
                     and saved.get("torch.compile") is not None else "")
            notes.append(f"  {name}: torch.compile warm-up (3 steps) "
                         + (f"{cs:.1f} s{extra}" if isinstance(cs, float) else cs))
    if notes:
        print("\n".join(notes))
    print("ratio = compiled / hand-written, both without logging metrics; +metrics = the compiled loss also\n"
          "computing its detached metrics (clip fractions, means of every named value), as the runtime logs them.")
    print(f"total bench time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
