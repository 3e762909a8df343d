"""The CPU allocator settings, measured: the same training run with glibc's default malloc and
with sap-ds's ``GLIBC_TUNABLES`` (sap_ds.parallel.distributed.CPU_MALLOC_TUNABLES), launched
alternately, printing each launch's median step time, wall time and CPU seconds (user and
kernel, of every process of the launch).

    python scripts/bench_cpu_allocator.py --config tiny --steps 12 --repeats 2 method=sap

Runs through the DeepSpeed launcher on ``--nproc`` CPU ranks (one rank: plain python), from
a temporary folder; the extra arguments are run-config overrides. docs/benchmarks.md, "The
CPU allocator", has the figures it printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sap_ds.experiments.runs import launch_command  # noqa: E402
from sap_ds.parallel.distributed import CPU_MALLOC_TUNABLES, cpu_process_env  # noqa: E402


def children_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def one_launch(args, tunables: bool, folder: Path) -> dict:
    env = cpu_process_env({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    if not tunables:  # sap-ds's CPU environment but for the allocator settings
        del env["GLIBC_TUNABLES"]
    out = folder / ("tunables" if tunables else "default")
    cmd = [*launch_command("train.py", args.nproc), "--config", args.config, f"output_dir={out}",
           f"train.max_steps={args.steps}", "train.eval_every=0", "export.enabled=false", "train.resume=never",
           *args.overrides]
    user0, sys0 = children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    user1, sys1 = children_cpu()
    if proc.returncode != 0:
        sys.exit(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_time_s"] for r in records if "step_time_s" in r][1:]  # the first step warms up
    return {"step": statistics.median(steps), "wall": wall, "user": user1 - user0, "sys": sys1 - sys0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="run-config overrides, key=value")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps: at least 3 (the first step is left out of the median)")
    rows = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for tunables in (False, True) if repeat % 2 == 0 else (True, False):
                rows[tunables].append(one_launch(args, tunables, Path(tmp) / str(repeat)))
    print(f"{args.config} {' '.join(args.overrides)}: {args.steps} steps on {args.nproc} CPU rank(s), "
          f"{args.repeats} launch(es) each, alternating")
    print(f"sap-ds's GLIBC_TUNABLES: {CPU_MALLOC_TUNABLES}")
    print(f"{'allocator':<16} {'median step s':>13} {'wall s':>7} {'user s':>7} {'kernel s':>8}")
    for tunables, label in ((False, "glibc default"), (True, "sap-ds's")):
        runs = rows[tunables]
        mean = {key: statistics.mean(r[key] for r in runs) for key in ("step", "wall", "user", "sys")}
        print(f"{label:<16} {mean['step']:>13.3f} {mean['wall']:>7.1f} {mean['user']:>7.1f} {mean['sys']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
