"""Packing: several training examples in one sequence of at most ``max_length`` tokens.

Examples are packed once, when the data is prepared (first-fit decreasing: longest
first, each into the first pack with room; ties in a seeded order), and a pack is then
the unit of training: ``train.micro_batch_size`` packs per micro-batch, batches and epochs
counted in packs. Position ids restart at 0 for each example, and attention never crosses
an example boundary:

- ``position_ids``: no attention mask is passed; transformers' masking utilities find the
  examples from the restarting position ids and build a block-diagonal causal mask (sdpa,
  eager, flex). Checked by tests/test_packing.py against the examples run unpacked.
- ``flash_varlen``: flash-attention 2/3 reads the example boundaries from the position
  ids (varlen kernels), but only for a batch of one row, so a micro-batch's packs are laid
  end to end into one row for the forward.
- ``block_mask``: a model whose code does not read packed position ids but takes a 4-D
  attention mask gets an explicit block-diagonal causal mask (additive, model dtype).
- anything else: an error before the first step (``packing_attention``).

The loss of a packed micro-batch is the token mean over its response tokens, exactly the
loss of the same examples collated unpacked (each example's first label is masked so the
last token of one example never learns to predict the next example).
"""
from __future__ import annotations

import inspect
import random
import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch

from sap_ds.data.tokenize import IGNORE_INDEX, Tokenized

FLASH = ("flash_attention_2", "flash_attention_3")
MASK_READING = ("sdpa", "eager", "flex_attention")


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


def block_mask(sequence_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: causal, and only within one example (padding: among itself)."""
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    width = sequence_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = (same & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packing_attention(model) -> str:
    """How ``model`` keeps packed examples apart: 'position_ids', 'flash_varlen' or
    'block_mask' (module docstring); a ModelError when it can do none of them."""
    from transformers import masking_utils

    from sap_ds.errors import ModelError
    from sap_ds.sap.probe import _unwrap

    base = _unwrap(model)
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None)
    params = inspect.signature(base.forward).parameters
    takes_positions = "position_ids" in params and "attention_mask" in params
    module = sys.modules.get(type(base).__module__)
    if impl in FLASH and takes_positions:
        return "flash_varlen"
    if impl in MASK_READING and takes_positions and getattr(module, "create_causal_mask", None) is masking_utils.create_causal_mask:
        return "position_ids"
    if impl in ("sdpa", "eager") and takes_positions:
        return "block_mask"
    raise ModelError(
        f"data.packing: {type(base).__name__} (attention '{impl}') can keep packed examples apart neither by position ids "
        "(transformers' masking utilities, flash-attention varlen) nor by a 4-D block mask (sdpa/eager with position_ids "
        "and attention_mask arguments); set data.packing=false, or model.attn_implementation to sdpa or flash_attention_2"
    )


def packed_forward(model, batch: dict, mode: str):
    """The model's output on a packed batch, attention kept within each example."""
    ids, positions = batch["input_ids"], batch["position_ids"]
    if mode == "flash_varlen":
        rows, width = ids.shape
        out = model(input_ids=ids.reshape(1, -1), position_ids=positions.reshape(1, -1), use_cache=False)
        return out.logits.reshape(rows, width, -1)
    mask = None
    if mode == "block_mask":
        from sap_ds.sap.probe import _unwrap

        mask = block_mask(batch["sequence_ids"], _unwrap(model).dtype)
    return model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
