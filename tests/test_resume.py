"""Exact resume: a run stopped at step k and resumed ends bitwise where an uninterrupted
run ends (fp32, CPU), for SFT and SAP (probe, probe optimizer, direction, RNG, data order)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_single

STEPS = 4


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _run(out, method, extra=(), env=None):
    args = ["--config", "configs/tiny.yaml", f"output_dir={out}", f"method={method}", f"train.max_steps={STEPS}",
            "train.eval_every=0", "sap.probe_reset=false", "sap.safety_every=2", "sap.rho=0.05", *extra]
    proc = run_single(args, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("method", ["sft", "sap"])
def test_resume_after_stop_is_bitwise_identical(tmp_path, method):
    straight = tmp_path / "straight"
    _run(straight, method)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    stop = resumed / "STOP"
    stop.touch()
    proc = _run(resumed, method)
    assert "stopped at step 1" in proc.stdout
    assert (resumed / "REQUEUE").exists() and not (resumed / "summary.json").exists()
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    stop.unlink()
    _run(resumed, method)
    assert not (resumed / "REQUEUE").exists()

    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["final_step"] == STEPS and summary["steps_this_run"] == STEPS - 1
    assert _losses(resumed) == _losses(straight)
    a = load_file(str(straight / "export" / "model" / "model.safetensors"))
    b = load_file(str(resumed / "export" / "model" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    if method == "sap":
        pa = load_file(str(straight / "export" / "probe.safetensors"))["probe"]
        pb = load_file(str(resumed / "export" / "probe.safetensors"))["probe"]
        assert pa.abs().max() > 0 and torch.equal(pa, pb)
