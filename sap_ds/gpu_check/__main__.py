"""``python -m sap_ds.gpu_check --out DIR [--cpu]``: run the GPU check and write its report.

Normally started by ``scripts/gpu_check.sh``, which installs missing packages from wheels
and sets the environment (TRITON_INTERPRET=1 and DS_ACCELERATOR=cpu for ``--cpu``). Steps
1-3 run in this process; steps 4-7 in one ``torch.distributed.run`` launch (1 rank on a
GPU, 2 gloo ranks on CPU). Exit code 0 when every step that ran passed, 1 otherwise.
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
from pathlib import Path

from sap_ds.gpu_check.report import STEP_NAMES, Step, running, write_report
from sap_ds.version import commit

REPO = Path(__file__).resolve().parents[2]
ENGINE_STEPS = (4, 5, 6, 7)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the step outputs")
    parser.add_argument("--cpu", action="store_true", help="no GPU: CPU sizes, Triton interpreter, 2 gloo ranks")
    parser.add_argument("--steps", default="1,2,3,4,5,6,7", help="comma-separated subset of the steps")
    parser.add_argument("--engine-timeout", type=int, default=None, help="seconds for steps 4-7 (default GPU 420, CPU 600)")
    return parser.parse_args(argv)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine_steps(out: Path, cpu: bool, steps: list[int], timeout: int) -> tuple[list[Step], int, str]:
    """Launch steps 4-7; a step the launch did not reach is a failure carrying the log's tail."""
    nproc = 2 if cpu else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "sap_ds.gpu_check.engine_check",
           "--out", str(out), "--steps", ",".join(map(str, steps))] + (["--cpu"] if cpu else [])
    log_path = out / "engine_steps.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
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
    wanted = sorted({int(s) for s in args.steps.split(",") if s.strip()})
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
        timeout = args.engine_timeout or (600 if args.cpu else 420)
        engine_steps, world, command = run_engine_steps(out, args.cpu, engine, timeout)
        for step in engine_steps:
            print(f"gpu_check: step {step.number} ({STEP_NAMES[step.number]}): {step.status} in {step.seconds:.1f} s", flush=True)
        steps += engine_steps
    report = {"schema": "sap-ds-gpu-check/1", "mode": "cpu" if args.cpu else "gpu", "date_utc": date, "git_commit": str(commit()),
              "machine": machine(), "engine_world_size": world, "engine_command": command,
              "command": " ".join(["gpu_check", *(argv if argv is not None else sys.argv[1:])]),
              "seconds": round(time.perf_counter() - start, 1), "steps": [s.to_dict() for s in sorted(steps, key=lambda s: s.number)]}
    report["passed"] = all(s["status"] != "fail" for s in report["steps"])
    json_path, md_path = write_report(out, report)
    print(f"gpu_check: {'PASS' if report['passed'] else 'FAIL'} in {report['seconds']:.0f} s; report: {json_path}, {md_path}",
          flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
