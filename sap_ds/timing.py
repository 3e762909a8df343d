"""Time per phase of a training step, for every method: ``PhaseTimer``.

A method names the phases its step runs (``sap_ds.methods.base.Method.phases``: SFT's is
the trainer's main pass, SAP adds its safety, perturb, probe and restore phases); the
trainer logs them as ``time/<phase>`` on the steps it logs, and the bench reports them per
variant. Kept low in the house, apart from any one method, because every method times its
step with it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable

import torch


class PhaseTimer:
    """Time per phase, without synchronising the device while the step runs.

    On CUDA each phase is bracketed by two timing events on the current stream; the
    elapsed times are read in ``pop`` (one synchronisation, on the last event), which
    the trainer calls only on a step it logs (``discard`` drops the others unread). On
    CPU the phase's wall time is taken directly (nothing runs asynchronously there).
    ``pop`` reports every phase given at construction, 0 for one that did not run."""

    def __init__(self, phases: Iterable[str]):
        self.phases = tuple(phases)
        self.totals = {name: 0.0 for name in self.phases}
        self._events: list = []  # (phase, start event, end event), read by pop()
        self._cuda = torch.cuda.is_available()

    @contextmanager
    def __call__(self, name: str):
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((name, start, end))
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - begin

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last pop or discard."""
        if self._events:
            self._events[-1][2].synchronize()  # events complete in stream order: the last one is enough
            for name, start, end in self._events:
                self.totals[name] += start.elapsed_time(end) / 1e3
        out = self.totals
        self.discard()
        return out

    def discard(self) -> None:
        """Forget the phases since the last pop, without reading (or waiting for) them."""
        self.totals = {name: 0.0 for name in self.phases}
        self._events = []
