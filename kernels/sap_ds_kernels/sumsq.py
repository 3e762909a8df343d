"""Squared L2 norms of two flat shards in one read: ``[sum(a**2), sum(b**2)]`` in fp32.

SAP needs the norms of the gradient shard and the master shard together; reading both
in one pass halves the launches and keeps the reduction in fp32 whatever the storage
dtype (fp32, bf16 or fp16).
"""
import functools

import torch

from ._checks import FLOAT_DTYPES, check_same_device, check_same_numel, check_tensor
from ._triton import checked_kernel, import_triton, launch_options


def _check(a, b) -> None:
    check_tensor("a", a, FLOAT_DTYPES)
    check_tensor("b", b, FLOAT_DTYPES)
    check_same_numel("a", a, "b", b)
    check_same_device(("a", a), ("b", b))


def sumsq_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PyTorch twin and test reference: fp32 tensor ``[sum(a.float()**2), sum(b.float()**2)]``."""
    _check(a, b)
    return torch.stack([a.float().pow(2).sum(), b.float().pow(2).sum()])


def sumsq_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One launch; each block writes its two fp32 partial sums, then a torch.sum adds them.

    Block partials rather than atomics: the result is bit-identical from run to run
    (fp32 atomic adds land in arbitrary order on a GPU, so the last bits would vary and
    so would a SAP run), and the second pass reads only 8 bytes per block (0.02% of the
    traffic at 4096-element blocks).
    """
    _check(a, b)
    n = a.numel()
    if n == 0:
        return torch.zeros(2, dtype=torch.float32, device=a.device)
    opts = launch_options(a.device)
    blocks = -(-n // opts["BLOCK"])
    partials = torch.empty(2, blocks, dtype=torch.float32, device=a.device)
    kernel = checked_kernel(_kernel(), a.device)
    kernel[(blocks,)](a.view(-1), b.view(-1), partials, n, blocks, **opts)
    return partials.sum(dim=1)


@functools.cache
def _kernel():
    """Build the jit kernel on first use (see sap_ds_kernels._triton for why not at import).

    Its free names are bound as module globals: the interpreter resolves a kernel's
    names in its module's globals only, never in closures.
    """
    global tl
    triton, tl = import_triton()

    @triton.jit
    def sumsq_kernel(a_ptr, b_ptr, partials_ptr, n, blocks, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # Cast right after the load: the interpreter's bf16 arithmetic is wrong.
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(partials_ptr + pid, tl.sum(a * a, axis=0))
        tl.store(partials_ptr + blocks + pid, tl.sum(b * b, axis=0))

    return sumsq_kernel
