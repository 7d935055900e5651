"""What a run reports: ``metrics.jsonl`` and the trackers, the progress bar, the CPU profile, ``curves.png``."""

from __future__ import annotations

import json

import torch


class MetricsMixin:
    """Metrics, progress, plot and profile of a run (``self.out``, ``self.cfg``, ``self.main``)."""

    def _log(self, rec: dict) -> None:
        """One record: a line of ``OUT/metrics.jsonl`` (main process), its numbers to the trackers."""
        if self.main:
            mode = "w" if getattr(self, "_fresh_metrics", False) else "a"
            with open(self.out / "metrics.jsonl", mode, encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            self._fresh_metrics = False
        if self.cfg.log_with:
            self.acc.log({k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))},
                         step=rec["step"])

    def _reset_metrics(self, resumed: bool) -> None:
        """A fresh run starts a new ``metrics.jsonl`` with its first line (an earlier run's stays
        until then, so a run that fails before logging loses nothing); a resumed one keeps the
        lines up to its step."""
        mpath = self.out / "metrics.jsonl"
        self._fresh_metrics = not resumed
        if not self.main or not mpath.exists() or not resumed:
            return
        lines = [ln for ln in mpath.read_text().splitlines()
                 if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        mpath.write_text("".join(ln + "\n" for ln in lines))

    def _progress(self):
        """The rich progress bar of the steps (shown on the main process only)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                        console=self.console, disable=not self.main, transient=False)

    def _progress_info(self, res: dict, last_eval: float | None) -> str:
        """The text after the progress bar: the step's loss, ``bar_metrics``, the last eval."""
        info = f"loss {res['loss']:.4f}"
        for key, label in self.bar_metrics:
            if key in res:
                info += f"  {label} {res[key]:.3f}"
        if last_eval is not None:
            info += f"  eval {last_eval:.3f}"
        return info

    def _start_profile(self):
        """A running torch CPU profiler with the ``profile`` setting, else None."""
        if not self.cfg.profile:
            return None
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
        prof.__enter__()
        return prof

    def _stop_profile(self, prof) -> None:
        """Stop ``prof`` and write its table to ``OUT/profile.txt``."""
        if prof is None:
            return
        prof.__exit__(None, None, None)
        if self.main:
            (self.out / "profile.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                            row_limit=30))

    def _plot(self) -> None:
        """``OUT/curves.png``: the loss, then each of ``curve_metrics`` that was logged (needs matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        recs = [json.loads(ln) for ln in (self.out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        panels = [("loss", [(r["step"], r["loss"]) for r in recs if "loss" in r and r["loss"] == r["loss"]])]
        for name in self.curve_metrics:
            pts = [(r["step"], r[name]) for r in recs if name in r]
            if pts:
                panels.append((name, pts))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for ax, (name, pts) in zip(axes[0], panels):
            if pts:
                ax.plot(*zip(*pts), **({"marker": "o"} if name == "eval_score" else {}))
            ax.set_title(f"{self.algo.name}: {name}" if name == "loss" else name)
            ax.set_xlabel("step")
            if name == "eval_score":
                ax.set_ylim(-0.02, 1.02)
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=100)
        plt.close(fig)
