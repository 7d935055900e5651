"""The learning check: every seed algorithm on the built-in default, each in its own process.

    .venv/bin/python bench/learning.py [--out runs/learning] [--only spin,sppo] [--jobs 1]

runs ``alignspec run NAME --out OUT/NAME`` (no --model / --data: the built-in task, model
and presets) for each seed algorithm and prints a table: the headline metric at the start
and at the end, the wall time of the whole process (imports and model loading included)
and the optimizer steps. The headline metric is ``eval_score``: held-out greedy accuracy
(the arithmetic task; for mcts the step task's full-solution accuracy; for grpo_tools the
agentic task's, greedy episodes with the calculator tool; for flow_grpo the
flow task's mean reward of deterministic ODE samples), for reward_model the pairwise accuracy on held-out pairs, and for the
rlhf pipeline the last stage's (start = the first stage's start, steps = all stages').
A run that fails shows its exit code and last error line in the table. The table and the
raw results are also written to OUT/learning.md and OUT/learning.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ["sft", "reward_model", "ppo", "rlhf", "dpo", "grpo", "dapo", "flow_grpo", "spin", "sppo", "rspo",
         "ampo", "mcts", "kto", "orpo", "cpo", "aot", "reinforce_pp", "grpo_tis", "grpo_tools"]
METRIC = {"reward_model": "held-out pairwise acc.", "mcts": "step-task accuracy", "rlhf": "last stage's accuracy",
          "flow_grpo": "mean reward of ODE samples", "grpo_tools": "agentic-task accuracy (greedy episodes)"}


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("alignspec")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "alignspec.cli"]


def _evals(out: Path) -> tuple[list[float], int]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return [], 0
    recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    evals = [r["eval_score"] for r in recs if r.get("eval_score") is not None]
    steps = max((r["step"] for r in recs if "loss" in r), default=0)
    return evals, steps


def run_one(name: str, root: Path, timeout: float) -> dict:
    out = root / name
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(_cli() + ["run", name, "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=timeout)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or ""), f"no result after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "stdout.log").write_text(stdout or "")
    (out / "stderr.log").write_text(stderr or "")
    res = {"algorithm": name, "rc": rc, "wall_s": wall, "metric": METRIC.get(name, "held-out accuracy")}
    if (out / "pipeline.json").is_file():
        summ = json.loads((out / "pipeline.json").read_text())
        stages = summ["stages"]
        res.update(start=summ.get("start_eval"), end=summ.get("eval_score"),
                   steps=sum(s.get("steps") or 0 for s in stages),
                   stages=[{k: s.get(k) for k in ("stage", "spec", "start_eval", "eval_score", "steps", "wall_s")}
                           for s in stages])
    else:
        evals, steps = _evals(out)
        res.update(start=evals[0] if evals else None, end=evals[-1] if evals else None, steps=steps,
                   evals=evals)
    if rc != 0:
        lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
        res["error"] = lines[-1] if lines else f"exit code {rc}"
    return res


def _f(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def table(results: list[dict]) -> str:
    rows = ["| algorithm | metric | start | end | wall time | steps | note |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["rc"] != 0:
            note = f"FAILED (exit {r['rc']}): {r.get('error', '')}".replace("|", "\\|")
        elif r.get("stages"):
            note = "; ".join(f"{s['stage']} ({s['spec']}) {_f(s['start_eval'])} → {_f(s['eval_score'])}"
                             for s in r["stages"])
        else:
            note = ""
        rows.append(f"| {r['algorithm']} | {r['metric']} | {_f(r.get('start'))} | {_f(r.get('end'))} | "
                    f"{r['wall_s']:.0f} s | {r.get('steps') or 0} | {note} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/learning", help="one sub-directory per algorithm")
    ap.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(SEEDS))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (wall times are then not comparable)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else SEEDS
    unknown = [n for n in names if n not in SEEDS]
    if unknown:
        ap.error(f"unknown algorithm(s): {', '.join(unknown)}")
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}

    def go(name):
        r = run_one(name, root, args.timeout)
        print(f"{name}: {'ok' if r['rc'] == 0 else 'FAILED'}  {_f(r.get('start'))} -> {_f(r.get('end'))}  "
              f"{r['wall_s']:.0f} s  {r.get('steps') or 0} steps", flush=True)
        results[name] = r
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(go, names))
    ordered = [results[n] for n in names]
    text = table(ordered)
    print()
    print(text)
    (root / "learning.md").write_text(text + "\n")
    (root / "learning.json").write_text(json.dumps(ordered, indent=2))
    return 0 if all(r["rc"] == 0 for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
