"""Check, while a run goes, that every tensor collective sap_ds issues is on the group's device.

gloo moves CPU tensors and the CPU tests run on gloo, so a CPU tensor handed to an NCCL
group (ZeRO-Offload's master, direction and norm sums live on the CPU) can only be caught
by looking: ``CollectiveChecker.install()`` wraps the ``torch.distributed`` tensor
collectives; for each call whose immediate caller is sap_ds code it records a violation
when the caller is not ``sap_ds/parallel/collectives.py`` (the one module allowed to call them) or
when a tensor is not on the device type the backend needs (an independent table here:
nccl needs cuda, gloo cpu). DeepSpeed's own collectives (called from deepspeed/) are
DeepSpeed's business and only counted.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                      "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter")
NEEDS = {"nccl": "cuda", "gloo": "cpu"}
SAP_DS = os.sep + "sap_ds" + os.sep
HELPERS = os.path.join("sap_ds", "parallel", "collectives.py")


def _tensors(args, kwargs):
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if torch.is_tensor(v))


class CollectiveChecker:
    def __init__(self, needs_device_type: str | None = None):
        self.needs = needs_device_type  # None: read from the backend at each call
        self.violations: list[str] = []
        self.sap_ds_calls = 0
        self.other_calls = 0
        self._saved = {}

    def check(self, name: str, caller_file: str, tensors) -> None:
        """Record one call of ``name`` made from ``caller_file`` with ``tensors``."""
        if SAP_DS not in caller_file:
            self.other_calls += 1
            return
        self.sap_ds_calls += 1
        where = caller_file[caller_file.rfind(SAP_DS) + 1:]
        if not where.endswith(HELPERS):
            self.violations.append(f"{where}: torch.distributed.{name} called directly, not through sap_ds.parallel.collectives")
        needs = self.needs or NEEDS.get(str(dist.get_backend()).lower())
        for t in tensors:
            if needs is not None and t.device.type != needs:
                self.violations.append(f"{where}: {name} on a {t.device} tensor, the group needs {needs}")

    def install(self) -> "CollectiveChecker":
        for name in TENSOR_COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def wrapper(*args, _name=name, _original=original, **kwargs):
                self.check(_name, sys._getframe(1).f_code.co_filename, list(_tensors(args, kwargs)))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def uninstall(self) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}
