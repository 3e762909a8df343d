"""Every tensor collective in sap_ds runs on the process group's device (sap_ds/parallel/collectives.py).

gloo accepts CPU tensors, so the CPU suite cannot catch a CPU tensor given to an NCCL group
by running. Three checks instead: the helper picks the device from the backend (mocked
NCCL: cuda); no sap_ds module calls a torch.distributed / deepspeed.comm tensor collective
directly (read from the source); and during a 2-rank ZeRO-Offload SAP run every sap_ds
collective is recorded with its tensors' devices (tests/support/collective_checker.py; that run
shares its launch with the gradient-accumulation runs, in tests/test_zero3_reference.py:
test_offload_sap_run_issues_every_collective_on_the_groups_device)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from sap_ds.parallel import collectives
from tests.support.collective_checker import TENSOR_COLLECTIVES, CollectiveChecker
from tests.support.repo import REPO


@pytest.mark.parametrize("backend, prefer, want", [
    ("nccl", torch.device("cpu"), torch.device("cuda", 3)),
    ("nccl", None, torch.device("cuda", 3)),
    ("gloo", torch.device("cpu"), torch.device("cpu")),
    ("gloo", torch.device("cuda", 1), torch.device("cpu")),
    ("cpu:gloo,cuda:nccl", torch.device("cpu"), torch.device("cpu")),
    ("cpu:gloo,cuda:nccl", torch.device("cuda", 1), torch.device("cuda", 1)),
])
def test_group_device_follows_the_backend(monkeypatch, backend, prefer, want):
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(collectives.torch.cuda, "current_device", lambda: 3)
    assert collectives.group_device(prefer=prefer) == want


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "smoke-signals")
    with pytest.raises(RuntimeError, match="smoke-signals"):
        collectives.group_device()


def test_helper_stages_a_cpu_tensor_on_the_nccl_device(monkeypatch):
    """Under a (mocked) NCCL group the helper hands the collective a tensor on the CUDA
    device and writes the result back into the CPU tensor."""
    seen = []

    class FakeStaged:
        def __init__(self, src):
            self.device, self.src = torch.device("cuda", 0), src

        def div_(self, k):
            self.src = self.src / k
            return self

    monkeypatch.setattr(collectives, "active", lambda group=None: True)
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(collectives.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(collectives.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda t, op=None, group=None: seen.append(t.device))
    tensor = torch.tensor([4.0, 6.0])
    moved = []
    real_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            moved.append(args[0])
            return FakeStaged(self.clone())
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src: self.set_(src.src))
    collectives.all_reduce(tensor, "mean")
    assert seen == [torch.device("cuda", 0)] and moved == [torch.device("cuda", 0)]
    assert tensor.tolist() == [2.0, 3.0]


def test_checker_flags_direct_calls_and_wrong_devices():
    checker = CollectiveChecker(needs_device_type="cuda")
    cpu = torch.zeros(2)
    checker.check("all_reduce", str(REPO / "sap_ds" / "training" / "trainer.py"), [cpu])
    checker.check("all_reduce", str(REPO / "sap_ds" / "parallel" / "collectives.py"), [cpu])
    checker.check("all_gather_into_tensor", "/site-packages/deepspeed/comm/torch.py", [cpu])
    assert checker.sap_ds_calls == 2 and checker.other_calls == 1
    assert any("trainer.py: torch.distributed.all_reduce called directly" in v for v in checker.violations)
    assert any("collectives.py: all_reduce on a cpu tensor, the group needs cuda" in v for v in checker.violations)


# --------------------------------------------------------------------------- no direct calls in the source

DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


def direct_collective_calls(root: Path) -> list[str]:
    """``file:line name`` of every tensor collective called on torch.distributed or
    deepspeed.comm (any import alias) by sap_ds code outside sap_ds/parallel/collectives.py."""
    found = []
    for path in sorted((root / "sap_ds").rglob("*.py")):
        if path.name == "collectives.py" and path.parent.name == "parallel":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules, functions = set(), set()  # names bound to the modules / to their collectives
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {a.asname for a in node.names if a.name in DIST_MODULES and a.asname}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in DIST_MODULES:
                        modules.add(a.asname or a.name)
                    elif node.module in DIST_MODULES and a.name in TENSOR_COLLECTIVES:
                        functions.add(a.asname or a.name)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = None
            if isinstance(f, ast.Name) and f.id in functions:
                name = f.id
            elif isinstance(f, ast.Attribute) and f.attr in TENSOR_COLLECTIVES:
                owner = ast.unparse(f.value)
                if owner in modules or owner in DIST_MODULES:
                    name = f.attr
            if name:
                found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    return found


def test_sap_ds_calls_no_tensor_collective_outside_the_helpers():
    assert direct_collective_calls(REPO) == []


def test_the_source_check_sees_direct_calls(tmp_path):
    (tmp_path / "sap_ds").mkdir()
    (tmp_path / "sap_ds" / "x.py").write_text(
        "import torch.distributed as dist\nfrom deepspeed import comm\nfrom torch.distributed import all_gather as ag\n"
        "import torch\n\ndef f(t):\n    dist.all_reduce(t)\n    comm.broadcast(t, 0)\n    ag([t], t)\n"
        "    torch.distributed.reduce_scatter_tensor(t, t)\n    dist.all_gather_object([None], 1)\n")
    assert direct_collective_calls(tmp_path) == [
        "sap_ds/x.py:7 all_reduce", "sap_ds/x.py:8 broadcast", "sap_ds/x.py:9 ag", "sap_ds/x.py:10 reduce_scatter_tensor"]
