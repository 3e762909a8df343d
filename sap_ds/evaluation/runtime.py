"""Where evaluation runs: one process, or N ranks started by ``deepspeed``/``torchrun``.

When the model fits one device (the ``hf`` backend), every rank holds a whole copy and
ranks split the work: rank r takes items[r::world], and the results are gathered back in
the original order. One process is the special case world == 1, with no process group at
all; the sharded backends (``device_map``, ``vllm``) run in one process and spread one
model over the node's GPUs themselves (``sap_ds.evaluation.backends``).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def init_from_env() -> None:
    """Join the process group a launcher describes (WORLD_SIZE > 1); no-op otherwise."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def gather(obj) -> list:
    """``obj`` from every rank, indexed by rank (a one-item list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard_map(items: Sequence[T], fn: Callable[[list[T]], list[R]]) -> list[R]:
    """``fn`` over this rank's share of ``items``; every rank gets all results, in order."""
    rank, world = rank_world()
    gathered = gather(fn(list(items[rank::world])))
    out: list = [None] * len(items)
    for r, part in enumerate(gathered):
        out[r::world] = part
    return out


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA GPU that supports it (half the memory and several
    times the speed of fp32), ``fp32`` elsewhere (CPUs without AMX run bf16 matmuls ~100x
    slower than fp32); ``fp32`` and ``bf16`` stay as given."""
    if dtype != "auto":
        return dtype
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
