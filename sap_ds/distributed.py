"""Process-group set-up that works the same under ``deepspeed``, ``torchrun``, SLURM and
plain ``python`` (one process), on GPUs (NCCL) and on CPUs (gloo)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def prepare_environment() -> None:
    """Must run before deepspeed is imported: pick the CPU accelerator where there is no
    GPU, and give a single ``python`` process the rendezvous variables torchrun would."""
    if on_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))


def init_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) after initialising the default process group."""
    prepare_environment()
    import deepspeed
    import torch

    if on_cpu():
        # The shared-memory comm op would be compiled on first use (~70 s); gloo does not need it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl")
    import torch.distributed as dist

    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def device() -> "torch.device":
    import torch

    if on_cpu():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
