"""Collective timeouts (issue 17 item 6): the configured values reach DeepSpeed and the wait
group, the wait barrier outlasts the training timeout, and the keys are validated."""
from __future__ import annotations

import datetime
import os
import time

import pytest
import torch

from sap_ds.config.run import build_config, config_changes, config_to_dict
from sap_ds.errors import ConfigError
from sap_ds.parallel import distributed
from tests.support.launch import free_port


def test_configured_timeouts_reach_deepspeed_and_the_wait_group(monkeypatch):
    import deepspeed
    import torch.distributed as dist

    from sap_ds.config.run import DistributedConfig

    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(init=kw))
    monkeypatch.setattr(dist, "new_group", lambda **kw: seen.update(group=kw) or "wait-group")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(distributed, "_wait_group", None)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0" if "RANK" in key else ("2" if key == "WORLD_SIZE" else "1"))
    distributed.init_distributed(DistributedConfig(timeout_minutes=45, wait_timeout_minutes=200))
    assert seen["init"] == {"dist_backend": "gloo", "timeout": datetime.timedelta(minutes=45)}
    assert seen["group"] == {"backend": "gloo", "timeout": datetime.timedelta(minutes=200)}

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda group=None: seen.update(barrier=group))
    distributed.barrier()
    assert seen["barrier"] == "wait-group"


def test_defaults_and_validation_of_the_timeout_keys():
    cfg = build_config({})
    assert (cfg.distributed.timeout_minutes, cfg.distributed.wait_timeout_minutes) == (30.0, 120.0)
    assert distributed.timeouts(cfg.distributed) == (datetime.timedelta(minutes=30), datetime.timedelta(minutes=120))
    with pytest.raises(ConfigError, match=r"key 'distributed.timeout_minutes': Input should be greater than 0"):
        build_config({}, ["distributed.timeout_minutes=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'distributed.wait_timeout'.*did you mean 'distributed.wait_timeout_minutes'"):
        build_config({}, ["distributed.wait_timeout=60"])
    # How ranks talk is not what is trained: a resume with other timeouts is the same run.
    saved = config_to_dict(cfg)
    assert config_changes(saved, build_config({}, ["distributed.wait_timeout_minutes=600"])) == []


def _timeout_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from sap_ds.config.run import DistributedConfig

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.init_distributed(DistributedConfig(timeout_minutes=0.02, wait_timeout_minutes=1.0))  # 1.2 s, 60 s
    if rank == 0:
        time.sleep(2)  # rank 0 alone, as in an export
    distributed.barrier()  # waits past the training timeout
    results[f"wait{rank}"] = "ok"
    try:
        if rank == 0:
            time.sleep(2)
        dist.barrier()  # the training group: its 1.2 s timeout applies
        results[f"train{rank}"] = "no timeout"
    except RuntimeError as exc:
        results[f"train{rank}"] = "timeout" if "imed out" in str(exc) or "imeout" in str(exc) else str(exc)
    os._exit(0)  # a gloo group broken by the timeout makes the normal teardown wait ~20 s


def test_wait_barrier_outlasts_the_training_timeout_which_is_applied():
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_timeout_worker, args=(free_port(), results), nprocs=2)
    assert results["wait0"] == results["wait1"] == "ok"
    assert results["train1"] == "timeout", dict(results)


def _shutdown_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with distributed.process_groups():  # an entry point's groups: made here, so destroyed at the end
        with distributed.process_groups():  # a caller's groups (sap-ds bench inside the GPU check): kept
            pass
        kept = dist.is_initialized() and distributed.wait_group() is not None
        distributed.barrier()
    results[rank] = (kept, dist.is_initialized(), distributed._wait_group is None)


def test_shutdown_destroys_every_group_of_a_rank():
    """A rank that leaves with its gloo groups alive can die in interpreter finalisation after its
    work is done (CI at 345b5a2: exit 250 through the launcher); every entry ends with this call."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_shutdown_worker, args=(free_port(), results), nprocs=2)
    assert dict(results) == {0: (True, False, True), 1: (True, False, True)}


# --------------------------------------------------------------------------- the CPU allocator

_HELD_IN_MAPPINGS = """
import ctypes, json
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
import torch
block = torch.empty(64 * 2**20 // 4)  # a 64 MB float32 block: a step's logits at a larger batch
print(json.dumps(libc.mallinfo2().hblkhd))
"""


def test_cpu_processes_keep_large_blocks_in_the_heap(tmp_path, monkeypatch):
    """glibc silently ignores a tunable it does not know, so the settings are checked by their
    effect: in a process started with sap-ds's CPU environment a 64 MB tensor comes from the
    heap (no block is held in its own mapping), where a default process maps it. The runs
    sap-ds compare, sweep and attack start get that environment, and the Makefile's value is
    the same string."""
    import ctypes
    import subprocess
    import sys

    from sap_ds.experiments.runs import run_logged
    from tests.support.repo import REPO

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33 or newer: GLIBC_TUNABLES has no effect here")
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def mapped(env):
        proc = subprocess.run([sys.executable, "-c", _HELD_IN_MAPPINGS], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.strip().splitlines()[-1])

    assert mapped(base) >= 64 * 2**20, "a default process keeps the block in a mapping: the check would see nothing"
    assert mapped(distributed.cpu_process_env(base)) < 2**20
    assert distributed.cpu_process_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2", "a user's own tunables are kept"
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    run_logged([sys.executable, "-c", "import os; print('child:', os.environ.get('GLIBC_TUNABLES'))"],
               tmp_path / "child.log", "print the environment", echo=False)
    assert f"child: {distributed.CPU_MALLOC_TUNABLES}" in (tmp_path / "child.log").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert f"CPU_MALLOC_TUNABLES := {distributed.CPU_MALLOC_TUNABLES}\n" in makefile
