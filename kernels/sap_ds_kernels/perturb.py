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

Realised-perturbation statistics (``stats``). A low-precision working shard cannot hold
a perturbation much smaller than its half-ulp (bf16: ~2e-3 relative): ``cast(W + d)``
then equals ``cast(W)`` for most elements and the engine computes at a point that is not
``W + d``. With ``stats`` the same pass (the kernel, no second read) also sums, over the
shard, with ``r = cast(W + d) - cast(W)`` (what the engine sees) and ``d = scale *
direction`` (what was intended): ``[sum r*r, sum d*d, sum r*d, count(r != 0)]``. From
those (summed over ranks) follow the realised/intended norm ratio, the cosine and the
fraction of elements that changed (``sap_ds/sap/resolution.py``).

The PyTorch twin is what runs under CPU offload (the master is a CPU tensor): it walks the
shard in chunks of ``OFFLOAD_CHUNK`` elements, so its temporaries are one chunk's worth
rather than ~16 B per element of the shard, and writes a CUDA ``out`` through pinned memory
(``_offload.py``). Chunking changes no value written (every operation is element-wise); the
statistics are summed per chunk in fp32 and across chunks in float64, as the kernel sums
per block.
"""
import functools

import torch

from ._checks import OUT_DTYPES, check_same_device, check_same_numel, check_scale, check_tensor
from ._offload import OFFLOAD_CHUNK, chunk_ranges, write_cast
from ._triton import build_store_cast, checked_kernel, import_triton, launch_options, out_arg

N_STATS = 4  # sum r*r, sum d*d, sum r*d, count(r != 0)
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _check(master, direction, scale, out) -> None:
    check_tensor("master", master, (torch.float32,))
    check_tensor("direction", direction, (torch.float32,))
    check_tensor("out", out, OUT_DTYPES)
    check_same_numel("master", master, "direction", direction)
    check_same_numel("master", master, "out", out)
    check_same_device(("master", master), ("direction", direction))
    check_scale(scale, master.device)


def _check_stats(stats, device) -> None:
    if stats is None:
        return
    check_tensor("stats", stats, (torch.float64,))
    if stats.numel() != N_STATS or stats.device != device:
        raise ValueError(f"stats must be a float64 tensor of {N_STATS} elements on {device}, "
                         f"got shape {tuple(stats.shape)} on {stats.device}")


def realised_stats_torch(master, tmp, cast) -> torch.Tensor:
    """``[sum r*r, sum d*d, sum r*d, count(r != 0)]`` (float64) with ``d = tmp`` and
    ``r = cast.float() - master.to(cast.dtype).float()``: the twin of the kernel's sums.
    Temporaries: ``r`` and one product at a time (4 B/element each), ``master.to(cast.dtype)``.
    The products are summed by ``sum`` (cascade summation), not ``dot``: a BLAS dot
    accumulates naively and drifted 2e-5 from float64 over 1M elements."""
    r = cast.to(torch.float32, copy=True)  # a copy even for fp32: ``cast`` may be ``out`` in flight
    r.sub_(master.to(cast.dtype))
    sums = (r.square().sum(), tmp.square().sum(), (r * tmp).sum(), r.count_nonzero())
    return torch.stack([s.double() for s in sums])


def _chunks(master, direction, scale):
    """Per chunk: ``(start, master chunk, scale * direction chunk)``; the product is the
    chunk's first temporary (4 B/element)."""
    flat_master, flat_direction = master.view(-1), direction.view(-1)
    for start, length in chunk_ranges(master.numel(), OFFLOAD_CHUNK):
        yield start, flat_master.narrow(0, start, length), flat_direction.narrow(0, start, length) * scale


def perturb_from_master_torch(master, direction, scale, out, stats=None) -> None:
    """PyTorch twin and test reference. ``out`` may live on another device (offloaded
    master). With ``stats`` (float64, 4 elements, on master's device) the realised
    statistics are added to it; the values written are the same bit for bit."""
    _check(master, direction, scale, out)
    _check_stats(stats, master.device)
    flat_out = out.view(-1)
    for start, m, tmp in _chunks(master, direction, scale):
        cast = write_cast(flat_out.narrow(0, start, m.numel()), tmp + m)
        if stats is not None:
            stats += realised_stats_torch(m, tmp, cast)


def perturbation_stats_torch(master, direction, scale, out_dtype) -> torch.Tensor:
    """The statistics ``perturb_from_master_torch`` would add, for an ``out_dtype`` shard,
    without writing anything (for a what-if radius: ``sap_ds.sap.resolution``)."""
    _check(master, direction, scale, torch.empty(master.numel(), dtype=out_dtype, device="meta"))
    stats = torch.zeros(N_STATS, dtype=torch.float64, device=master.device)
    for _, m, tmp in _chunks(master, direction, scale):
        stats += realised_stats_torch(m, tmp, (tmp + m).to(out_dtype))
    return stats


def perturb_from_master_triton(master, direction, scale, out, stats=None) -> None:
    """One fused launch: reads master and direction (fp32), writes ``out`` once; with
    ``stats`` each block also writes its four partial sums (no second read)."""
    _check(master, direction, scale, out)
    check_same_device(("master", master), ("out", out))
    _check_stats(stats, master.device)
    partials = _launch(master, direction, scale, out, out.dtype, store=True, with_stats=stats is not None)
    if stats is not None:
        stats += partials


def perturbation_stats_triton(master, direction, scale, out_dtype) -> torch.Tensor:
    """``perturbation_stats_torch`` in one launch that reads master and direction and
    writes only the per-block partial sums."""
    _check(master, direction, scale, torch.empty(master.numel(), dtype=out_dtype, device="meta"))
    return _launch(master, direction, scale, None, out_dtype, store=False, with_stats=True)


def _launch(master, direction, scale, out, out_dtype, store: bool, with_stats: bool):
    n = master.numel()
    if n == 0:
        return torch.zeros(N_STATS, dtype=torch.float64, device=master.device) if with_stats else None
    opts = launch_options(master.device)
    blocks = -(-n // opts["BLOCK"])
    partials = torch.empty(N_STATS, blocks if with_stats else 1, dtype=torch.float32, device=master.device)
    target = out_arg(out) if store else partials  # an unused pointer when nothing is stored
    checked_kernel(_kernel(), master.device)[(blocks,)](
        master.view(-1), direction.view(-1), scale, target, partials, n, blocks,
        OUT_KIND=_OUT_KIND[out_dtype], STORE=store, STATS=with_stats, enable_fp_fusion=False, **opts,
    )
    return partials.double().sum(dim=1) if with_stats else None


@functools.cache
def _kernel():
    """Build the jit kernel on first use (see sap_ds_kernels._triton for why not at import).

    Its free names are bound as module globals: the interpreter resolves a kernel's
    names in its module's globals only, never in closures.
    """
    global tl, store_cast, cast_value
    triton, tl = import_triton()
    store_cast = build_store_cast()

    @triton.jit
    def cast_value(x, OUT_KIND: tl.constexpr):
        """The fp32 value of ``x`` cast to the output dtype (0 fp32, 1 bf16, 2 fp16): bf16
        rounds to nearest even on the bit pattern exactly as ``store_cast`` does."""
        if OUT_KIND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
        elif OUT_KIND == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def perturb_kernel(master_ptr, direction_ptr, scale_ptr, out_ptr, partials_ptr, n, blocks,
                       BLOCK: tl.constexpr, OUT_KIND: tl.constexpr, STORE: tl.constexpr, STATS: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        master = tl.load(master_ptr + offs, mask=mask, other=0.0)
        direction = tl.load(direction_ptr + offs, mask=mask, other=0.0)
        scale = tl.load(scale_ptr)
        tmp = scale * direction
        value = master + tmp
        if STORE:
            store_cast(out_ptr, offs, value, mask, OUT_KIND == 1)
        if STATS:  # masked lanes hold master = direction = 0, so r = d = 0 there
            r = cast_value(value, OUT_KIND) - cast_value(master, OUT_KIND)
            tl.store(partials_ptr + pid, tl.sum(r * r, axis=0))
            tl.store(partials_ptr + blocks + pid, tl.sum(tmp * tmp, axis=0))
            tl.store(partials_ptr + 2 * blocks + pid, tl.sum(r * tmp, axis=0))
            tl.store(partials_ptr + 3 * blocks + pid, tl.sum((r != 0).to(tl.float32), axis=0))

    return perturb_kernel
