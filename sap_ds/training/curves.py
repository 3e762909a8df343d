"""``<output_dir>/curves.png``: a run's train and eval loss against step, with the learning
rate in a panel below, drawn from ``metrics.jsonl`` when the run finishes. The file holds
every start of the run (a resumed run's earlier segments too), so the plot shows the whole
run; a step logged twice (by a start that died after its last checkpoint, and again by the
start that redid it) is drawn as the later start logged it."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from sap_ds.files import atomic_save_figure

log = logging.getLogger("sap_ds")

CURVES = "curves.png"


def read_steps(metrics_path: Path) -> dict[int, dict]:
    """Step -> its record, later records laid over earlier ones for the same step (the final
    eval of a start that ran no step is a record of its own at the last step). A line that
    is not JSON (cut short by a crash) is skipped with a warning."""
    by_step: dict[int, dict] = {}
    for number, line in enumerate(Path(metrics_path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s:%d is not JSON (a line cut short?): left out of %s", metrics_path, number, CURVES)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step.setdefault(record["step"], {}).update(record)
    return by_step


def _value(record: dict, key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def curve_series(metrics_path: Path) -> dict[str, list]:
    """What the plot draws: ``steps`` with ``loss`` and ``lr`` (NaN where a step has none:
    a gap), and ``eval_steps`` with ``eval_loss``."""
    by_step = read_steps(metrics_path)
    steps = sorted(s for s, r in by_step.items() if "loss" in r or "lr" in r)
    evals = sorted(s for s, r in by_step.items() if r.get("eval_loss") is not None)
    return {"steps": steps, "loss": [_value(by_step[s], "loss") for s in steps],
            "lr": [_value(by_step[s], "lr") for s in steps],
            "eval_steps": evals, "eval_loss": [_value(by_step[s], "eval_loss") for s in evals]}


def write_curves(out_dir: Path, title: str) -> Path:
    """Draw ``out_dir/metrics.jsonl`` into ``out_dir/curves.png`` (written atomically);
    ValueError when it holds no step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    series = curve_series(out_dir / "metrics.jsonl")
    if not series["steps"] and not series["eval_steps"]:
        raise ValueError(f"{out_dir / 'metrics.jsonl'} holds no logged step")
    marker = "." if len(series["steps"]) <= 50 else None  # a short run's steps stay visible as points
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, sharex=True, figsize=(7.0, 5.0), height_ratios=(2, 1))
    loss_ax.plot(series["steps"], series["loss"], marker=marker, linewidth=1.2, label="train loss")
    if series["eval_steps"]:
        loss_ax.plot(series["eval_steps"], series["eval_loss"], marker="o", linewidth=1.2, label="eval loss")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="best", fontsize=8)
    loss_ax.set_title(title, fontsize=9)
    lr_ax.plot(series["steps"], series["lr"], color="tab:green", marker=marker, linewidth=1.2)
    lr_ax.set_ylabel("lr")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    path = out_dir / CURVES
    atomic_save_figure(fig, path, dpi=110)
    return path
