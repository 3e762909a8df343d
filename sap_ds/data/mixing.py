"""Which examples a run uses, by index: the held-out split, the harmful mix and the safety
demonstrations of ``method: safety_mix``.

Selections are drawn on indices with ``random.Random``; ``Random.sample`` and ``shuffle``
depend only on the lengths, so picking indices gives exactly the examples (and the order)
that sampling the example lists themselves gave before sap-ds tokenized in Arrow tables.
"""
from __future__ import annotations

import random

from sap_ds.errors import DataError

# The safety demonstrations' draws, apart from the eval split (seed + 1), the harmful mix
# (seed), SAP's safety batches (seed + 7) and Lisa's alignment batches (seed + 11): which
# pairs (seed + 13) and where they go in the training table (seed + 14).
SAFETY_MIX_SEED_OFFSET = 13


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


def safety_mix_indices(n_task: int, n_pairs: int, ratio: float, seed: int) -> list[int]:
    """The data.safety pairs that become refusal demonstrations: round(ratio * n_task)
    distinct ones, in the order drawn. SafeInstr adds them to the user's data (nothing is
    replaced), so n_task counts the task examples, harmful ones included."""
    n = round(ratio * n_task)
    if n == 0:  # a safety_mix run without a demonstration would be SFT under another name
        raise DataError(f"safety_mix.ratio={ratio} of {n_task} task examples rounds to 0 refusal demonstrations; "
                        f"raise safety_mix.ratio (above {0.5 / n_task:.4g} here)")
    if n > n_pairs:
        raise DataError(
            f"safety_mix.ratio={ratio} of {n_task} task examples needs {n} refusal demonstrations, but data.safety "
            f"has {n_pairs} pairs; lower safety_mix.ratio (at most {n_pairs / n_task:.4g} here) or add pairs to data.safety"
        )
    return random.Random(seed + SAFETY_MIX_SEED_OFFSET).sample(range(n_pairs), n)


def safety_mix_order(n_task: int, n_added: int, seed: int) -> list[int]:
    """The training table's order once ``n_added`` demonstrations (rows n_task, n_task + 1,
    ...) follow the ``n_task`` task rows: all of them shuffled together, so that an unshuffled
    run (data.shuffle false) meets them spread through its steps too."""
    order = list(range(n_task + n_added))
    random.Random(seed + SAFETY_MIX_SEED_OFFSET + 1).shuffle(order)
    return order
