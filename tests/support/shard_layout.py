"""Shard layouts for the segment tests, in ``Zero3Shards.param_slices()`` form, without an engine."""
from __future__ import annotations


def param_slices(spec):
    """``spec``: per group, a list of (valid, padding_after) per tensor. Returns (slices,
    group_sizes): slices as (group, param, offset, valid), param None."""
    slices, group_sizes = [], []
    for gi, group in enumerate(spec):
        offset = 0
        for valid, pad in group:
            slices.append((gi, None, offset, valid))
            offset += valid + pad
        group_sizes.append(offset)
    return slices, group_sizes
