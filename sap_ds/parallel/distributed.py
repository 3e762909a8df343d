"""Process-group set-up that works the same under ``deepspeed``, ``torchrun``, SLURM and
plain ``python`` (one process), on GPUs (NCCL) and on CPUs (gloo).

Two timeouts (``distributed:`` in the run config; slurm/README.md, "Collective timeouts"):

* the training process group gets ``timeout_minutes``, passed to
  ``deepspeed.init_distributed`` (DeepSpeed's default is 10 minutes, or $DEEPSPEED_TIMEOUT;
  the NCCL watchdog aborts a collective that has not finished by then, gloo raises);
* ``barrier()``, the one place where ranks wait for rank 0 alone (export, checkpoint
  rename and pruning), runs on a separate gloo group created with ``wait_timeout_minutes``.
  A long wait there blocks a CPU thread only; no NCCL work is pending, so the watchdog
  has nothing to time out, and a hang during training is still caught after
  ``timeout_minutes`` instead of hours.
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import socket
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    import torch

    from sap_ds.config.run import DistributedConfig

log = logging.getLogger("sap_ds")
_wait_group = None  # the gloo group barrier() uses; None: one process, or not initialised by us


# glibc's allocator maps every block above its mmap threshold (128 KB at first, raised on its
# own to at most 32 MB) straight from the kernel and unmaps it on free. On a CPU every step's
# logits and their gradients are such blocks (micro-batch x length x vocabulary floats: 38 MB
# for tiny.yaml at SmolLM2's 49,152 words, up to 126 MB for the demo's 4 x 160 tokens), so each step mapped them,
# zero-filled them page by page and unmapped them again: a tiny SAP step spent a quarter of its
# CPU time in the kernel. Blocks up to 256 MB stay in the heap, and freed memory goes back to
# the system only past 512 MB (measured in docs/benchmarks.md, "The CPU allocator").
CPU_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912"


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def cpu_process_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a training or evaluation process sap-ds starts on a CPU machine: the CPU
    accelerator, one thread per process (the ranks or runs side by side share the cores), and
    the allocator settings above unless the user set GLIBC_TUNABLES (read by glibc when a
    process starts, so it is set for the child; ignored where the C library is not glibc)."""
    env = {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.setdefault("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)
    return env


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


def timeouts(cfg: Optional["DistributedConfig"] = None) -> tuple[datetime.timedelta, datetime.timedelta]:
    """(training collectives, waits for rank 0) from the run config's ``distributed`` section."""
    from sap_ds.config.run import DistributedConfig

    cfg = cfg or DistributedConfig()
    return datetime.timedelta(minutes=cfg.timeout_minutes), datetime.timedelta(minutes=cfg.wait_timeout_minutes)


def warn_if_gloo_binds_loopback() -> None:
    """Before any group is made: on a world that spans nodes, gloo (the wait group; on CPU
    the world group too) binds the address the host name resolves to unless
    GLOO_SOCKET_IFNAME names an interface. Where that is a loopback address (127.0.1.1 on
    Debian-style hosts) the other nodes cannot connect and group creation hangs with no
    message, so say it first. Nodes are told apart by the launcher's per-node rank count
    (torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE); without one nothing is said, nor
    with a loopback MASTER_ADDR (every "node" on this host: the SLURM tests' fake nodes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    if per_node is None or int(per_node) >= world or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    if _is_loopback(os.environ.get("MASTER_ADDR", "")):
        return
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return  # unresolvable: gloo fails at once with its own message rather than hanging
    if _is_loopback(address):
        log.warning("this host's name %s resolves to %s, a loopback address, and GLOO_SOCKET_IFNAME is unset: "
                    "gloo's groups across %d ranks on several nodes would bind it, and their creation hangs; "
                    "export GLOO_SOCKET_IFNAME=<interface that reaches the other nodes> (the SLURM templates "
                    "set it from SAP_DS_NET)", host, address, world)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name (MASTER_ADDR may be one)
        return address == "localhost"


def init_distributed(cfg: Optional["DistributedConfig"] = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) after initialising the default process group with
    ``cfg.timeout_minutes`` and the wait group with ``cfg.wait_timeout_minutes``."""
    global _wait_group
    prepare_environment()
    import deepspeed
    import torch
    import torch.distributed as dist

    timeout, wait_timeout = timeouts(cfg)
    warn_if_gloo_binds_loopback()
    if "DEEPSPEED_TIMEOUT" in os.environ:
        log.warning("DEEPSPEED_TIMEOUT=%s is not used: sap-ds passes distributed.timeout_minutes=%g to DeepSpeed",
                    os.environ["DEEPSPEED_TIMEOUT"], timeout.total_seconds() / 60)
    if on_cpu():
        # The shared-memory comm op would be compiled on first use (~70 s); gloo does not need it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl", timeout=timeout)
    if _wait_group is None and dist.get_world_size() > 1:
        _wait_group = dist.new_group(backend="gloo", timeout=wait_timeout)  # collective: every rank
    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def device() -> "torch.device":
    import torch

    if on_cpu():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def wait_group():
    """The gloo group with ``wait_timeout_minutes`` for collectives in which ranks wait for
    rank 0's long work (None: one process, or a process group someone else initialised,
    whose default group then serves)."""
    return _wait_group


def barrier() -> None:
    """Wait for every rank, with the wait timeout where init_distributed made the wait group
    (a process group someone else initialised keeps its own timeout)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=_wait_group)


def shutdown_distributed() -> None:
    """Destroy every process group of this process (the wait group included) once its last
    collective is done: call it on every rank at the end of a run.

    Why: a process that leaves with its gloo groups alive lets their C++ worker threads outlive
    Python's finalisation, and a rank whose work is done can still die with "terminate called
    without an active exception" (pytorch/pytorch#190489); the deepspeed launcher then ends the
    job with exit 250 although every result was written. With NCCL, torch asks for the same
    call ("process group has NOT been destroyed"). Not called on an error path: with NCCL,
    destroying a group while another rank still waits in a collective can block."""
    global _wait_group
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()  # None: the default group and every group made after it
    _wait_group = None


@contextlib.contextmanager
def process_groups(cfg: Optional["DistributedConfig"] = None) -> Iterator[tuple[int, int, int]]:
    """An entry point's process groups: ``init_distributed(cfg)`` on entry, and
    ``shutdown_distributed()`` when the body ends without an exception, only where this
    call made them: a caller that already holds groups keeps them (the GPU check runs
    ``sap-ds bench`` inside its own launch and builds engines after it)."""
    import torch.distributed as dist

    made_here = not dist.is_initialized()
    yield init_distributed(cfg)
    if made_here:
        shutdown_distributed()
