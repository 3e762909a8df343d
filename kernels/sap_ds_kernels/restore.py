"""Restore the low-precision shard from the fp32 master: ``out = cast(master)``.

After a perturbation this brings the engine's parameter shard back bit-exactly: ZeRO-3
keeps ``ds_tensor == master.to(bf16)`` after every step, and both versions round to
nearest even exactly as ``Tensor.to`` does.
"""
import functools

import torch

from ._checks import OUT_DTYPES, check_same_device, check_same_numel, check_tensor
from ._offload import OFFLOAD_CHUNK, chunk_ranges, write_cast
from ._triton import build_store_cast, import_triton, launch_store


def _check(master, out) -> None:
    check_tensor("master", master, (torch.float32,))
    check_tensor("out", out, OUT_DTYPES)
    check_same_numel("master", master, "out", out)


def restore_from_master_torch(master, out) -> None:
    """PyTorch twin and test reference. ``out`` may live on another device (offloaded master):
    then chunk by chunk through pinned memory (``_offload.py``), never a shard-sized cast."""
    _check(master, out)
    flat_master, flat_out = master.view(-1), out.view(-1)
    for start, length in chunk_ranges(master.numel(), OFFLOAD_CHUNK):
        write_cast(flat_out.narrow(0, start, length), flat_master.narrow(0, start, length))


def restore_from_master_triton(master, out) -> None:
    """One launch: reads master (fp32), writes ``out`` once."""
    _check(master, out)
    check_same_device(("master", master), ("out", out))
    launch_store(_kernel(), master, out)


@functools.cache
def _kernel():
    """Build the jit kernel on first use (see sap_ds_kernels._triton for why not at import).

    Its free names are bound as module globals: the interpreter resolves a kernel's
    names in its module's globals only, never in closures.
    """
    global tl, store_cast
    triton, tl = import_triton()
    store_cast = build_store_cast()

    @triton.jit
    def restore_kernel(master_ptr, out_ptr, n, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        store_cast(out_ptr, offs, tl.load(master_ptr + offs, mask=mask, other=0.0), mask, OUT_BF16)

    return restore_kernel
