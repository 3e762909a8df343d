"""scripts/gpu_check.sh --cpu runs every step and writes a report whose content is right: each
step present, passing on CPU, with its figures (so the GPU mode, which shares the code,
cannot rot unnoticed). One run of the script (~1-2 min on 2 idle cores), checked by several
tests through a module-scoped fixture."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out, scratch = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("gpu_check_scratch")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(out), "--scratch", str(scratch)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    data = json.loads((out / "gpu_check.json").read_text())
    data["_exit"], data["_md"] = proc.returncode, (out / "gpu_check.md").read_text()
    return {"json": data, "steps": {s["step"]: s for s in data["steps"]}, "out": out, "scratch": scratch}


def failing_checks(step: dict) -> list[str]:
    return [c["name"] for c in step["checks"] if not c["ok"]]


def test_every_step_is_reported_and_passes_on_cpu(report):
    data, steps = report["json"], report["steps"]
    assert data["mode"] == "cpu" and data["engine_world_size"] == 2
    assert sorted(steps) == [1, 2, 3, 4, 5, 6, 7]
    for number, step in steps.items():
        assert step["error"] is None, (number, step["error"])
        assert step["checks"], number
        assert not failing_checks(step), (number, failing_checks(step))
    assert data["passed"] and data["_exit"] == 0
    for number, step in steps.items():
        assert f"## {number}. {step['name']}: {step['status']}" in data["_md"]


def test_out_holds_the_small_records_and_scratch_the_runs(report):
    """What comes back from a GPU lease is --out (at most 8 small files there); the data,
    runs, checkpoints and the export of steps 4-7 go under --scratch."""
    out, scratch = report["out"], report["scratch"]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["bench.json", "engine_steps.json", "engine_steps.log", "gpu_check.json", "gpu_check.md",
                     "install.log", "kernels_bench.json"]
    assert all((out / f).stat().st_size < 2**20 for f in files)
    assert list((scratch / "runs" / "resume" / "checkpoints").iterdir()) and (scratch / "data" / "task.jsonl").is_file()
    assert (scratch / "bench" / "bench.json").read_text() == (out / "bench.json").read_text()
    assert report["json"]["not_proven"] and "not proven by this run" in report["json"]["_md"]


def test_versions_and_kernel_figures(report):
    s1, s2, s3 = (report["steps"][n] for n in (1, 2, 3))
    assert {"torch", "triton", "transformers", "peft", "deepspeed"} <= set(s1["figures"]["versions"])
    names = [c["name"] for c in s2["checks"]]
    for n in ("1", "4,095", "1,000,003"):
        for kernel in ("perturb", "restore"):
            for dtype in ("bfloat16", "float32"):
                assert f"n={n}: {kernel} -> {dtype} bit-exact" in names
        assert any(name.startswith(f"n={n} bf16: sumsq vs fp64") for name in names)
    assert any(name.startswith("unaligned view") for name in names)
    assert any(name.startswith("NaN/inf/overflow") for name in names)
    assert "scale 0: perturb equals restore, bit for bit" in names
    rows = s3["figures"]["rows"]
    assert [r["kernel"] for r in rows] == ["sumsq", "perturb", "restore"] and all(r["GB/s"] > 0 for r in rows)


def test_engine_figures(report):
    s4, s5 = report["steps"][4], report["steps"][5]
    for label in ("full fine-tuning", "LoRA + gradient checkpointing"):
        found = s4["figures"][label]
        assert found["loss_perturbed"] != found["loss_w"] and found["restore_bit_exact"]
    gas = s4["figures"]["grad_accum"]
    assert len(gas["loss"]) == 2 and gas["probe_update_rel_diff"] >= 0
    table = s5["figures"]["perturbation"]
    assert [row["rho"] for row in table] == [0.0, 2e-5, 1e-3, 0.05]
    assert table[0]["changed_fraction"] == 0 and all(0 < row["changed_fraction"] <= 1 for row in table[1:])
    assert all(row["realized_ratio"] > 0 and -1 <= row["cosine"] <= 1 for row in table[1:])
    assert table[1]["changed_fraction"] < table[3]["changed_fraction"]  # finer steps change fewer elements
    assert set(s5["figures"]["noise_floor_rho0"]) == {"default", "deterministic"}


def test_bench_and_resume_figures(report):
    s6, s7 = report["steps"][6], report["steps"][7]
    variants = {r["variant"]: r for r in s6["figures"]["variants"]}
    assert list(variants) == ["sft", "paper", "fast", "recommended", "rec_p2_d8", "rec_kept_p4_d8", "lisa", "safety_mix"]
    assert all(r["tokens/s"] > 0 and r["peak mem GiB"] > 0 for r in variants.values())
    assert variants["paper"]["ideal"] is not None and variants["paper"]["measured/ideal"] is not None
    assert set(variants["paper"]["phases s"]) == {"safety", "perturb", "probe", "restore", "main"}
    assert variants["recommended"]["ideal"] is not None and variants["lisa"]["vs SFT"] is not None
    losses = s7["figures"]["loss_on_a_batch"]
    assert losses["engine"] > 0 and losses["exported model"] > 0
