"""Per-tensor norms and scaling over flat shard buffers (sap_ds/parallel/segments.py) against a
tensor-by-tensor loop: padding between tensors, tensors with no local elements, pieces
cut at chunk boundaries, several groups."""
from __future__ import annotations

import torch

from sap_ds.parallel.segments import Segments
from tests.support.shard_layout import param_slices


def _layout():
    """Two groups; (group, param, offset, valid) with padding after some tensors and a
    tensor that has no elements on this rank."""
    return param_slices([[(7, 2), (0, 3), (12, 0), (5, 1)], [(30, 0), (1, 4)]])  # (valid, padding) per tensor


def _buffers(group_sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for n in group_sizes]


def test_segment_sums_and_scaling_equal_a_per_tensor_loop():
    slices, group_sizes = _layout()
    a, b = _buffers(group_sizes, 0), _buffers(group_sizes, 1)
    factors = torch.arange(1, len(slices) + 1, dtype=torch.float32)
    for chunk in (5, 7, 1 << 20):  # pieces cut mid-tensor, at odd places, and not at all
        seg = Segments(slices, group_sizes, "cpu", chunk=chunk)
        sums = seg.sumsq(a, b)
        assert sums.shape == (len(slices) + 1, 2) and sums.dtype == torch.float64
        for i, (gi, _, offset, valid) in enumerate(slices):
            want_a = a[gi].narrow(0, offset, valid).double().square().sum()
            want_b = b[gi].narrow(0, offset, valid).double().square().sum()
            torch.testing.assert_close(sums[i], torch.stack([want_a, want_b]), rtol=1e-12, atol=0)
        padding = sum(x.double().square().sum() for x in a) - sums[:-1, 0].sum()
        torch.testing.assert_close(sums[-1, 0], padding, rtol=1e-9, atol=1e-12)

        scaled = [x.clone() for x in a]
        seg.scale_(scaled, torch.cat([factors, torch.zeros(1)]))
        for i, (gi, _, offset, valid) in enumerate(slices):
            assert torch.equal(scaled[gi].narrow(0, offset, valid), a[gi].narrow(0, offset, valid) * factors[i])
        for gi, n in enumerate(group_sizes):  # padding ends up zero
            real = torch.zeros(n, dtype=torch.bool)
            for g, _, offset, valid in slices:
                if g == gi:
                    real[offset:offset + valid] = True
            assert scaled[gi][~real].abs().max() == 0


def test_launches_do_not_grow_with_the_number_of_tensors():
    """One plan per chunk: 1000 small tensors in one group (less than a block) are one
    chunk whose pieces are all in the tail."""
    slices = [(0, None, 3 * i, 2) for i in range(1000)]  # 2 real + 1 padding each
    seg = Segments(slices, [3000], "cpu")
    assert len(seg.chunks[0]) == 1 and seg.chunks[0][0].piece_ids.numel() == 2000
