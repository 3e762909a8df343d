"""Per-tensor norms and scaling (sap_ds/parallel/segments.py) reduce in fixed-size blocks.

On CUDA a reduction over one long segment (``segment_reduce``) runs one thread block per
segment, so a 2^24-element chunk holding one to three tensors ran on one or two SMs. The
structural test records every reduction ``sumsq`` makes and holds each output to at most
one block of inputs. The exactness tests compare against a float64 reference summed
exactly (``math.fsum``; squares of fp32 values are exact in float64), with the bound any
summation order obeys for n non-negative terms, ``(n - 1) * eps64 * sum``, and require the
scaling to be bit-exact against ``x * factor`` tensor by tensor.
"""
from __future__ import annotations

import math

import torch

from sap_ds.parallel.segments import BLOCK, CHUNK, Segments
from tests.support.shard_layout import param_slices

EPS64 = 2.0**-53


def _awkward_spec(block):
    """Segments smaller than a block, boundaries mid-block, a tensor spanning many blocks,
    empty tensors, padding runs, a group ending mid-block (chunk tail), a group smaller than
    one block, and a group that is an exact number of blocks."""
    return [
        [(3, 0), (block - 5, 2), (0, 0), (7 * block + 11, 1), (1, block + 3), (2 * block, 0), (5, 0)],
        [(block // 3, 0), (0, 4)],
        [(block, 0), (block, 0)],
        [(10 * block + 1, 0)],
    ]


class _ReductionRecorder:
    """Wraps ``torch.sum`` and ``torch.segment_reduce`` and records, per call, the largest
    number of inputs that any single output sums; and ``torch.repeat_interleave`` (one CUDA
    warp per repeated entry), the largest number of elements one entry fills."""

    def __init__(self, monkeypatch):
        self.widths: list[tuple[str, int]] = []
        sum_, segment_reduce, repeat_interleave = torch.sum, torch.segment_reduce, torch.repeat_interleave

        def recording_repeat_interleave(values, repeats, *args, **kwargs):
            self.widths.append(("repeat_interleave", int(repeats.max()) if repeats.numel() else 0))
            return repeat_interleave(values, repeats, *args, **kwargs)

        def recording_sum(x, *args, **kwargs):
            dim = kwargs.get("dim", args[0] if args else None)
            width = x.numel() if dim is None else x.shape[dim]
            self.widths.append(("sum", width))
            return sum_(x, *args, **kwargs)

        def recording_segment_reduce(data, reduce, *args, lengths=None, **kwargs):
            self.widths.append(("segment_reduce", int(lengths.max()) if lengths.numel() else 0))
            return segment_reduce(data, reduce, *args, lengths=lengths, **kwargs)

        monkeypatch.setattr(torch, "sum", recording_sum)
        monkeypatch.setattr(torch, "segment_reduce", recording_segment_reduce)
        monkeypatch.setattr(torch, "repeat_interleave", recording_repeat_interleave)


def test_no_reduction_spans_more_than_one_block(monkeypatch):
    """One group of CHUNK + 5 elements with a tensor of most of a chunk (the case that
    serialised on CUDA): every reduction output in ``sumsq`` sums at most BLOCK inputs, no
    repeated entry in ``scale_`` fills more than BLOCK elements, and the results are still
    the per-tensor sum and product."""
    slices, group_sizes = param_slices([[(7, 1), (CHUNK - 100, 3), (95, 0)]])
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(group_sizes[0], generator=g)]
    b = [torch.randn(group_sizes[0], generator=g)]
    seg = Segments(slices, group_sizes, "cpu")
    scaled = [a[0].clone()]
    factors = torch.tensor([2.0, 0.5, -3.0, 0.0])
    recorder = _ReductionRecorder(monkeypatch)
    sums = seg.sumsq(a, b)
    seg.scale_(scaled, factors)
    monkeypatch.undo()
    assert recorder.widths, "no recorded reduction"
    too_wide = [(op, w) for op, w in recorder.widths if w > BLOCK]
    assert not too_wide, f"reductions wider than one block ({BLOCK}): {too_wide}"
    big = a[0].narrow(0, 8, CHUNK - 100).double().square().sum()
    assert abs(sums[1, 0].item() - big.item()) <= CHUNK * EPS64 * big.item()
    assert torch.equal(scaled[0].narrow(0, 8, CHUNK - 100), a[0].narrow(0, 8, CHUNK - 100) * 0.5)


def test_block_plan_covers_each_chunk_with_whole_blocks_and_split_rows():
    """The plan itself: whole rows are one tensor each, every other row is split into
    pieces of at most a block, and rows + pieces account for every element once."""
    block, chunk = 16, 256
    slices, group_sizes = param_slices(_awkward_spec(block))
    seg = Segments(slices, group_sizes, "cpu", chunk=chunk, block=block)
    for chunks, size in zip(seg.chunks, group_sizes):
        assert sum(c.length for c in chunks) == size
        for c in chunks:
            assert c.length <= chunk and c.piece_lengths.numel() == c.piece_ids.numel()
            assert all(0 < n <= block for n in c.piece_lengths.tolist())
            whole = c.full_rows - c.split_rows.numel()
            assert whole * block + int(c.piece_lengths.sum()) == c.length
            assert int(c.units_per_run.max()) <= block  # the second level is one block too


def _fsum_squares(x: torch.Tensor) -> float:
    return math.fsum(v * v for v in x.double().tolist())


def test_sums_and_scaling_match_an_exact_reference_on_awkward_layouts():
    for block, chunk in ((16, 256), (16, 48), (BLOCK, CHUNK)):
        slices, group_sizes = param_slices(_awkward_spec(block))
        g = torch.Generator().manual_seed(block + chunk)
        a = [torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 4, (n,), generator=g) for n in group_sizes]
        b = [torch.randn(n, generator=g) for n in group_sizes]
        seg = Segments(slices, group_sizes, "cpu", chunk=chunk, block=block)
        sums = seg.sumsq(a, b)
        assert sums.shape == (len(slices) + 1, 2) and sums.dtype == torch.float64
        for i, (gi, _, offset, valid) in enumerate(slices):
            for col, x in ((0, a), (1, b)):
                want = _fsum_squares(x[gi].narrow(0, offset, valid))
                bound = max(valid - 1, 0) * EPS64 * want
                assert abs(sums[i, col].item() - want) <= bound, (block, chunk, i, col, sums[i, col].item(), want)

        factors = torch.linspace(-2.0, 3.0, len(slices))
        scaled = [x.clone() for x in a]
        seg.scale_(scaled, torch.cat([factors, torch.zeros(1)]))
        for gi, n in enumerate(group_sizes):
            want = torch.zeros(n)  # padding ends up zero
            for i, (g_, _, offset, valid) in enumerate(slices):
                if g_ == gi:
                    want[offset:offset + valid] = a[gi][offset:offset + valid] * factors[i]
            assert torch.equal(scaled[gi], want), (block, chunk, gi)


def test_block_must_divide_the_chunk():
    import pytest

    with pytest.raises(ValueError, match="multiple of block"):
        Segments([(0, None, 0, 10)], [10], "cpu", chunk=100, block=16)
