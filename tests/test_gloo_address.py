"""A multi-node world whose host name resolves to loopback (issue 31, item 4): gloo binds
that address unless GLOO_SOCKET_IFNAME names an interface, and creating the wait group (or,
on CPU, the world group) hangs before step 1. ``init_distributed`` says so in a warning
before it creates any group. Monkeypatched: no process group is made."""
from __future__ import annotations

import logging
import socket

import pytest

from sap_ds.parallel import distributed


@pytest.fixture()
def fake_world(monkeypatch):
    """init_distributed with DeepSpeed's and torch's group creation recorded, not run: 2 nodes x 2."""
    import deepspeed
    import torch.distributed as dist

    events = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: events.append("init"))
    monkeypatch.setattr(dist, "new_group", lambda **kw: events.append("new_group") or "wait-group")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(distributed, "_wait_group", None)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: {"node7": "127.0.1.1"}[name])
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", MASTER_ADDR="10.0.0.1",
                           MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)

    class Recorder(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING and "GLOO_SOCKET_IFNAME" in record.getMessage():
                events.append(record.getMessage())

    handler = Recorder()
    distributed.log.addHandler(handler)
    yield events
    distributed.log.removeHandler(handler)


def test_loopback_host_name_on_several_nodes_is_warned_before_any_group(fake_world):
    distributed.init_distributed()
    warning = next(e for e in fake_world if "GLOO_SOCKET_IFNAME" in e)
    assert fake_world.index(warning) < fake_world.index("init") < fake_world.index("new_group")
    assert "node7" in warning and "127.0.1.1" in warning and "loopback" in warning, warning


@pytest.mark.parametrize("change", ["one node", "interface named", "routable address", "nodes on one host"])
def test_no_warning_where_gloo_finds_the_other_nodes(fake_world, monkeypatch, change):
    if change == "one node":
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    elif change == "interface named":
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    elif change == "routable address":
        monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.0.0.7")
    else:  # the SLURM tests' fake nodes: every rank on this host, rendezvous on loopback
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    distributed.init_distributed()
    assert fake_world == ["init", "new_group"]
