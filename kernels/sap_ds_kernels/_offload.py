"""Chunking and pinned host-to-device writes for the PyTorch twins under CPU offload.

With ZeRO-Offload the fp32 master (and the SAP direction beside it) live in CPU RAM and the
working shard the engine computes with on the GPU; the twins then compute on the CPU and
write across. Done in one pass over a DeepSpeed sub-group (up to ``sub_group_size`` = 1e9
elements) that meant ~16 B per element of CPU temporaries, and a copy from pageable memory
(the driver stages it through its own small pinned buffer, synchronously). The twins walk
the shard in chunks of ``OFFLOAD_CHUNK`` elements instead, so their temporaries are a fixed
~100 MB (``sap_ds/cost/plan.py`` counts them), and a chunk bound for a CUDA tensor is cast
into page-locked memory and copied with ``non_blocking=True``: PyTorch's pinned-memory
cache keeps the buffer until its copy has run, so the next chunk's CPU work overlaps it.
"""
import torch

OFFLOAD_CHUNK = 2**22  # elements; sap_ds/cost/plan.py's OFFLOAD_TWIN_CHUNK is the same number


def chunk_ranges(numel: int, chunk: int):
    """``(start, length)`` of consecutive chunks of at most ``chunk`` elements."""
    for start in range(0, numel, chunk):
        yield start, min(chunk, numel - start)


def write_cast(out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[:] = values`` cast to ``out.dtype`` (round to nearest even, as ``Tensor.to``);
    returns the cast values on ``values``' device for statistics to read (``out`` itself when
    both share a device). CPU values bound for a CUDA ``out`` go through a pinned buffer."""
    if out.device == values.device:
        out.copy_(values)
        return out
    staged = torch.empty(values.shape, dtype=out.dtype, pin_memory=out.is_cuda and values.device.type == "cpu")
    staged.copy_(values)
    out.copy_(staged, non_blocking=staged.is_pinned())
    return staged
