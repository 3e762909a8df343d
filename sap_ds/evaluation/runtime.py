"""Where evaluation runs: one process, or N ranks started by ``deepspeed``/``torchrun``.

Evaluation models are small next to training (no optimizer, no gradients), so every rank
holds a whole copy and ranks split the work: rank r takes items[r::world], and the
results are gathered back in the original order. One process is the special case
world == 1, with no process group at all.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from sap_ds.modeling import DTYPES

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


def load_causal_lm(path: Path, dtype: str):
    """A local causal LM in eval mode on this rank's device (no remote code, ever)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False)
    return model.eval().to(device())
