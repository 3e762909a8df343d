"""Where the suite's CPU time goes: a pytest plugin that appends one line per test to
``$SAP_DS_CPU_LOG`` (its worker, node id, start and end time, and the CPU seconds, user and
kernel, of the test's process and of every child it waited for: a launch's ranks included),
and a summary of such a file by test file.

    SAP_DS_CPU_LOG=runs/cpu.jsonl make test PYTEST_ADDOPTS="-p tests.support.cpu_log"
    python -m tests.support.cpu_log runs/cpu.jsonl

On 2 cores the suite's wall time is about its CPU time over 2 (both cores stay busy), so this,
not a test's wall time under the other worker's load, says what a change saves.
"""
from __future__ import annotations

import collections
import json
import os
import resource
import sys
import time

import pytest

LOG_ENV = "SAP_DS_CPU_LOG"


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get(LOG_ENV)
    start, cpu = time.time(), _cpu_seconds()
    yield
    if path:
        line = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "-"), "test": item.nodeid, "start": start,
                "end": time.time(), "cpu_s": _cpu_seconds() - cpu}
        with open(path, "a", encoding="utf-8") as handle:  # one short line per write: workers append safely
            handle.write(json.dumps(line) + "\n")


def summary(path: str, top: int = 25) -> str:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    if not rows:
        return f"{path}: no tests recorded"
    by_file, wall_by_file = collections.Counter(), collections.Counter()
    for row in rows:
        name = row["test"].split("::")[0]
        by_file[name] += row["cpu_s"]
        wall_by_file[name] += row["end"] - row["start"]
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    lines = [f"{len(rows)} tests, {sum(by_file.values()):.0f} CPU s over {span:.0f} s from the first start to the last end",
             f"{'CPU s':>8} {'wall s':>8}  file"]
    lines += [f"{cpu:8.1f} {wall_by_file[name]:8.1f}  {name}" for name, cpu in by_file.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.support.cpu_log FILE")
    print(summary(sys.argv[1]))
