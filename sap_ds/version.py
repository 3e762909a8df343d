"""``sap-ds --version``: the version, and the commit the code is from.

In a git checkout the commit comes from git (with ``+dirty`` when tracked files are
modified); in an installed package, from ``_build_info.json``, which setup.py writes at
build time; otherwise 'unknown'.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sap_ds import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_INFO = PACKAGE_DIR / "_build_info.json"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> tuple[str, str]:
    """(commit, where it came from)."""
    root = PACKAGE_DIR.parent
    if (root / ".git").exists() and (root / "setup.py").is_file():  # a checkout (a worktree's .git is a file)
        head = _git(root, "rev-parse", "HEAD")
        if head:
            dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
            return head + ("+dirty" if dirty else ""), "git checkout"
    if BUILD_INFO.is_file():
        try:
            info = json.loads(BUILD_INFO.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        if info.get("commit"):
            return info["commit"] + ("+dirty" if info.get("dirty") else ""), "recorded at build time"
    return "unknown", "no git checkout and no build record"


def version_line() -> str:
    head, source = commit()
    return f"sap-ds {__version__} (commit {head}, {source})"
