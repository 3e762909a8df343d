"""The repository the tests run in, and shipped data paths made absolute under it."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def with_repo_paths(tree):
    """``tree`` with every ``data/...`` string made absolute under the repository.

    A config *file* names its paths relative to its own folder; tests that write an eval
    config into a tmp folder and point it at the shipped data use this.
    """
    if isinstance(tree, dict):
        return {k: with_repo_paths(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [with_repo_paths(v) for v in tree]
    if isinstance(tree, str) and tree.startswith("data/"):
        return str(REPO / tree)
    return tree
