"""Lazy Triton access shared by the kernel files.

Why lazy: `import sap_ds_kernels` must work where triton is not installed (the PyTorch twins
still run), and triton decides when a kernel is *decorated* whether it is compiled for
the GPU or run by the CPU interpreter (``TRITON_INTERPRET=1``). So every kernel is
built on first use by a cached builder, never at import time.
"""
import functools
import os

# Each block launch costs ~1 ms in the interpreter, so CPU runs use few, large blocks.
INTERPRETER_BLOCK = 16384
# Memory-bound elementwise kernels on NVIDIA GPUs: 4096 elements over 8 warps is
# 16 elements (four 16-byte vectors of fp32) per thread. Not tuned on a GPU yet.
CUDA_BLOCK = 4096
CUDA_NUM_WARPS = 8


@functools.cache
def import_triton():
    """Return ``(triton, triton.language)``; raises ImportError without triton."""
    import triton
    import triton.language as tl

    return triton, tl


def interpreter_enabled() -> bool:
    """Whether triton will interpret kernels on the CPU (TRITON_INTERPRET, read as triton does).

    ``triton.knobs`` (Triton >= 3.4) is where triton reads it; older Triton (3.2 and 3.3,
    which torch 2.6 and 2.7 ship) reads the environment variable itself, so we do too.
    """
    triton, _ = import_triton()
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton 3.2's own test (runtime/jit.py)


def launch_options(device) -> dict:
    """Block size (and warps on CUDA) for a one-pass kernel over a flat shard."""
    if device.type == "cuda":
        return {"BLOCK": CUDA_BLOCK, "num_warps": CUDA_NUM_WARPS}
    return {"BLOCK": INTERPRETER_BLOCK}


def checked_kernel(kernel, device):
    """Refuse to launch a GPU-compiled kernel on CPU tensors (it would fail obscurely).

    A kernel built before TRITON_INTERPRET=1 was set stays compiled for the GPU.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if device.type != "cuda" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            f"Triton kernels run on CUDA; for {device.type} tensors set TRITON_INTERPRET=1 "
            "before triton is imported (and before the first kernel call) to use the "
            "interpreter, or use backend='torch'/'auto' for the PyTorch twin"
        )
    return kernel


def launch_store(kernel, master, out, *inputs, **constexprs) -> None:
    """Launch an element-wise ``kernel(master, *inputs, out, n, ...)`` that writes ``out``
    through ``store_cast``: one program per block of the flat shard, nothing for an empty
    shard. The shared launch of the perturb and restore kernels."""
    import torch

    n = master.numel()
    if n == 0:
        return
    opts = launch_options(master.device)
    checked_kernel(kernel, master.device)[(-(-n // opts["BLOCK"]),)](
        master.view(-1), *inputs, out_arg(out), n, OUT_BF16=out.dtype == torch.bfloat16, **constexprs, **opts,
    )


@functools.cache
def build_store_cast():
    """Build the jit helper that stores fp32 values into a bf16, fp16 or fp32 buffer.

    bf16 is rounded to nearest even by hand on the bit pattern: the interpreter
    truncates fp32->bf16 casts, and one code path on CPU and GPU keeps the tested code
    the shipped code. Adding 0x7FFF plus the lowest kept bit carries into bit 16 exactly
    when the dropped half is above one half, or equal to it with an odd kept part.
    Overflow into the exponent is correct (a large finite value rounds to inf, inf
    stays inf), but a NaN's mantissa can overflow into inf or the sign bit, so NaN is
    mapped explicitly to the canonical quiet NaN 0x7FC0. bf16 outputs are passed as an
    int16 view and receive the 16-bit patterns.

    ``tl`` is bound as a module global: the interpreter resolves a kernel's names in
    its module's globals only, never in closures.
    """
    global tl
    triton, tl = import_triton()

    @triton.jit
    def store_cast(out_ptr, offs, x, mask, OUT_BF16: tl.constexpr):
        if OUT_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)
            tl.store(out_ptr + offs, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)

    return store_cast


def out_arg(out):
    """The buffer handed to ``store_cast``: bf16 travels as its int16 bit view (same storage)."""
    import torch

    flat = out.view(-1)
    return flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat
