"""Packing: several training examples in one sequence of at most ``max_length`` tokens.

Examples are packed once, when the data is prepared (first-fit decreasing: longest
first, each into the first pack with room; ties in a seeded order), and a pack is then
the unit of training: ``train.micro_batch_size`` packs per micro-batch, batches and epochs
counted in packs. Position ids restart at 0 for each example (``collate_packed``), and
``sequence_ids`` number a row's examples; the model's forward on such a batch keeps
attention within each example (``sap_ds/model/packed_forward.py``).

The loss of a packed micro-batch is the token mean over its response tokens, exactly the
loss of the same examples collated unpacked (each example's first label is masked so the
last token of one example never learns to predict the next example).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from sap_ds.data.tokenize import IGNORE_INDEX, Tokenized


@dataclass
class Packed(Tokenized):
    """Examples laid end to end; ``members`` are the examples themselves (the reference
    and the tests run them unpacked)."""

    position_ids: list[int] = field(default_factory=list)
    members: list[Tokenized] = field(default_factory=list)


def pack(members: Sequence[Tokenized]) -> Packed:
    ids, labels, positions = [], [], []
    for m in members:
        ids += m.input_ids
        labels += [IGNORE_INDEX] + m.labels[1:]  # unpacked, a first label is never a target either
        positions += range(len(m.input_ids))
    return Packed(ids, labels, positions, list(members))


def first_fit_decreasing(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into packs of total length <= ``capacity``.

    Longest first, each into the first (oldest) pack with room; equal lengths in an order
    drawn from ``seed``. A segment tree over the packs' free space finds the first pack with
    room in O(log n), so 100k examples pack in about a second."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example is longer than the pack capacity {capacity}")
    n = len(lengths)
    tiebreak = list(range(n))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(n), key=lambda i: (-lengths[i], tiebreak[i]))
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [0] * (2 * size)  # leaves: free space of pack j (unopened packs: all of it)
    for j in range(n):
        free[size + j] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    packs: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:  # leftmost leaf with enough room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        j = node - size
        if j == len(packs):
            packs.append([])
        packs[j].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return packs


def collate_packed(items: Sequence[Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded packs. No attention mask: ``position_ids`` restart per example (the
    padding is a sequence of its own, after every real token) and ``sequence_ids`` number
    each row's examples (-1 on padding), for a block mask and for counting tokens."""
    width = max(len(p.input_ids) for p in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width, dtype=torch.long).repeat(len(items), 1)
    sequences = torch.full((len(items), width), -1, dtype=torch.long)
    for r, p in enumerate(items):
        n = len(p.input_ids)
        ids[r, :n] = torch.tensor(p.input_ids)
        labels[r, :n] = torch.tensor(p.labels)
        positions[r, :n] = torch.tensor(p.position_ids)
        positions[r, n:] = torch.arange(width - n)
        sequences[r, :n] = torch.repeat_interleave(torch.arange(len(p.members)),
                                                   torch.tensor([len(m.input_ids) for m in p.members]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "sequence_ids": sequences}


def is_packed(batch: dict) -> bool:
    """Whether ``batch`` holds packs (``collate_packed``: position ids, no padding mask)."""
    return "position_ids" in batch


def sequence_lengths(batch: dict) -> list[int]:
    """Real (non-padding) token count of every example in a batch, packed or not."""
    if not is_packed(batch):
        return [int(n) for n in batch["attention_mask"].sum(1).tolist()]
    out = []
    for row in batch["sequence_ids"]:
        real = row[row >= 0]
        out += torch.bincount(real).tolist() if real.numel() else []
    return out
