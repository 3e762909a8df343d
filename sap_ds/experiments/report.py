"""Side-by-side summary of finished runs: ``python -m sap_ds.experiments.report RUN_DIR [RUN_DIR ...]``.

Reads each run's ``summary.json`` and ``metrics.jsonl`` and prints one markdown table:
losses, throughput, mean step time, and the per-phase split that shows where a method's
extra time goes (every method's phases, ``sap_ds.methods.all_phases``). The first run is
the baseline for the step-time ratio.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sap_ds.entry import run_command
from sap_ds.methods import all_phases


def load_run(folder: Path) -> dict:
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: no summary; did the run finish?")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    timed = [r for r in records if "step_time_s" in r][1:] or [r for r in records if "step_time_s" in r]  # skip warm-up
    mean = lambda key: sum(r.get(key, 0.0) or 0.0 for r in timed) / max(1, len(timed))  # noqa: E731
    summary["mean_step_time_s"] = mean("step_time_s")
    summary["phases"] = {p: mean(f"time/{p}") for p in all_phases()}
    return summary


def table(runs: dict[str, dict]) -> str:
    base = next(iter(runs.values()))["mean_step_time_s"]
    phases = all_phases()
    head = "| run | method | steps | train loss | eval loss | tokens/s | step time (s) | vs first | " + " | ".join(phases) + " |"
    rule = "|" + "---|" * (8 + len(phases))
    rows = [head, rule]
    for name, s in runs.items():
        ratio = s["mean_step_time_s"] / base if base else float("nan")
        cells = [name, s["method"], str(s["final_step"]), f"{s['final_train_loss']:.4f}",
                 f"{s['final_eval_loss']:.4f}" if s["final_eval_loss"] is not None else "n/a",
                 f"{s['tokens_per_s']:.1f}", f"{s['mean_step_time_s']:.3f}", f"{ratio:.2f}x"]
        cells += [f"{s['phases'][p]:.3f}" for p in phases]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    folders = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not folders:
        print("usage: python -m sap_ds.experiments.report RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    return run_command(lambda: print_table(folders))


def print_table(folders: list[Path]) -> int:
    print(table({str(f): load_run(f) for f in folders}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
