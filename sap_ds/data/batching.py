"""Batches and the order of examples: padded (or packed) tensors, and which examples make
up each optimizer step, as a pure function of (seed, step)."""
from __future__ import annotations

from typing import Sequence

import torch

from sap_ds.data.packing import Packed, collate_packed
from sap_ds.data.tokenize import IGNORE_INDEX, EncodedPair, Tokenized


def collate(items: Sequence[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss. Packs
    (``Packed``) give a packed batch instead (``packing.collate_packed``)."""
    if items and isinstance(items[0], Packed):
        return collate_packed(items, pad_id)
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        labels[i, :n] = torch.tensor(t.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Safe responses first, harmful second, in one padded batch of 2 * len(pairs)
    (never packed: the safety loss compares the two halves row by row)."""
    return collate([p.safe for p in pairs] + [p.harmful for p in pairs], pad_id)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so a resumed
    run sees exactly the batches an uninterrupted one would."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch_indices(n: int, global_batch: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices of the ``global_batch`` examples (packs, with packing) of optimizer step
    ``step`` (0-based), walking through epochs; the last partial batch of an epoch wraps
    into the next."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch, shuffle)
        take = min(global_batch - len(out), n - offset)
        out.extend(order[offset : offset + take])
    return out
