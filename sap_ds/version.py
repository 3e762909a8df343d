"""``sap-ds --version``: the version, and the commit the code is from.

The one reader of the commit: ``sap-ds --version``, the train log's first line, the bench's
and the GPU check's records and the kernel benchmark's all take it from ``commit()``.
In a git checkout the commit comes from git, dirty when the checkout is not that commit
(a tracked file modified, or an untracked file git does not ignore, such as a new module);
in an installed package, from ``_build_info.json``, which setup.py writes at build time by
the same rule; otherwise it is unknown.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sap_ds import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_INFO = PACKAGE_DIR / "_build_info.json"


@dataclass(frozen=True)
class Commit:
    """The commit the code is from: its hash and whether the code differs from it (both None
    when unknown), and where that was read. ``str()``: ``<hash>[+dirty]`` or ``unknown``."""

    hash: Optional[str]
    dirty: Optional[bool]
    source: str

    def __str__(self) -> str:
        return self.hash + ("+dirty" if self.dirty else "") if self.hash else "unknown"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> Commit:
    """The commit of the running code: from git in a checkout, else from the build record."""
    root = PACKAGE_DIR.parent
    if (root / ".git").exists() and (root / "setup.py").is_file():  # a checkout (a worktree's .git is a file)
        head = _git(root, "rev-parse", "HEAD")
        if head:
            status = _git(root, "--no-optional-locks", "status", "--porcelain")  # read-only: takes no index lock
            return Commit(head, None if status is None else bool(status), "git checkout")
    if BUILD_INFO.is_file():
        try:
            info = json.loads(BUILD_INFO.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        if info.get("commit"):
            return Commit(info["commit"], info.get("dirty"), "recorded at build time")
    return Commit(None, None, "no git checkout and no build record")


def version_line() -> str:
    found = commit()
    return f"sap-ds {__version__} (commit {found}, {found.source})"
