"""The final model's card, ``OUT/model/README.md``: what was trained, from what, on what, how,
and how it ended -- the spec (its text), the base model, the data, every setting and the last
value of each metric (from ``OUT/metrics.jsonl``, so a resumed run's earlier steps count)."""

from __future__ import annotations

import json
from pathlib import Path


def _latest_metrics(out: Path) -> dict:
    latest: dict = {}
    try:
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return latest
    for ln in lines:
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict):
            latest.update({k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return latest


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    n = 3
    while "`" * n in text:
        n += 1
    return "`" * n


def model_card(run) -> str:
    """The card's Markdown for ``run`` (an engine: ``algo``, ``cfg``, ``out``, ``step``)."""
    import yaml
    algo, cfg = run.algo, run.cfg
    spec = getattr(algo, "spec", None)
    source = getattr(spec, "source", None) or ""
    path = getattr(spec, "path", None)
    base = cfg.init_model or cfg.model or "alignspec's built-in tiny model"
    data = cfg.data or "alignspec's built-in task"
    settings = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True, allow_unicode=True)
    metrics = _latest_metrics(run.out)
    lines = ["---", "library_name: transformers", "tags:", "- alignspec", f"- {json.dumps(algo.name)}", "---", "",
             f"# {algo.name}, trained with alignspec", "",
             f"- Spec: `{algo.name}`" + (f" ({path})" if path else ""),
             f"- Base model: {base}", f"- Data: {data}", f"- Steps: {run.step}", ""]
    if source:
        f = _fence(source)
        lines += ["## Spec", "", f + "text", source.rstrip("\n"), f, ""]
    f = _fence(settings)
    lines += ["## Settings", "", f + "yaml", settings.rstrip("\n"), f, ""]
    if metrics:
        lines += ["## Last metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()) if k != "step"]
        lines.append("")
    return "\n".join(lines)


def write_model_card(run, folder: Path) -> None:
    (folder / "README.md").write_text(model_card(run), encoding="utf-8")
