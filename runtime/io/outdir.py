"""A run's output folder: checked before anything loads, locked while the run writes to it,
never inside (or around) the run's model or data, and restored from whatever state a kill
left its checkpoint in.

- ``--out`` must be a folder (or not exist yet); a file, ``/dev/null`` or an unwritable place
  is an error that says so.
- A non-empty folder that no alignspec run wrote (no ``.alignspec-run`` mark) is refused
  unless the run configuration says ``overwrite: true``; the run then writes only its own
  names (``metrics.jsonl``, ``checkpoint/``, ``checkpoint-<step>/``, ``model/``, ``curves.png``) and deletes nothing else.
- ``OUT/.lock`` is held (``flock``) by the main process for the whole run: a second run on the
  same folder stops at once with the pid of the first.
- Checkpoints are replaced through ``OUT/.checkpoint.tmp<pid>`` (written completely, its
  ``state.json`` last) and ``OUT/.checkpoint.old`` (the previous one, kept until the new one is
  in place): ``recover_checkpoint`` puts the newest complete copy back in ``OUT/checkpoint``
  and removes the rest, whichever step of a save a kill interrupted; with none of those left,
  the newest complete ``OUT/checkpoint-<step>`` that ``save_total_limit`` kept.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from ..errors import RunError

MARK = ".alignspec-run"


def _local(path) -> Path | None:
    """``path`` resolved, when it names something on this machine (not a hub id)."""
    if not path:
        return None
    p = Path(os.path.expanduser(str(path)))
    return p.resolve() if p.exists() else None


def _overlap(out: Path, inp: Path) -> bool:
    """True when writing under ``out`` could touch ``inp``: the same place, ``inp`` inside
    ``out``, or ``out`` inside the folder ``inp``."""
    return out == inp or out in inp.parents or (inp.is_dir() and inp in out.parents)


class OutLock:
    """The main process's hold on ``OUT``: released by ``release`` (the end of ``train``) or
    when the process ends. Claiming a folder this process already holds shares the hold."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path
        _HELD[path] = self

    def release(self) -> None:
        if self.fd >= 0:
            _HELD.pop(self.path, None)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


_HELD: dict[Path, OutLock] = {}


def claim_out(cfg, *, resume: bool, main: bool = True, spec: str = "") -> OutLock | None:
    """Check ``cfg.out`` against the inputs and its contents, then (main process) create it,
    lock it, mark it as a run folder, remove unfinished saves and recover the checkpoint."""
    out = Path(os.path.expanduser(str(cfg.out)))
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is not a folder (it is a file or a device)",
                       hint="give a new or empty folder, or a folder of an earlier run")
    resolved = out.resolve()
    for what in ("model", "data", "init_model", "reference_model", "reward_model", "preference_model",
                 "embedding_model"):
        inp = _local(getattr(cfg, what, None))
        if inp is not None and _overlap(resolved, inp):
            raise RunError(f"--out {out} overlaps the run's {what.replace('_', ' ')} {getattr(cfg, what)}: "
                           "the run would write into its own input",
                           hint="choose an --out folder outside the model and data folders")
    if out.is_dir() and not (out / MARK).exists() and not getattr(cfg, "overwrite", False):
        try:
            # `.lock` alone: the main process of this very launch, between its lock and its mark
            # (another process of a multi-process run checks the folder at the same time)
            entries = sorted(p.name for p in out.iterdir() if p.name != ".lock")
        except OSError as e:
            raise RunError(f"cannot read --out {out}: {e.strerror or e}") from None
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise RunError(f"--out {out} is not empty ({shown}) and holds no alignspec run",
                           hint="choose a new or empty folder, or --set overwrite=true to write the run's "
                                "files (metrics.jsonl, checkpoint/, model/, curves.png) beside what is there")
    if not main:
        return None
    if resolved in _HELD:
        return _HELD[resolved]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"cannot write to --out {out}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunError(f"another run (pid {other}) is writing to {out}",
                       hint="wait for it to finish, or give this run another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    lock = OutLock(fd, out.resolve())
    try:
        (out / MARK).write_text(json.dumps({"spec": spec}) + "\n")
        for left in [*out.glob(".model.tmp*"), out / ".model.old"]:  # a final save a kill cut short
            shutil.rmtree(left, ignore_errors=True)
        recover_checkpoint(out)
    except OSError as e:
        lock.release()
        raise RunError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return lock


def _complete(ck: Path) -> bool:
    """A checkpoint folder is complete when its ``state.json`` (written last) parses."""
    try:
        json.loads((ck / "state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def recover_checkpoint(out: Path) -> None:
    """Leave ``OUT/checkpoint`` as the newest complete checkpoint that a kill left anywhere
    (``checkpoint``, a finished ``.checkpoint.tmp*`` or ``.checkpoint.old``) and remove the others."""
    dest, old = out / "checkpoint", out / ".checkpoint.old"
    tmps = sorted(out.glob(".checkpoint.tmp*"))
    if not _complete(dest):
        # killed after the old copy moved aside: the finished new copy, else the old one
        done = [t for t in tmps if _complete(t)]
        best = max(done, key=lambda t: json.loads((t / "state.json").read_text()).get("step", 0), default=None)
        if best is None and _complete(old):
            best = old
        if best is None:  # nothing of the last save survived: the newest kept OUT/checkpoint-<step>
            kept = [p for p in out.glob("checkpoint-*") if p.name[11:].isdigit() and _complete(p)]
            best = max(kept, key=lambda p: int(p.name[11:]), default=None)
        if best is not None:
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(best, dest)
    for leftover in [*out.glob(".checkpoint.tmp*"), old]:
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
