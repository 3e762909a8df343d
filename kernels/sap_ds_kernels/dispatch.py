"""Public kernel API: pick Triton or the PyTorch twin per call, and say why.

Rules (``backend``):
- ``"auto"``: Triton for CUDA tensors when triton imports (and is not in interpreter
  mode, which would be far slower than PyTorch); the PyTorch twin otherwise, including
  CPU tensors such as a CPU-offloaded master.
- ``"triton"``: force Triton. On CPU this needs the interpreter, i.e. TRITON_INTERPRET=1
  set before triton is imported; otherwise a RuntimeError says so.
- ``"torch"``: force the PyTorch twin.
Inputs are validated once per call, by the chosen implementation.
"""
import functools

import torch

from ._triton import import_triton, interpreter_enabled
from .perturb import (N_STATS, perturb_from_master_torch, perturb_from_master_triton, perturbation_stats_torch,
                      perturbation_stats_triton)
from .restore import restore_from_master_torch, restore_from_master_triton
from .sumsq import sumsq_torch, sumsq_triton

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def _triton_import_error() -> str | None:
    """None when triton imports, else the reason (cached: an import is tried once)."""
    try:
        import_triton()
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def choose_backend(tensor: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """Return ``("triton" | "torch", reason)`` for a kernel call whose main input is ``tensor``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    device = tensor.device.type
    if backend == "torch":
        return "torch", "backend='torch' requested: PyTorch twin"
    if backend == "triton":
        error = _triton_import_error()
        if error:
            raise RuntimeError(f"backend='triton' requested but triton does not import ({error})")
        if device == "cuda":
            return "triton", "backend='triton' requested on a CUDA tensor"
        if device == "cpu" and interpreter_enabled():
            return "triton", "backend='triton' requested on cpu: Triton interpreter (TRITON_INTERPRET=1)"
        raise RuntimeError(
            f"backend='triton' on a {device} tensor needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before triton is imported (e.g. "
            "`TRITON_INTERPRET=1 python ...`), or use backend='auto' or 'torch' for the PyTorch twin"
        )
    if device != "cuda":
        return "torch", (
            f"tensor on {device}: PyTorch twin (Triton runs on CUDA; set TRITON_INTERPRET=1 "
            "and backend='triton' to force the interpreter)"
        )
    error = _triton_import_error()
    if error:
        return "torch", f"CUDA tensor but triton does not import ({error}): PyTorch twin"
    if interpreter_enabled():
        return "torch", "CUDA tensor but TRITON_INTERPRET=1 would run the slow interpreter: PyTorch twin"
    return "triton", "CUDA tensor and triton importable"


def sumsq(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """fp32 tensor ``[sum(a**2), sum(b**2)]`` of two same-sized flat shards."""
    chosen, _ = choose_backend(a, backend)
    return (sumsq_triton if chosen == "triton" else sumsq_torch)(a, b)


def perturb_from_master(master, direction, scale, out, backend: str = "auto", stats=None) -> None:
    """In place: ``out[:] = cast(master + scale * direction)`` with ``scale`` a device tensor.

    ``stats``: optional float64 tensor of ``N_STATS`` elements on master's device; the
    realised-perturbation sums ``[sum r*r, sum d*d, sum r*d, count(r != 0)]`` of this
    shard are added to it (see perturb.py), in the same pass."""
    chosen, _ = choose_backend(master, backend)
    impl = perturb_from_master_triton if chosen == "triton" else perturb_from_master_torch
    impl(master, direction, scale, out, stats=stats)


def perturbation_stats(master, direction, scale, out_dtype, backend: str = "auto") -> torch.Tensor:
    """The sums ``perturb_from_master(..., stats=)`` would add for a shard of ``out_dtype``,
    without writing anything: float64 ``[sum r*r, sum d*d, sum r*d, count(r != 0)]``."""
    chosen, _ = choose_backend(master, backend)
    impl = perturbation_stats_triton if chosen == "triton" else perturbation_stats_torch
    return impl(master, direction, scale, out_dtype)


def restore_from_master(master, out, backend: str = "auto") -> None:
    """In place: ``out[:] = cast(master)``, bit-exact with ``master.to(out.dtype)``."""
    chosen, _ = choose_backend(master, backend)
    impl = restore_from_master_triton if chosen == "triton" else restore_from_master_torch
    impl(master, out)
