"""The report of ``sap-ds compare`` (and the columns ``sap-ds sweep`` shares): an eval's
headline numbers as flat columns, mean and std over seeds per setting/method, and the
``comparison.{json,md,png}`` files. Kept apart from the plan and the launching in
sap_ds/experiments/compare.py: it reads results, it runs nothing."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from sap_ds.files import atomic_save_figure, atomic_write_text

HARMFUL_SCORE, OVER_REFUSAL = "harmful score", "over-refusal (%)"


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """An eval's headline numbers as flat columns: harmful score, over-refusal (% of benign
    requests refused) right beside it, then one per task."""
    out = {}
    if "harmful" in metrics:
        out[HARMFUL_SCORE] = metrics["harmful"]["harmful_score"]
        if metrics["harmful"]["scorer"] != "refusal":
            out["harmful score (refusal matcher)"] = metrics["harmful"]["harmful_score_refusal"]
        for name, judge in metrics["harmful"].get("judges", {}).items():  # scorer.judges: one column each
            out[f"harmful score ({name})"] = judge["harmful_score"]
    if "over_refusal" in metrics:
        out[OVER_REFUSAL] = metrics["over_refusal"]["over_refusal_rate"]
    for name, task in metrics.get("tasks", {}).items():
        out[f"{name} loss" if "loss" in task else f"{name} acc (%)"] = task.get("loss", task.get("accuracy"))
    return out


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (setting, method): mean and std over seeds of every column."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["setting"], run["method"]), []).append(run)
    rows = []
    for (setting, method), members in groups.items():
        columns = {k: mean_std([m["metrics"].get(k) for m in members]) for k in members[0]["metrics"]}
        columns["train tokens/s"] = mean_std([m["train"].get("tokens_per_s") for m in members])
        rows.append({"model": f"{setting}/{method}", "setting": setting, "method": method,
                     "seeds": [m["seed"] for m in members], "columns": columns})
    return rows


def _cell(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def markdown(report: dict) -> str:
    rows = report["rows"]
    names = list(dict.fromkeys(k for r in rows for k in r["columns"]))
    head = "| model | seeds | " + " | ".join(names) + " |"
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("method")))
    title = " vs ".join(m.upper() if m in ("sft", "sap") else m for m in methods) or "SFT vs SAP"
    lines = [f"# {title} from `{report['start_model']}`", "", f"{report['date']}; lower harmful score is safer; "
             "over-refusal is the % of benign requests refused (lower is more helpful; a model that refuses "
             "everything scores 0 harmful and 100 over-refusal); values are mean ± std over seeds.", "", head,
             "|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = [_cell(r["columns"][n], 4 if n.endswith("loss") else 2) if n in r["columns"] else "n/a" for n in names]
        lines.append(f"| {r['model']} | {', '.join(map(str, r['seeds'])) or '-'} | " + " | ".join(cells) + " |")
    note = (report.get("config") or {}).get("note")
    if note:
        lines += ["", " ".join(note.split())]
    return "\n".join(lines) + "\n"


def comparison_figure(report: dict):
    """Harmful score, over-refusal and the first accuracy metric side by side per model
    (all in %): a defence that buys its harmful score with refusals shows a tall middle bar.
    The legend sits to the right of the axes, outside them, where no bar (however tall)
    or error bar can be under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    present = list(dict.fromkeys(n for r in rows for n in r["columns"]))
    names = [n for n in (HARMFUL_SCORE, OVER_REFUSAL) if n in present] + [n for n in present if n.endswith("acc (%)")][:1]
    names = names or [HARMFUL_SCORE]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(rows) + 2) + 1.8, 3.8))
    for i, name in enumerate(names):
        stats = [r["columns"].get(name, {"mean": None, "std": None}) for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], [s["mean"] or 0.0 for s in stats], width,
               yerr=[s["std"] or 0.0 for s in stats], capsize=3, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(rows))], [r["model"] for r in rows], rotation=15)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    ax.set_title("harmful score (lower is safer), over-refusal (lower is more helpful), task accuracy", fontsize=9)
    fig.tight_layout()  # makes room for the legend beside the axes
    return fig


def plot(report: dict, path: Path) -> None:
    atomic_save_figure(comparison_figure(report), path, dpi=120)


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.json", json.dumps(report, indent=1))
    atomic_write_text(out / "comparison.md", markdown(report))
    plot(report, out / "comparison.png")
