"""Which examples a run uses, by index: the held-out split and the harmful mix.

Selections are drawn on indices with ``random.Random``; ``Random.sample`` and ``shuffle``
depend only on the lengths, so picking indices gives exactly the examples (and the order)
that sampling the example lists themselves gave before sap-ds tokenized in Arrow tables.
"""
from __future__ import annotations

import random

from sap_ds.data.sources import DataError


def eval_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(eval indices, train indices): a shuffled ``fraction`` held out (at least one)."""
    shuffled = random.Random(seed + 1).sample(range(n), n)
    n_eval = max(1, int(n * fraction))
    if n_eval >= n:
        raise DataError(
            f"data.eval_fraction={fraction} of {n} examples leaves none to train on; "
            "add training rows, lower data.eval_fraction or give data.eval"
        )
    return shuffled[:n_eval], shuffled[n_eval:]


def mix_indices(n_task: int, n_available: int, ratio: float, seed: int, what: str = "data") -> list[tuple[int, int]]:
    """(0, task index) and (1, harmful index) entries of a mix of ``n_task`` examples in
    which a share ``ratio`` is harmful, shuffled.

    This is the fine-tuning attack setting of the defence literature: the user's data
    set of size N contains round(ratio * N) harmful examples."""
    if ratio <= 0:
        return [(0, i) for i in range(n_task)]
    n_harmful = round(ratio * n_task)
    if n_harmful > n_available:
        raise DataError(
            f"{what}: harmful_ratio={ratio} of {n_task} examples needs {n_harmful} harmful examples, "
            f"the harmful file has {n_available}; lower data.harmful_ratio or use a larger file"
        )
    rng = random.Random(seed)
    mixed = [(0, i) for i in rng.sample(range(n_task), n_task - n_harmful)]
    mixed += [(1, j) for j in rng.sample(range(n_available), n_harmful)]
    rng.shuffle(mixed)
    return mixed


def mix_harmful(task: list, harmful: list, ratio: float, seed: int, what: str = "data") -> list:
    """Replace a share ``ratio`` of the task examples with harmful ones (same total)."""
    sources = (task, harmful)
    return [sources[kind][i] for kind, i in mix_indices(len(task), len(harmful), ratio, seed, what)]
