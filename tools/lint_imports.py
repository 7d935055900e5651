"""Run ``lint-imports`` (import-linter, contracts in .importlinter) on the package as Python
sees it.

grimp, which import-linter builds its graph with, reads a package from one folder, while
pyproject.toml maps ``alignspec``'s subpackages to top-level folders (``alignspec.runtime`` is
runtime/, ``alignspec.dsl`` is dsl/, ...). So this lays the package out once, as symlinks in a
temporary folder, and runs ``lint-imports`` there with that folder first on ``PYTHONPATH``.
Arguments go to ``lint-imports``; the exit status is its own (0: every contract kept).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout(dest: Path) -> None:
    """``dest/alignspec``: the package's own files, and each mapped subpackage as a symlink."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    dirs = dict(re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', section, re.M))
    pkg = dest / "alignspec"
    pkg.mkdir()
    for f in (ROOT / dirs["alignspec"]).iterdir():
        if f.name != "__pycache__":
            (pkg / f.name).symlink_to(f)
    for name, d in dirs.items():
        parts = name.split(".")
        if len(parts) == 2 and not (pkg / parts[1]).exists():  # nested ones lie inside their parent
            (pkg / parts[1]).symlink_to(ROOT / d)


def main(argv: list[str]) -> int:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        print("lint-imports not found: pip install import-linter (the dev extra)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="alignspec-imports-") as tmp:
        layout(Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        # run in the temporary folder: lint-imports puts its working folder first on sys.path
        return subprocess.call([exe, str(ROOT / ".importlinter"), "--no-cache", *argv], cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
