"""parallel/vocab_parallel.py: log-probs from the output layer's FSDP2 shards (never gathered),
on 2 processes (torchrun, gloo), against models/logprobs.py's tiled log-probs through the
whole layer on one process: the log-probs, the entropies, the gradient of each process's
rows and, summed over processes, the weight's gradient (1e-5) -- with rows of unequal
counts, a logit scale (a sampling temperature) and a vocabulary that does not split evenly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from test_distributed import free_port

SCRIPT = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from alignspec.runtime.models.logprobs import linear_logprobs
from alignspec.runtime.parallel.vocab_parallel import sharded_logprobs
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
V, H, scale = 1001, 16, 1 / 0.7
head = torch.nn.Linear(H, V, bias=False).double()
w0 = head.weight.detach().clone()
rows = [torch.randn(n, H, dtype=torch.float64) for n in (7, 3)]  # process r's rows: rows[r]
targets = [torch.randint(0, V, (n,)) for n in (7, 3)]
up = [(torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)) for n in (7, 3)]
fully_shard(head, mesh=init_device_mesh("cpu", (2,)))
h = rows[rank].clone().requires_grad_(True)
lp, ent = sharded_logprobs(head, h, targets[rank], chunk_size=4, scale=scale, with_entropy=True)
((lp * up[rank][0]).sum() + (ent * up[rank][1]).sum()).backward()
gw = head.weight.grad.full_tensor()  # FSDP2's average over processes
out = {"lp": lp.tolist(), "ent": ent.tolist(), "gh": h.grad.tolist(), "gw": gw.flatten().tolist()}
if rank == 0:  # the whole layer on one process, each process's loss, averaged
    w = w0.clone().requires_grad_(True)
    ref = {"lp": [], "ent": [], "gh": []}
    total = 0
    for r in (0, 1):
        hr = rows[r].clone().requires_grad_(True)
        a, b = linear_logprobs(hr, w, None, targets[r], chunk_size=4, scale=scale, with_entropy=True)
        loss = (a * up[r][0]).sum() + (b * up[r][1]).sum()
        loss.backward()
        ref["lp"].append(a.tolist()); ref["ent"].append(b.tolist()); ref["gh"].append(hr.grad.tolist())
    ref["gw"] = (w.grad / 2).flatten().tolist()
    out["ref"] = ref
with open(sys.argv[1] + f"/r{rank}.json", "w") as f:
    json.dump(out, f)
"""


def test_vocab_parallel_logprobs_match_the_whole_layer(tmp_path):
    script = tmp_path / "vp.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", free_port(), str(script), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    outs = [json.loads((tmp_path / f"r{k}.json").read_text()) for k in (0, 1)]
    ref = outs[0]["ref"]
    for k in (0, 1):
        for key in ("lp", "ent", "gh"):
            got, want = torch.tensor(outs[k][key]), torch.tensor(ref[key][k])
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0), (k, key)
        got, want = torch.tensor(outs[k]["gw"]), torch.tensor(ref["gw"])
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (k, (got - want).abs().max())
    assert torch.tensor(ref["gw"]).abs().max() > 1e-3  # a gradient to compare
