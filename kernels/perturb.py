"""Perturbation from the fp32 master in one pass: ``out = cast(master + scale * direction)``.

``out`` is the low-precision parameter shard the engine computes with (a view into the
DeepSpeed shard buffer; written in place so the edit lands in the engine). ``scale`` is
a device tensor and is never read on the host, so the call does not synchronise.

Math order, identical in both versions so the casts are bit-exact: the fp32 product
``tmp = scale * direction`` is rounded first, then ``master + tmp`` is rounded, then cast
to ``out.dtype`` with round-to-nearest-even. On a GPU, Triton would by default contract
``master + scale * direction`` into one FMA (a single rounding), giving results that
differ from PyTorch by an ulp now and then; the launch passes ``enable_fp_fusion=False``
so the GPU code rounds twice, like PyTorch and like the interpreter.
"""
import functools

import torch

from ._checks import OUT_DTYPES, check_same_device, check_same_numel, check_scale, check_tensor
from ._triton import build_store_cast, import_triton, launch_store


def _check(master, direction, scale, out) -> None:
    check_tensor("master", master, (torch.float32,))
    check_tensor("direction", direction, (torch.float32,))
    check_tensor("out", out, OUT_DTYPES)
    check_same_numel("master", master, "direction", direction)
    check_same_numel("master", master, "out", out)
    check_same_device(("master", master), ("direction", direction))
    check_scale(scale, master.device)


def perturb_from_master_torch(master, direction, scale, out) -> None:
    """PyTorch twin and test reference. ``out`` may live on another device (offloaded master)."""
    _check(master, direction, scale, out)
    tmp = direction * scale
    tmp.add_(master)
    out.view(-1).copy_(tmp.view(-1))


def perturb_from_master_triton(master, direction, scale, out) -> None:
    """One fused launch: reads master and direction (fp32), writes ``out`` once."""
    _check(master, direction, scale, out)
    check_same_device(("master", master), ("out", out))
    launch_store(_kernel(), master, out, direction.view(-1), scale, enable_fp_fusion=False)


@functools.cache
def _kernel():
    """Build the jit kernel on first use (see kernels._triton for why not at import).

    Its free names are bound as module globals: the interpreter resolves a kernel's
    names in its module's globals only, never in closures.
    """
    global tl, store_cast
    triton, tl = import_triton()
    store_cast = build_store_cast()

    @triton.jit
    def perturb_kernel(master_ptr, direction_ptr, scale_ptr, out_ptr, n,
                       BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        master = tl.load(master_ptr + offs, mask=mask, other=0.0)
        direction = tl.load(direction_ptr + offs, mask=mask, other=0.0)
        scale = tl.load(scale_ptr)
        tmp = scale * direction
        store_cast(out_ptr, offs, master + tmp, mask, OUT_BF16)

    return perturb_kernel
