"""The kernel benchmark runs on CPU and writes its JSON and CSV records (timings not asserted)."""
import csv
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FIELDS = {"device", "device_type", "peak_bandwidth_TBps", "date_utc", "git_commit",
                 "torch_version", "triton_version"}
ROW_FIELDS = {"kernel", "numel", "bytes_moved", "median_ms", "GBps", "peak_fraction",
              "unfused_median_ms", "unfused_GBps", "speedup"}


def test_bench_writes_json_and_csv_records(tmp_path):
    out_json, out_csv = tmp_path / "bench.json", tmp_path / "bench.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "sap_ds_kernels.bench", "--sizes", "1M", "--repeats", "2",
         "--out-json", str(out_json), "--out-csv", str(out_csv)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    assert "timing the PyTorch twins" in result.stdout

    record = json.loads(out_json.read_text())
    assert RECORD_FIELDS <= set(record)
    assert [r["kernel"] for r in record["rows"]] == ["sumsq", "perturb", "restore"]
    assert all(ROW_FIELDS <= set(r) and r["numel"] == 2**20 for r in record["rows"])
    assert record["rows"][1]["bytes_moved"] == 2**20 * (4 + 4 + 2)  # perturb, bf16 out

    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and (RECORD_FIELDS | ROW_FIELDS) <= set(rows[0])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes left no temp file
