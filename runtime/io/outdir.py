"""A run's output folder: checked before anything loads, locked while the run writes to it,
never inside (or around) the run's model or data, and restored from whatever state a kill
left its checkpoint in.

- ``--out`` must be a folder (or not exist yet); a file, ``/dev/null`` or an unwritable place
  is an error that says so.
- A non-empty folder that no alignspec run wrote (no ``.alignspec-run`` mark) is refused
  unless the run configuration says ``overwrite: true``; the run then writes only its own
  names (``metrics.jsonl``, ``checkpoint/``, ``checkpoint-<step>/``, ``model/``, ``curves.png``)
  and deletes nothing else: of ``checkpoint-*`` folders only those alignspec wrote
  (``checkpoint-<step>`` holding its ``state.json`` and ``process_0.json``: ``own_checkpoint_step``).
- A fresh run (no ``--resume``) into the folder of an earlier run that left a model or a
  checkpoint is refused unless ``overwrite: true``; the error names the spec and the step.
- Nothing in the folder is written through a symbolic link: one of the run's own names that
  is a link (``.lock``, ``.alignspec-run``, ``metrics.jsonl``, ``checkpoint``, ``model``, ...)
  is refused with its path, and ``.lock`` is opened with ``O_NOFOLLOW``.
- ``OUT/.lock`` is held (``flock``) by the main process for the whole run: a second run on the
  same folder stops at once with the pid of the first.
- Checkpoints are replaced through ``OUT/.checkpoint.tmp<pid>`` (written completely, its
  ``state.json`` last) and ``OUT/.checkpoint.old`` (the previous one, kept until the new one is
  in place): ``recover_checkpoint`` puts the newest complete copy back in ``OUT/checkpoint``
  and removes the rest, whichever step of a save a kill interrupted; with none of those left,
  the newest complete ``OUT/checkpoint-<step>`` that ``save_total_limit`` kept. The final
  model is replaced the same way (``OUT/.model.tmp<pid>``, ``OUT/.model.old``) and
  ``recover_model`` puts it back after a kill between the two renames.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from ..errors import RunError

MARK = ".alignspec-run"
# the run's own names in OUT (with .checkpoint.tmp*, .model.tmp*): never symbolic links
OWN_NAMES = (".lock", MARK, "metrics.jsonl", "checkpoint", "model", "curves.png", ".checkpoint.old", ".model.old")
MAX_STEP = 1 << 53  # a step beyond it is a damaged checkpoint, not a long run


def valid_step(step) -> bool:
    """A step as a checkpoint stores it: a whole number (not a bool) from 0 to ``MAX_STEP``."""
    return type(step) is int and 0 <= step <= MAX_STEP


def checkpoint_step(ck: Path) -> int | None:
    """The step of the complete alignspec checkpoint ``ck`` (a real folder, not a link, whose
    ``state.json``, written last, is an object with a valid step); None otherwise."""
    try:
        if ck.is_symlink() or not ck.is_dir():
            return None
        state = json.loads((ck / "state.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return step if valid_step(step) else None


def own_checkpoint_step(p: Path) -> int | None:
    """The step of ``OUT/checkpoint-<step>`` when alignspec wrote it (its name's step, a complete
    checkpoint with its ``process_0.json``); None for anything else, such as a Hugging Face
    Trainer's ``checkpoint-500`` or a user's ``checkpoint-best``."""
    tail = p.name[len("checkpoint-"):]
    if not p.name.startswith("checkpoint-") or not tail.isdigit() or not (p / "process_0.json").is_file():
        return None
    return int(tail) if checkpoint_step(p) is not None else None


def _links(out: Path) -> list[Path]:
    """The run's own names in ``out`` that are symbolic links."""
    names = [out / n for n in OWN_NAMES] + [*out.glob(".checkpoint.tmp*"), *out.glob(".model.tmp*")]
    return [p for p in names if p.is_symlink()]


def _finished(out: Path) -> str | None:
    """What an earlier run left in ``out`` that a fresh run would replace (its model, its
    checkpoint), in words with its spec and step; None when nothing."""
    left = [n for n in ("model", ".model.old", "checkpoint", ".checkpoint.old") if (out / n).exists()]
    left += [p.name for p in out.glob(".checkpoint.tmp*")] + [p.name for p in out.glob(".model.tmp*")]
    left += sorted(p.name for p in out.glob("checkpoint-*") if own_checkpoint_step(p) is not None)
    if not left:
        return None
    spec = step = None
    try:
        mark = json.loads((out / MARK).read_text())
        spec = mark.get("spec") if isinstance(mark, dict) and isinstance(mark.get("spec"), str) else None
    except (OSError, ValueError, RecursionError):
        pass
    for ck in (out / "checkpoint", out / ".checkpoint.old"):
        step = checkpoint_step(ck)
        if step is not None:
            try:
                spec = spec or json.loads((ck / "state.json").read_text()).get("spec")
            except (OSError, ValueError, AttributeError):
                pass
            break
    what = f"a run of {spec!r}" if spec else "an earlier run"
    at = f" (checkpoint at step {step})" if step is not None else ""
    return f"{what}{at}: {', '.join(left[:6])}{', ...' if len(left) > 6 else ''}"


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
    if out.is_dir():
        links = _links(out)
        if links:
            raise RunError(f"{links[0]} is a symbolic link: a run never writes through links in --out",
                           hint="remove the link (or move the folder's real files in its place), or give "
                                "another --out")
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
    if out.is_dir() and (out / MARK).exists() and not resume and not getattr(cfg, "overwrite", False):
        there = _finished(out)
        if there is not None:
            raise RunError(f"--out {out} holds {there}; a fresh run would replace them",
                           hint="continue it with --resume, give another --out, or --set overwrite=true to "
                                "replace that run's model and checkpoints")
    if not main:
        return None
    if resolved in _HELD:
        return _HELD[resolved]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link made since the check above
            raise RunError(f"{out / '.lock'} is a symbolic link: a run never writes through links in --out",
                           hint="remove the link, or give another --out") from None
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
        _write_new(out / MARK, json.dumps({"spec": spec}) + "\n")
        recover_model(out)
        recover_checkpoint(out)
    except OSError as e:
        lock.release()
        raise RunError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return lock


def _write_new(path: Path, text: str) -> None:
    """``text`` into ``path`` through a file beside it and a rename: a link made at ``path``
    meanwhile is replaced, never written through."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _complete(ck: Path) -> bool:
    """A checkpoint folder is complete when its ``state.json`` (written last) holds a valid step."""
    return checkpoint_step(ck) is not None


def recover_model(out: Path) -> None:
    """Leave ``OUT/model`` as the newest complete final model that a kill left: the new copy
    (``.model.tmp*``, complete before ``OUT/model`` moved aside) or the old one (``.model.old``)
    when ``OUT/model`` is missing, and remove the others."""
    dest, old = out / "model", out / ".model.old"
    if not dest.exists() and old.is_dir():  # killed between the two renames of io/checkpoint.py replace_dir
        done = sorted((t for t in out.glob(".model.tmp*") if t.is_dir()), key=lambda t: t.stat().st_mtime)
        os.replace(done[-1] if done else old, dest)
    for left in [*out.glob(".model.tmp*"), old]:  # unfinished, or the copy already replaced
        if left.exists():
            shutil.rmtree(left, ignore_errors=True)


def recover_checkpoint(out: Path) -> None:
    """Leave ``OUT/checkpoint`` as the newest complete checkpoint that a kill left anywhere
    (``checkpoint``, a finished ``.checkpoint.tmp*`` or ``.checkpoint.old``) and remove the others."""
    dest, old = out / "checkpoint", out / ".checkpoint.old"
    tmps = sorted(out.glob(".checkpoint.tmp*"))
    if not _complete(dest):
        # killed after the old copy moved aside: the finished new copy, else the old one
        done = [t for t in tmps if _complete(t)]
        best = max(done, key=checkpoint_step, default=None)
        if best is None and _complete(old):
            best = old
        if best is None:  # nothing of the last save survived: the newest kept OUT/checkpoint-<step>
            kept = [p for p in out.glob("checkpoint-*") if own_checkpoint_step(p) is not None]
            best = max(kept, key=own_checkpoint_step, default=None)
        if best is not None:
            if dest.exists():
                shutil.rmtree(dest)  # an unfinished copy (never a link: claim_out refused those)
            os.replace(best, dest)
    for leftover in [*out.glob(".checkpoint.tmp*"), old]:
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
