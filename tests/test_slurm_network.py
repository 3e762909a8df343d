"""slurm/common.sh's network settings, run in bash without a cluster (issue 31, item 4 and
the CPU-Adam part of item 11).

gloo (the wait group, the data cache's group) binds the address its host name resolves
to unless GLOO_SOCKET_IFNAME names an interface; NCCL_SOCKET_IFNAME's ``^lo,docker0``
exclusions are not a name gloo takes. So for every SAP_DS_NET choice the template exports
GLOO_SOCKET_IFNAME as one real interface picked by the same rule as NCCL's setting, or
says in the job log that it is unset. A fake ``ip`` on PATH plays the node's interfaces."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMON = REPO / "slurm" / "common.sh"

# `ip -o -4 addr show up` on an IB node: loopback, docker's bridge, IPoIB and the Ethernet port
IB_NODE = """1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
3: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever
5: ib0    inet 10.10.0.7/16 brd 10.10.255.255 scope global ib0\\       valid_lft forever preferred_lft forever
6: eno1    inet 192.168.1.7/24 brd 192.168.1.255 scope global eno1\\       valid_lft forever preferred_lft forever
"""
EFA_NODE = """1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: veth12ab    inet 169.254.3.1/30 scope global veth12ab\\       valid_lft forever preferred_lft forever
4: ens32    inet 172.31.4.9/20 brd 172.31.15.255 scope global ens32\\       valid_lft forever preferred_lft forever
"""
LOOPBACK_ONLY = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"


def _network(tmp_path: Path, interfaces: str, **env: str) -> tuple[dict[str, str], str]:
    """(exported variables, log) after ``sapds_network`` on a node whose ``ip`` prints ``interfaces``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "interfaces").write_text(interfaces)
    fake_ip = bin_dir / "ip"
    fake_ip.write_text(f'#!/bin/sh\n[ "$*" = "-o -4 addr show up" ] && exec cat "{tmp_path / "interfaces"}"\nexit 1\n')
    fake_ip.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "GLOO_", "FI_", "SAP_DS_"))}
    script = f'source "{COMMON}"; sapds_network; env'
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                         env={**clean, "PATH": f"{bin_dir}:{clean['PATH']}", **env})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    exported = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("[sap-ds"))
    return exported, "\n".join(line for line in lines if line.startswith("[sap-ds"))


@pytest.mark.parametrize("net,interfaces,expected", [("ib", IB_NODE, "ib0"), ("socket", IB_NODE, "ib0"),
                                                     ("efa", EFA_NODE, "ens32")])
def test_gloo_gets_one_real_interface_from_the_network_choice(tmp_path, net, interfaces, expected):
    exported, log = _network(tmp_path, interfaces, SAP_DS_NET=net)
    assert exported["NCCL_SOCKET_IFNAME"].startswith("^")  # NCCL keeps its exclusions
    assert exported.get("GLOO_SOCKET_IFNAME") == expected, log
    assert f"GLOO_SOCKET_IFNAME={expected}" in log


def test_an_nccl_interface_list_of_names_gives_gloo_its_first_up_interface(tmp_path):
    exported, _ = _network(tmp_path, IB_NODE, SAP_DS_NET="ib", NCCL_SOCKET_IFNAME="eno,ib")
    assert exported["GLOO_SOCKET_IFNAME"] == "ib0"  # the first up interface matching a prefix, in ip's order
    exported, _ = _network(tmp_path, IB_NODE, SAP_DS_NET="ib", NCCL_SOCKET_IFNAME="=eno1")
    assert exported["GLOO_SOCKET_IFNAME"] == "eno1"


def test_a_gloo_interface_the_user_exported_is_kept(tmp_path):
    exported, log = _network(tmp_path, IB_NODE, SAP_DS_NET="ib", GLOO_SOCKET_IFNAME="eno1")
    assert exported["GLOO_SOCKET_IFNAME"] == "eno1" and "GLOO_SOCKET_IFNAME=eno1" in log


@pytest.mark.parametrize("net", ["ib", "efa", "socket", "auto"])
def test_no_usable_interface_is_said_in_the_log(tmp_path, net):
    exported, log = _network(tmp_path, LOOPBACK_ONLY, SAP_DS_NET=net)
    assert "GLOO_SOCKET_IFNAME" not in exported
    assert "GLOO_SOCKET_IFNAME is unset" in log, log


def test_cpu_adam_build_cache_is_node_local_like_triton():
    """DeepSpeed JIT-compiles CPU Adam (offload) into TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions
    by default: on an NFS home every node's ranks would build and lock the same folder."""
    script = f'SLURM_JOB_ID=1; source "{COMMON}"; sapds_node_local_caches; echo "$TORCH_EXTENSIONS_DIR|$TRITON_CACHE_DIR"'
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR")}
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                         env={**env, "TMPDIR": "/nodelocal", "USER": "alice"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "/nodelocal/torch-extensions-alice|/nodelocal/triton-cache-alice"
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                         env={**env, "TORCH_EXTENSIONS_DIR": "/mine"})
    assert res.stdout.strip().split("|")[0] == "/mine"  # a value the user exported wins
