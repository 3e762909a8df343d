"""``sap-ds bench`` runs each variant's check before step 1, as training does (issue 31,
item 14): a variant at a rho the bf16 working weights cannot hold is refused under
``sap.resolution_check: error`` (naming the variant and the key that lets it run), and under
``warn`` it is measured and its record is labelled as a throughput-only measurement, with
the check's figures; a variant the check passes carries no label. One CPU rank, the tiny
bf16 Llama at the paper's rho 2e-5 (tests/test_resolution.py: where the check stops train.py)."""
from __future__ import annotations

import json

from tests.support.launch import launch

BENCH = ["sap_ds/bench.py", "--config", "configs/tiny.yaml", "--warmup", "0", "--steps", "1", "--no-plot"]
BF16_PAPER_RHO = ["model.dtype=bf16", "sap.rho=2e-5", "data.max_length=64", "data.safety_max_length=48", "data.eval=[]",
                  "data.train=[{path: data/alpaca/seed_tasks.jsonl, format: alpaca_seed, limit: 8}]"]


def test_a_variant_the_preflight_refuses_stops_the_bench(tmp_path):
    out = tmp_path / "bench.json"
    proc = launch([*BENCH, "--out", str(out), "--variants", "paper", *BF16_PAPER_RHO], nproc=1, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sap-ds: error:")]
    assert errors and "bench variant 'paper'" in errors[0] and "sap.rho=2e-05" in errors[0], proc.stderr[-3000:]
    assert "sap.resolution_check=warn" in errors[0]
    assert not out.exists()


def test_under_warn_the_variant_is_labelled_throughput_only(tmp_path):
    out = tmp_path / "bench.json"
    proc = launch([*BENCH, "--out", str(out), "--variants", "sft,paper", *BF16_PAPER_RHO, "sap.resolution_check=warn"],
                  nproc=1, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sft, paper = json.loads(out.read_text())["variants"]
    assert sft["throughput_only"] is None
    label = paper["throughput_only"]
    assert label and "sap.rho=2e-05" in label and "realised/intended norm" in label, label
    assert "throughput only" in proc.stdout  # the console table says it too
