"""Per-parameter segments of the flat shard buffers: norms and scaling in a few launches.

``perturb_norm: per_tensor`` needs, for every trainable tensor t, ``sum g_t^2`` and
``sum W_t^2`` over all ranks, then ``g_t *= rho * ||W_t|| / ||g_t||``. Done tensor by
tensor that is several small kernels per parameter (thousands for a 70B model, each one a
launch and, with a per-tensor all-reduce, a collective). Here each flat group buffer is
planned once, at construction, and every call is a few launches per chunk of ``CHUNK``
elements (which bound the float64 temporaries), however many tensors there are.

Block-parallel by construction. A chunk holds one to three tensors of a large model; a
reduction per tensor (``segment_reduce``) runs one CUDA thread block per segment, so a
chunk would run on one or two SMs. Instead each chunk is viewed as rows of ``BLOCK``
elements. A row inside one tensor ("whole") is summed by one regular row reduction (all
rows in parallel) and scaled by a per-row factor broadcast over the row. The few rows
that straddle a tensor boundary, and a group's last partial row ("split" rows), are cut
into pieces of at most ``BLOCK`` elements, summed by ``segment_reduce`` over those short
pieces and scaled by a per-element factor. A second level adds each tensor's row and
piece sums in buffer order (``segment_reduce`` over at most ``CHUNK / BLOCK = BLOCK``
values per tensor), so no reduction output sums more than one block of inputs and the
result does not depend on thread scheduling. One ``index_add_`` per chunk puts the
per-tensor sums into a ``[tensors, 2]`` table (float64, so a 100M-element tensor is
summed as precisely as a small one), and one all-reduce serves all tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 2**24  # elements per planned chunk: float64 temporaries of 128 MiB at most
BLOCK = 2**12  # elements per row; CHUNK / BLOCK == BLOCK keeps the second level one block wide


@dataclass
class _Chunk:
    """The plan of ``length`` elements from ``start`` of one group buffer."""

    start: int
    length: int
    full_rows: int  # length // block: rows of the 2-D view; a partial last row is the tail
    row_ids: torch.Tensor  # tensor index of each full row (a split row's entry is unused)
    split_rows: torch.Tensor  # full rows that straddle a boundary, ascending
    piece_ids: torch.Tensor  # tensor index of each piece of the split rows, then of the tail
    piece_lengths: torch.Tensor  # elements of each piece (at most a block)
    tail_pieces: int  # how many of the pieces lie in the tail (the last ones)
    unit_sources: torch.Tensor  # per unit (a whole row or a piece), in buffer order: its index
                                # into the row sums followed by the piece sums
    units_per_run: torch.Tensor  # units of each run (a tensor's, or padding's, elements in the chunk)
    run_ids: torch.Tensor  # tensor index of each run


class Segments:
    """The block plan of every group buffer. ``slices`` is ``Zero3Shards.param_slices()``:
    (group, parameter, offset, valid length); tensor i is the i-th slice."""

    def __init__(self, slices, group_sizes: list[int], device, chunk: int = CHUNK, block: int = BLOCK):
        block = min(block, chunk)
        if chunk % block:
            raise ValueError(f"chunk ({chunk}) must be a multiple of block ({block})")
        self.count = len(slices)
        self.device = torch.device(device)
        self.block = block
        self.padding_id = self.count  # one extra row collects the padding (always zero)
        pieces: list[list[tuple[int, int]]] = [[] for _ in group_sizes]
        cursor = [0] * len(group_sizes)
        for i, (gi, _, offset, valid) in enumerate(slices):
            if offset > cursor[gi]:
                pieces[gi].append((self.padding_id, offset - cursor[gi]))
            if valid:
                pieces[gi].append((i, valid))
            cursor[gi] = offset + valid
        for gi, size in enumerate(group_sizes):
            if size > cursor[gi]:
                pieces[gi].append((self.padding_id, size - cursor[gi]))
        self.chunks = [[self._plan(run, start) for run, start in self._cut(group, chunk)] for group in pieces]

    @staticmethod
    def _cut(pieces, chunk: int):
        """``(runs, start)`` per chunk: the (tensor, offset in chunk, length) runs of each
        ``chunk`` consecutive elements of a group."""
        runs, start, used = [], 0, 0
        for seg, length in pieces:
            while length:
                take = min(length, chunk - used)
                runs.append((seg, used, take))
                used += take
                length -= take
                if used == chunk:
                    yield runs, start
                    runs, start, used = [], start + used, 0
        if used:
            yield runs, start

    def _plan(self, runs, start: int) -> _Chunk:
        block = self.block
        length = runs[-1][1] + runs[-1][2]
        full_rows, tail = divmod(length, block)
        split = sorted({offset // block for _, offset, _ in runs if offset % block and offset // block < full_rows})
        is_split = set(split)
        if tail:
            is_split.add(full_rows)  # the tail row: its pieces come after the split rows'
        row_ids = [self.padding_id] * full_rows
        piece_ids, piece_lengths, tail_pieces = [], [], 0
        unit_sources, units_per_run, run_ids = [], [], []
        split_piece_units = []  # per piece: its unit position, to number pieces in row order
        for seg, offset, take in runs:
            end = offset + take
            first, last = offset // block, (end - 1) // block
            units_before = len(unit_sources)
            for row in (first, last) if last > first else (first,):
                if row in is_split:
                    piece_ids.append(seg)
                    piece_lengths.append(min(end, (row + 1) * block) - max(offset, row * block))
                    tail_pieces += row == full_rows
                    split_piece_units.append(len(unit_sources))
                    unit_sources.append(None)  # numbered below, once every piece is known
                else:
                    row_ids[row] = seg
                    unit_sources.append(row)
                if row == first and last > first + 1:  # the rows between lie inside the run
                    row_ids[first + 1:last] = [seg] * (last - first - 1)
                    unit_sources.extend(range(first + 1, last))
            units_per_run.append(len(unit_sources) - units_before)
            run_ids.append(seg)
        # pieces were numbered run by run; rows and runs ascend together, so this is also
        # row order, the order in which the split rows and the tail are laid out
        for n, position in enumerate(split_piece_units):
            unit_sources[position] = full_rows + n

        def as_tensor(values):
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        return _Chunk(start, length, full_rows, as_tensor(row_ids), as_tensor(split), as_tensor(piece_ids),
                      as_tensor(piece_lengths), tail_pieces, as_tensor(unit_sources), as_tensor(units_per_run),
                      as_tensor(run_ids))

    def sumsq(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """float64 ``[tensors + 1, 2]``: row i is ``[sum a_i^2, sum b_i^2]`` on this rank;
        the last row holds the padding's sums."""
        out = torch.zeros(self.count + 1, 2, dtype=torch.float64, device=self.device)
        for chunks, x, y in zip(self.chunks, a, b):
            for c in chunks:
                for col, buf in ((0, x), (1, y)):
                    part = buf.narrow(0, c.start, c.length).to(torch.float64, copy=True).square_()
                    out[:, col].index_add_(0, c.run_ids, self._chunk_sums(part, c))
        return out

    def _chunk_sums(self, part: torch.Tensor, c: _Chunk) -> torch.Tensor:
        """Sum of ``part`` over each run of ``c``: row sums and piece sums (each at most a
        block), then per run in buffer order. ``segment_reduce`` runs ``unsafe``: its checks
        that the lengths are non-negative and add up read two values back to the host (a
        device synchronisation per call); the plan guarantees both by construction."""
        block = self.block
        rows = part[:c.full_rows * block].view(c.full_rows, block)
        levels = [torch.sum(rows, dim=1)]
        row_pieces = c.piece_lengths.numel() - c.tail_pieces
        if c.split_rows.numel():
            split = rows.index_select(0, c.split_rows).view(-1)
            levels.append(torch.segment_reduce(split, "sum", lengths=c.piece_lengths[:row_pieces], unsafe=True))
        if c.tail_pieces:
            tail = part[c.full_rows * block:]
            levels.append(torch.segment_reduce(tail, "sum", lengths=c.piece_lengths[row_pieces:], unsafe=True))
        units = torch.cat(levels).index_select(0, c.unit_sources)
        return torch.segment_reduce(units, "sum", lengths=c.units_per_run, unsafe=True)

    @torch.no_grad()
    def scale_(self, buffers: list[torch.Tensor], factors: torch.Tensor) -> None:
        """``buffer[tensor i] *= factors[i]`` in place; ``factors`` has ``tensors + 1``
        entries (the last, for padding, should be 0). Whole rows take one factor each;
        split rows and the tail are multiplied element by element from a copy taken first."""
        block = self.block
        for chunks, buf in zip(self.chunks, buffers):
            dtype_factors = factors.to(buf.dtype)
            for c in chunks:
                part = buf.narrow(0, c.start, c.length)
                rows = part[:c.full_rows * block].view(c.full_rows, block)
                split = rows.index_select(0, c.split_rows) if c.split_rows.numel() else None
                rows.mul_(dtype_factors[c.row_ids].unsqueeze(1))
                if not c.piece_ids.numel():
                    continue
                split_elements = c.split_rows.numel() * block
                per_element = torch.repeat_interleave(dtype_factors[c.piece_ids], c.piece_lengths,
                                                      output_size=split_elements + c.length - c.full_rows * block)
                if split is not None:
                    rows.index_copy_(0, c.split_rows, split.mul_(per_element[:split_elements].view(-1, block)))
                if c.tail_pieces:
                    part[c.full_rows * block:].mul_(per_element[split_elements:])
