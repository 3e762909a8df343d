"""Tensor collectives that run on the process group's device, wherever the tensor lives.

Why: with ZeRO-Offload the fp32 master, the SAP direction buffers and every sum taken
over them are CPU tensors, but an NCCL group only moves CUDA tensors (a CPU tensor fails
with "No backend type associated with device type cpu"), and gloo, which the CPU test
suite runs on, accepts CPU tensors, so no CPU test can catch a tensor on the wrong
device by running. Every tensor collective in sap_ds goes through ``all_reduce`` here,
which stages the tensor on the device the backend needs (``group_device``) and copies
the result back in place; ``tests/test_collectives.py`` checks that no other module
calls ``torch.distributed`` tensor collectives directly.

The tensors these helpers move are a few scalars or the probe (``layers x hidden``): the
staging copy costs nothing next to the collective itself.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# Which tensor devices each backend can move. A device-specific backend string such as
# "cpu:gloo,cuda:nccl" names its own map.
BACKEND_DEVICE_TYPES = {"nccl": ("cuda",), "gloo": ("cpu",), "mpi": ("cpu",), "ucc": ("cpu", "cuda"),
                        "ccl": ("xpu", "cpu"), "xccl": ("xpu",), "hccl": ("npu",)}

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def active(group=None) -> bool:
    """Whether a collective would do anything (a process group with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def backend_device_types(backend: str) -> tuple[str, ...]:
    """The tensor device types ``backend`` (as ``dist.get_backend`` spells it) can move."""
    backend = str(backend).lower()
    if ":" in backend:  # "cpu:gloo,cuda:nccl"
        return tuple(part.split(":", 1)[0] for part in backend.split(","))
    if backend not in BACKEND_DEVICE_TYPES:
        raise RuntimeError(f"sap_ds does not know which device the '{backend}' backend's tensors must be on; "
                           f"known: {', '.join(sorted(BACKEND_DEVICE_TYPES))}")
    return BACKEND_DEVICE_TYPES[backend]


def group_device(group=None, prefer: torch.device | None = None) -> torch.device:
    """The device a tensor must be on for a collective in ``group``: ``prefer`` (the
    tensor's own device) when the backend moves that device type, else the backend's
    first device type (cuda: the current CUDA device, as NCCL requires)."""
    types = backend_device_types(dist.get_backend(group))
    if prefer is not None and prefer.type in types:
        return prefer
    kind = types[0]
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind)


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` (``op``: sum, max, min or mean) on the group's
    device; ``tensor`` keeps its device. Returns ``tensor``; a no-op without a group."""
    if not active(group):
        return tensor
    device = group_device(group, prefer=tensor.device)
    staged = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(staged, op=REDUCE_OPS["sum" if op == "mean" else op], group=group)
    if op == "mean":
        staged.div_(dist.get_world_size(group))
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce(tensor, "sum")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce(tensor, "mean")
