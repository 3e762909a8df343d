"""The report of a sweep: the table (``sweep.md``), its data (``sweep.json``), the plot
(``sweep.png``: the task metric against the harmful score, the reference curve drawn as a
line, over-refusal beside it) and each point's paired differences from ``reference`` and
``matched_reference`` (``sap_ds.experiments.paired``, read from the runs' eval.json),
written from the runs' records into a folder. It takes the sweep's config
(``sap_ds.experiments.sweep_config``), not the runner (``sap_ds.experiments.sweep``), so
that reading results never imports the launching side."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from sap_ds.experiments.columns import TOKENS_PER_S, over_refusal_column
from sap_ds.experiments.comparison_report import (incoherence_warnings, legend, mean_std, mostly_incoherent,
                                                  table_columns)
from sap_ds.experiments.paired import markdown as paired_markdown
from sap_ds.experiments.paired import paired_rows
from sap_ds.experiments.sweep_config import SweepConfig
from sap_ds.files import atomic_save_figure, atomic_write_text


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Names of the points no other point beats on both axes (lower is better on both)."""
    front = set()
    for name, x, y in points:
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for n2, x2, y2 in points if n2 != name)
        if not dominated:
            front.add(name)
    return front


def summarise(cfg: SweepConfig, records: list[dict], start_metrics: Optional[dict], stages: Optional[dict] = None) -> dict:
    """The table's data; ``stages``: each alignment stage's row (``sap_ds.experiments.stages``;
    None where it has not been evaluated), shown as 'start model <name>'."""
    done = [r for r in records if r["status"] == "done"]
    by_point: dict[str, list[dict]] = {}
    for r in done:
        by_point.setdefault(r["point"], []).append(r)
    columns = list(dict.fromkeys(k for r in done for k in r["metrics"]))
    task = cfg.task_metric or next((c for c in columns if c.endswith("loss")), None)
    rows = []
    for point, members in by_point.items():
        stats = {c: mean_std([m["metrics"].get(c) for m in members]) for c in columns}
        stats[TOKENS_PER_S] = mean_std([m["train"].get("tokens_per_s") for m in members])
        rows.append({"point": point, "seeds": sorted(m["seed"] for m in members), "columns": stats})
    xy = [(r["point"], r["columns"][cfg.harm_metric]["mean"], r["columns"][task]["mean"]) for r in rows
          if task and cfg.harm_metric in r["columns"] and r["columns"][cfg.harm_metric]["mean"] is not None
          and r["columns"][task]["mean"] is not None]
    front = pareto_front(xy)
    ref = next((r for r in rows if r["point"] == cfg.reference), None)
    for r in rows:
        r["pareto"] = r["point"] in front
        if ref is not None and task:
            harm, ref_harm = r["columns"][cfg.harm_metric]["mean"], ref["columns"][cfg.harm_metric]["mean"]
            loss, ref_loss = r["columns"][task]["mean"], ref["columns"][task]["mean"]
            r["vs_reference"] = {"harm_ratio": harm / ref_harm if ref_harm else None,
                                 "task_loss_change": loss / ref_loss - 1 if ref_loss else None}
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg.model_dump(mode="json"),
            "harm_metric": cfg.harm_metric, "task_metric": task, "start": start_metrics, "rows": rows,
            "starts": {name: row for name, row in (stages or {}).items()},
            "paired": paired_points(cfg, done),
            "failed": [{"point": r["point"], "seed": r["seed"], "error": r["error"]} for r in records if r["status"] != "done"]}


def paired_points(cfg: SweepConfig, done: list[dict]) -> list[dict]:
    """Every point against ``reference`` and ``matched_reference`` (those configured), from
    the finished runs' ``<run_dir>/<eval_dir>/eval.json``: works as well from a report
    rebuilt off disk (``--report``) as after a run."""
    groups: dict[str, dict[int, Path]] = {}
    starts: dict[str, Optional[str]] = {}
    for r in done:
        groups.setdefault(r["point"], {})[r["seed"]] = Path(r["run_dir"]) / cfg.eval_dir / "eval.json"
        starts[r["point"]] = r.get("start")
    pairs = [(point, ref, kind) for kind, ref in (("reference", cfg.reference), ("matched reference", cfg.matched_reference))
             if ref is not None for point in groups]
    # two-stage sweeps: a point is compared with reference whatever its start (an alignment defence IS its start),
    # and with its own start's reference too (start_references: what the fine-tune adds on that start)
    pairs += [(point, cfg.start_references[start], "same-start reference") for point, start in starts.items()
              if start in cfg.start_references and cfg.start_references[start] not in (cfg.reference, cfg.matched_reference)]
    return paired_rows(groups, pairs)


def _cell(stat: Optional[dict], digits: int) -> str:
    if not stat or stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def shown_path(path: str) -> str:
    """A config path as a report shows it: relative to the working directory when it lies
    under it (config paths arrive resolved, and a machine's absolute path pasted into docs
    means nothing on another), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def markdown(summary: dict) -> str:
    harm, task = summary["harm_metric"], summary["task_metric"]
    names = table_columns(summary["rows"], harm, (task,) if task else ())  # harm, over-refusal, coherence, task, ...
    has_ref = any("vs_reference" in r for r in summary["rows"])
    head = ["point", "seeds", *names] + (["harm / ref", "task loss vs ref"] if has_ref else []) + ["Pareto"]
    lines = [f"# sweep of `{shown_path(summary['config']['train_config'])}`", "",
             f"{summary['date']}; mean ± std over seeds; {legend(names, harm)}; Pareto: not beaten "
             f"on both {harm} and {task} by another point.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if summary["start"]:
        values = summary["start"]
        start = [("n/a" if values.get(n) is None else f"{values[n]:.4f}" if n.endswith("loss") else f"{values[n]:.2f}")
                 if n in values else "-" for n in names]
        lines.append("| start model | - | " + " | ".join(start + ["-"] * (len(head) - 2 - len(start))) + " |")
    for name, stage in (summary.get("starts") or {}).items():  # the alignment stages: one run each, its seed
        values = stage["metrics"] if stage else {}
        cells = [("n/a" if values.get(n) is None else f"{values[n]:.4f}" if n.endswith("loss") else f"{values[n]:.2f}")
                 if n in values else "-" for n in names]
        lines.append(f"| start model {name} | {stage['seed'] if stage else '-'} | "
                     + " | ".join(cells + ["-"] * (len(head) - 2 - len(cells))) + " |")
    for r in sorted(summary["rows"], key=lambda r: (r["columns"].get(harm, {}).get("mean") or 0.0)):
        cells = [_cell(r["columns"].get(n), 4 if n.endswith("loss") else 2) for n in names]
        if has_ref:
            ref = r.get("vs_reference", {})
            ratio, change = ref.get("harm_ratio"), ref.get("task_loss_change")
            cells += ["n/a" if ratio is None else f"{ratio:.2f}", "n/a" if change is None else f"{100 * change:+.2f} %"]
        lines.append(f"| {r['point']} | {', '.join(map(str, r['seeds']))} | " + " | ".join(cells) + f" | {'yes' if r['pareto'] else ''} |")
    warnings = incoherence_warnings(summary["rows"], "point")
    if warnings:
        lines += ["", *warnings]
    lines += paired_markdown(summary.get("paired") or [], "point", {r["point"] for r in mostly_incoherent(summary["rows"])})
    for f in summary["failed"]:
        lines.append(f"\nfailed: {f['point']} seed {f['seed']}: {f['error']}")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Harmful score against task loss per point (error bars: std over seeds), front
    joined; with over-refusal measured, a second panel puts harmful score against it, so a
    point that is safe because it refuses everything stands out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    harm, task = summary["harm_metric"], summary["task_metric"]
    refusal = over_refusal_column([c for r in summary["rows"] for c in r["columns"]])
    refusals = any(r["columns"].get(refusal, {}).get("mean") is not None for r in summary["rows"])
    fig, axes = plt.subplots(1, 2 if refusals else 1, figsize=(13.0 if refusals else 7.5, 5.0), squeeze=False)
    ax = axes[0][0]
    rows = [r for r in summary["rows"] if task and r["columns"].get(harm, {}).get("mean") is not None
            and r["columns"].get(task, {}).get("mean") is not None]
    _draw_points(ax, rows, harm, task)
    front = sorted((r["columns"][harm]["mean"], r["columns"][task]["mean"]) for r in rows if r["pareto"])
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="C3", linewidth=1, label="Pareto front")
    by_point = {r["point"]: r for r in rows}
    curve = [by_point[c] for c in summary["config"].get("curve", []) if c in by_point]
    if len(curve) > 1:
        ax.plot([r["columns"][harm]["mean"] for r in curve], [r["columns"][task]["mean"] for r in curve], "--",
                color="0.4", linewidth=1, label=" - ".join(r["point"] for r in curve))
    if len(front) > 1 or len(curve) > 1:
        ax.legend(fontsize=7)
    start = summary.get("start") or {}
    _draw_start(ax, start, harm, task)
    for name, stage in (summary.get("starts") or {}).items():
        if stage:
            _draw_start(ax, stage["metrics"], harm, task, f"start model {name}")
    ax.set_xlabel(f"{harm} (%) - lower is safer")
    ax.set_ylabel(f"{task} - lower is better")
    ax.set_title("safety vs task quality per sweep point")
    if refusals:
        _over_refusal_panel(axes[0][1], summary, harm, refusal, start)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=130)


def _draw_points(ax, rows: list[dict], x_metric: str, y_metric: str) -> None:
    """One marker per row at its means, error bars its std over seeds; red circles for the
    Pareto front, blue crosses for the rest; each labelled with its point's name."""
    for r in rows:
        x, y = r["columns"][x_metric], r["columns"][y_metric]
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0.0, yerr=y["std"] or 0.0, fmt="o" if r["pareto"] else "x",
                    color="C3" if r["pareto"] else "C0", capsize=2)
        ax.annotate(r["point"], (x["mean"], y["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")


def _draw_start(ax, start: dict, x_metric: str, y_metric: str, label: str = "start model") -> None:
    if start.get(x_metric) is not None and start.get(y_metric) is not None:
        ax.plot(start[x_metric], start[y_metric], "*", color="k", markersize=10)
        ax.annotate(label, (start[x_metric], start[y_metric]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")


def _over_refusal_panel(ax, summary: dict, harm: str, refusal: str, start: dict) -> None:
    """Harmful score against over-refusal (``refusal``: XSTest's when measured) per point
    (both %, lower is better on both)."""
    _draw_points(ax, [r for r in summary["rows"] if r["columns"].get(harm, {}).get("mean") is not None
                      and r["columns"].get(refusal, {}).get("mean") is not None], harm, refusal)
    _draw_start(ax, start, harm, refusal)
    ax.set_xlabel(f"{harm} (%) - lower is safer")
    ax.set_ylabel(f"{refusal} - safe requests refused, lower is more helpful")
    ax.set_title("safety vs over-refusal (red: on the loss Pareto front)")


def write_outputs(out: Path, cfg: SweepConfig, records: list[dict], start_metrics: Optional[dict],
                  stages: Optional[dict] = None) -> dict:
    """``results.jsonl`` (the records), ``sweep.json``, ``sweep.md`` and ``sweep.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in records))
    summary = summarise(cfg, records, start_metrics, stages)
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "sweep.md", markdown(summary))
    if summary["rows"]:
        plot(summary, out / "sweep.png")
    return summary
