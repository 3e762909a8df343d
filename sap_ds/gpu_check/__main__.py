"""``python -m sap_ds.gpu_check --out DIR [--part 1|2] [--scratch DIR] [--cpu]``: run the GPU
check (or one of its two parts) and write its report.

Normally started by ``scripts/gpu_check.sh``, which installs missing packages from wheels
and sets the environment (TRITON_INTERPRET=1 and DS_ACCELERATOR=cpu for ``--cpu``). Steps
1-3 run in this process; steps 4-7 in one ``torch.distributed.run`` launch (1 rank on a
GPU, 2 gloo ranks on CPU). ``--out`` gets the report and small records only; the runs,
checkpoints and exports go under ``--scratch``. Exit code 0 when every step that ran passed,
1 otherwise.

On a GPU the check runs as two parts of at most ~5 minutes each (``PARTS``), so that each
fits one command of a short GPU lease with time to spare for a rerun: part 1 proves
correctness (versions, kernels vs twins, the engine path, the bf16 table, preemption and
resume), part 2 measures speed (kernel bandwidth, the ``sap-ds bench``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sap_ds.gpu_check.report import SCHEMA, STEP_NAMES, Step, not_proven, running, write_report
from sap_ds.version import commit

REPO = Path(__file__).resolve().parents[2]
ENGINE_STEPS = (4, 5, 6, 7)
# GPU seconds per step on one H100/H200, estimated from the code reading of
# audits/gpu-path-v2.md section 3 (never measured: no GPU has run the check yet): step 2
# compiles ~20-30 Triton specializations (30-60 s) and runs the 2^31 + 17 case; step 4 builds
# three 0.5B engines (~10-15 s each); step 6 runs 8 bench variants of the 1.1B model, each
# its own engine (~10-15 s) and 18-24 steps; step 7 two 0.5B trainers, three checkpoint saves
# (~7 GB each) and an export. The engine launch first spends ~25 s on imports.
STEP_ESTIMATE_S = {1: 10, 2: 90, 3: 45, 4: 55, 5: 10, 6: 180, 7: 75}
ENGINE_START_S = 25
PART_BUDGET_S = 300  # a part must fit one command of a short GPU lease, with room to rerun it
CPU_ENGINE_TIMEOUT_S, GPU_ENGINE_TIMEOUT_S = 600, 420  # --steps without --part


@dataclass(frozen=True)
class Part:
    """One invocation of the check on a GPU: its steps, what they prove, and the GPU default
    of ``--engine-timeout`` (its local steps' estimate plus the timeout fits PART_BUDGET_S)."""

    steps: tuple[int, ...]
    what: str
    engine_timeout_s: int


PARTS = {
    1: Part((1, 2, 4, 5, 7), "correctness: kernels vs their twins, the engine path, the bf16 table, preemption and resume",
            200),
    2: Part((1, 3, 6), "speed: kernel bandwidth and the sap-ds bench", 240),
}


def estimate_s(steps) -> int:
    """Estimated GPU seconds of these steps (STEP_ESTIMATE_S), the engine launch's start included."""
    return sum(STEP_ESTIMATE_S[s] for s in steps) + (ENGINE_START_S if set(steps) & set(ENGINE_STEPS) else 0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True,
                        help="folder for gpu_check.json, gpu_check.md and the steps' small records (logs, JSON)")
    parser.add_argument("--scratch", default=None,
                        help="folder for the runs, checkpoints (GBs on a GPU) and exports of steps 4-7 (default: OUT/scratch)")
    parser.add_argument("--cpu", action="store_true", help="no GPU: CPU sizes, Triton interpreter, 2 gloo ranks")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--part", type=int, choices=sorted(PARTS),
                       help="; ".join(f"{n}: steps {','.join(map(str, p.steps))} ({p.what})" for n, p in PARTS.items()))
    which.add_argument("--steps", default=None, help="comma-separated subset of the steps (default: all, 1-7)")
    parser.add_argument("--engine-timeout", type=int, default=None,
                        help="seconds for the launch of steps 4-7 (default: the part's, "
                             + ", ".join(f"{n}: {p.engine_timeout_s}" for n, p in PARTS.items())
                             + f"; without --part GPU {GPU_ENGINE_TIMEOUT_S}; CPU always {CPU_ENGINE_TIMEOUT_S})")
    return parser.parse_args(argv)


def engine_timeout(args) -> int:
    if args.engine_timeout:
        return args.engine_timeout
    if args.cpu:
        return CPU_ENGINE_TIMEOUT_S
    return PARTS[args.part].engine_timeout_s if args.part else GPU_ENGINE_TIMEOUT_S


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine_steps(out: Path, scratch: Path, cpu: bool, steps: list[int], timeout: int) -> tuple[list[Step], int, str]:
    """Launch steps 4-7; a step the launch did not reach is a failure carrying the log's tail."""
    nproc = 2 if cpu else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "sap_ds.gpu_check.engine_check",
           "--out", str(out), "--scratch", str(scratch), "--steps", ",".join(map(str, steps))] + (["--cpu"] if cpu else [])
    log_path = out / "engine_steps.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if 5 in steps and not cpu:
        # deterministic cuBLAS for step 5's noise floor under torch.use_deterministic_algorithms;
        # only there: the bench (step 6) times cuBLAS with its default workspace
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with open(log_path, "w", encoding="utf-8") as log:
        # Its own session: on a timeout the launcher and every rank are killed together (the
        # trainer catches SIGTERM to checkpoint, so SIGKILL).
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -1
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
    done = {}
    record = out / "engine_steps.json"
    world = None
    if record.is_file():
        saved = json.loads(record.read_text())
        world = saved["world_size"]
        done = {s["step"]: Step.from_dict(s) for s in saved["steps"]}
    result = []
    for number in steps:
        if number in done:
            result.append(done[number])
            continue
        step = Step(number)
        step.error = (f"the engine launch ended (exit {code}{', timed out after %d s' % timeout if code == -1 else ''}) "
                      f"before this step finished; log {log_path}:\n{tail}")
        result.append(step)
    return result, world or nproc, " ".join(cmd)


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(device="cuda", device_name=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count())
    else:
        info.update(device="cpu", device_name=platform.processor() or platform.machine())
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch).resolve() if args.scratch else out / "scratch"
    if args.part:
        wanted = list(PARTS[args.part].steps)
    else:
        wanted = sorted({int(s) for s in (args.steps or ",".join(map(str, STEP_NAMES))).split(",") if s.strip()})
    unknown = [s for s in wanted if s not in STEP_NAMES]
    if unknown:
        print(f"gpu_check: unknown steps {unknown}; steps are 1-7", file=sys.stderr)
        return 2
    start = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    from sap_ds.gpu_check import kernels_check

    steps: list[Step] = []
    local = {1: lambda s: kernels_check.versions_step(s, args.cpu, out), 2: lambda s: kernels_check.kernels_step(s, args.cpu),
             3: lambda s: kernels_check.bandwidth_step(s, args.cpu, out)}
    for number in [n for n in wanted if n in local]:
        step = Step(number)
        with running(step):
            local[number](step)
        steps.append(step)
        print(f"gpu_check: step {number} ({STEP_NAMES[number]}): {step.status} in {step.seconds:.1f} s", flush=True)
    engine = [n for n in wanted if n in ENGINE_STEPS]
    world, command = None, None
    if engine:
        engine_steps, world, command = run_engine_steps(out, scratch, args.cpu, engine, engine_timeout(args))
        for step in engine_steps:
            print(f"gpu_check: step {step.number} ({STEP_NAMES[step.number]}): {step.status} in {step.seconds:.1f} s", flush=True)
        steps += engine_steps
    report = {"schema": SCHEMA, "mode": "cpu" if args.cpu else "gpu", "date_utc": date, "git_commit": str(commit()),
              "part": args.part, "part_what": PARTS[args.part].what if args.part else None,
              "machine": machine(), "engine_world_size": world, "engine_command": command,
              "scratch": str(scratch), "not_proven": not_proven(args.cpu, world),
              "command": " ".join(["gpu_check", *(argv if argv is not None else sys.argv[1:])]),
              "seconds": round(time.perf_counter() - start, 1), "steps": [s.to_dict() for s in sorted(steps, key=lambda s: s.number)]}
    report["passed"] = all(s["status"] != "fail" for s in report["steps"])
    json_path, md_path = write_report(out, report)
    print(f"gpu_check: {'PASS' if report['passed'] else 'FAIL'} in {report['seconds']:.0f} s; report: {json_path}, {md_path}",
          flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
