"""Per-parameter segments of the flat shard buffers: norms and scaling in a few launches.

``perturb_norm: per_tensor`` needs, for every trainable tensor t, ``sum g_t^2`` and
``sum W_t^2`` over all ranks, then ``g_t *= rho * ||W_t|| / ||g_t||``. Done tensor by
tensor that is several small kernels per parameter (thousands for a 70B model, each one a
launch and, with a per-tensor all-reduce, a collective). Here each flat group buffer is
cut once, at construction, into pieces (one per parameter's real elements, one per run
of padding, and cuts every ``chunk`` elements so that temporaries stay bounded), and the
sums are ``torch.segment_reduce`` over those pieces (float64, so a 100M-element tensor
is summed as precisely as a small one), ``index_add_`` into one ``[tensors, 2]`` table,
and one all-reduce for all tensors. Scaling is one ``repeat_interleave`` of the factors
and one multiply per chunk. Launches grow with the shard's size (one set per chunk), not
with the number of tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 2**24  # elements per piece table: float64 temporaries of 128 MiB at most


@dataclass
class _Chunk:
    start: int
    length: int
    ids: torch.Tensor  # tensor index of each piece (``padding_id`` for padding)
    lengths: torch.Tensor  # elements of each piece


class Segments:
    """The pieces of every group buffer. ``slices`` is ``Zero3Shards.param_slices()``:
    (group, parameter, offset, valid length); tensor i is the i-th slice."""

    def __init__(self, slices, group_sizes: list[int], device, chunk: int = CHUNK):
        self.count = len(slices)
        self.device = torch.device(device)
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
        self.chunks = [self._cut(group, device, chunk) for group in pieces]

    @staticmethod
    def _cut(pieces, device, chunk: int) -> list[_Chunk]:
        out, ids, lengths, start, used = [], [], [], 0, 0
        for seg, length in pieces:
            while length:
                take = min(length, chunk - used)
                ids.append(seg)
                lengths.append(take)
                used += take
                length -= take
                if used == chunk:
                    out.append(_Chunk(start, used, torch.tensor(ids, device=device), torch.tensor(lengths, device=device)))
                    start, used, ids, lengths = start + used, 0, [], []
        if used:
            out.append(_Chunk(start, used, torch.tensor(ids, device=device), torch.tensor(lengths, device=device)))
        return out

    def sumsq(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """float64 ``[tensors + 1, 2]``: row i is ``[sum a_i^2, sum b_i^2]`` on this rank;
        the last row holds the padding's sums."""
        out = torch.zeros(self.count + 1, 2, dtype=torch.float64, device=self.device)
        for chunks, x, y in zip(self.chunks, a, b):
            for c in chunks:
                for col, buf in ((0, x), (1, y)):
                    part = buf.narrow(0, c.start, c.length).double().square_()
                    out[:, col].index_add_(0, c.ids, torch.segment_reduce(part, "sum", lengths=c.lengths))
        return out

    @torch.no_grad()
    def scale_(self, buffers: list[torch.Tensor], factors: torch.Tensor) -> None:
        """``buffer[tensor i] *= factors[i]`` in place; ``factors`` has ``tensors + 1``
        entries (the last, for padding, should be 0)."""
        for chunks, buf in zip(self.chunks, buffers):
            for c in chunks:
                per_element = torch.repeat_interleave(factors[c.ids].to(buf.dtype), c.lengths, output_size=c.length)
                buf.narrow(0, c.start, c.length).mul_(per_element)
