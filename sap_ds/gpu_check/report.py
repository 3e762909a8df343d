"""Step records and the report: every step says pass / fail / skipped, its checks (each with
a verdict and the measured value behind it) and its figures; written as JSON and Markdown."""
from __future__ import annotations

import json
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from sap_ds.files import atomic_write_text

SCHEMA = "sap-ds-gpu-check/1"
STEP_NAMES = {
    1: "versions and capabilities",
    2: "Triton kernels vs their PyTorch twins",
    3: "kernel bandwidth (python -m sap_ds_kernels.bench)",
    4: "engine path: perturb, probe, restore (bf16, Triton kernels)",
    5: "bf16 perturbation table and probe-gradient noise floor",
    6: "sap-ds bench: SFT vs SAP's forms and the baselines",
    7: "preempted at step 2 (checkpoint), resumed to step 3, export loads in plain transformers",
}


class Step:
    """One step's record. ``check`` adds a verdict; ``figure`` a measured value."""

    def __init__(self, number: int):
        self.number = number
        self.checks: list[dict] = []
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []
        self.error: Optional[str] = None
        self.skipped: Optional[str] = None
        self.seconds = 0.0

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def figure(self, name: str, value: Any) -> Any:
        self.figures[name] = value
        return value

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def status(self) -> str:
        if self.skipped is not None:
            return "skipped"
        if self.error is not None or not self.checks or not all(c["ok"] for c in self.checks):
            return "fail"
        return "pass"

    def to_dict(self) -> dict:
        return {"step": self.number, "name": STEP_NAMES[self.number], "status": self.status, "seconds": self.seconds,
                "checks": self.checks, "figures": self.figures, "notes": self.notes, "error": self.error,
                "skipped": self.skipped}

    @classmethod
    def from_dict(cls, record: dict) -> "Step":
        step = cls(record["step"])
        step.checks, step.figures, step.notes = record["checks"], record["figures"], record.get("notes", [])
        step.error, step.skipped, step.seconds = record.get("error"), record.get("skipped"), record.get("seconds", 0.0)
        return step


@contextmanager
def running(step: Step):
    """Time the step; an exception becomes the step's error (the check goes on)."""
    start = time.perf_counter()
    try:
        yield step
    except Exception:  # noqa: BLE001 - any failure is reported, never fatal to the check
        step.error = traceback.format_exc(limit=6)[-3000:]
    finally:
        step.seconds = round(time.perf_counter() - start, 2)


def not_proven(cpu: bool, world: int | None) -> list[str]:
    """What a PASS of this run does not show, said in the report itself so that nobody reads
    more into it (audits/gpu-path-v2.md, C2)."""
    if cpu:
        return ["CPU mode: the Triton interpreter, gloo and CPU tensors; no compiled kernel, CUDA stream or NCCL "
                "collective runs, and the GPU-only targets (bandwidth, throughput) are not judged"]
    if world not in (None, 1):
        return []
    return ["one GPU: at world size 1 ZeRO-3's gathered weights alias the shards (DeepSpeed's NoGatherHandle), so the "
            "coalesced refresh of the gathered weights after perturb and restore, the ordering of the side streams, "
            "NCCL staging, the padding of uneven shards and gradient views across ranks are not exercised: a PASS says "
            "nothing about 8 GPUs or several nodes",
            "the smallest run that would: 2 GPUs, `deepspeed --num_gpus 2 tests/support/zero3_runner.py --inspect` "
            "and grad_accum 2 = grad_accum 1 on NCCL"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 160 else text[:157] + "..."
    return str(value)


def markdown(report: dict) -> str:
    part = f", part {report['part']}: {report['part_what']}" if report.get("part") else ""
    lines = [f"# sap-ds GPU check ({report['mode']} mode{part})", "",
             f"- date (UTC): {report['date_utc']}; commit {report.get('git_commit')}; total {report['seconds']:.0f} s",
             f"- machine: {report['machine'].get('device_name')} ({report['machine'].get('device')}); "
             f"world size of the engine steps: {report.get('engine_world_size')}",
             f"- result: **{'PASS' if report['passed'] else 'FAIL'}**"]
    lines += [f"- not proven by this run: {text}" for text in report.get("not_proven", [])]
    lines += ["", "| step | what | status | s |", "| --- | --- | --- | --- |"]
    for s in report["steps"]:
        lines.append(f"| {s['step']} | {s['name']} | {s['status']} | {s['seconds']:.1f} |")
    for s in report["steps"]:
        lines += ["", f"## {s['step']}. {s['name']}: {s['status']}"]
        if s["skipped"]:
            lines.append(f"skipped: {s['skipped']}")
        for c in s["checks"]:
            lines.append(f"- [{'x' if c['ok'] else ' '}] {c['name']}" + (f": {_fmt(c['detail'])}" if c["detail"] is not None else ""))
        for key, value in s["figures"].items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                cols = list(value[0])
                lines += ["", f"{key}:", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in value]
            else:
                lines.append(f"- {key}: {_fmt(value)}")
        for note in s["notes"]:
            lines.append(f"- note: {note}")
        if s["error"]:
            lines += ["", "```", s["error"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(report, indent=1, default=str))
    atomic_write_text(md_path, markdown(report))
    return json_path, md_path
