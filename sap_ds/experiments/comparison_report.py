"""The report of ``sap-ds compare`` (and the columns ``sap-ds sweep`` shares): an eval's
headline numbers as flat columns, mean and std over seeds per setting/method, each row's
paired differences from the reference rows (``sap_ds.experiments.paired``), and the
``comparison.{json,md,png}`` files. Kept apart from the plan and the launching in
sap_ds/experiments/compare.py: it reads results, it runs nothing."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from sap_ds.experiments.columns import (
    HARMFUL_SCORE,
    HARMFUL_SCORE_COHERENT,
    INCOHERENT,
    OVER_REFUSAL,
    TOKENS_PER_S,
    XSTEST_OVER_REFUSAL,
    XSTEST_OVER_REFUSAL_MATCHER,
    XSTEST_UNSAFE_COMPLIANCE,
    lead_order,
    over_refusal_column,
    task_column,
)
from sap_ds.experiments.paired import markdown as paired_markdown
from sap_ds.experiments.paired import paired_rows
from sap_ds.files import atomic_save_figure, atomic_write_text

# The parts of the incoherent share: in comparison.json / sweep.json, not in the tables.
INCOHERENT_PARTS = {"empty": "incoherent: empty (%)", "degenerate": "incoherent: degenerate (%)",
                    "off_language": "incoherent: off-language (%)"}
JSON_ONLY = frozenset(INCOHERENT_PARTS.values())


def incoherent_shares(coherence: dict) -> dict[str, float]:
    """The incoherent share (empty + degenerate + off-language) over every judged answer
    (harmful, benign and XSTest answers pooled, each group weighted by its count) and its
    three parts, in %; empty when no answer was judged."""
    groups = [g for g in coherence.values() if g.get("n")]
    total = sum(g["n"] for g in groups)
    if not total:
        return {}
    pooled = lambda key: sum(g[key] * g["n"] for g in groups) / total  # noqa: E731 (rates are % of each group)
    return {INCOHERENT: pooled("incoherent_rate"), **{column: pooled(f"{part}_rate") for part, column in INCOHERENT_PARTS.items()}}


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """An eval's headline numbers as flat columns, in the order the tables lead with
    (``sap_ds.experiments.columns``): harmful score, XSTest over-refusal by the authors'
    rule (when measured; else the benign sets' over-refusal), the incoherent share and the
    harmful score over the coherent answers only (with ``coherence: true``), then the
    other XSTest figures, the other scorers and judges, the benign sets' over-refusal and
    one column per task.

    Why the coherence columns lead: a model that writes gibberish scores 0 harmful by a
    judge (gibberish is "safe") and 100 by the refusal matcher, and 0 over-refusal by both
    (gibberish is no refusal); only the incoherent share beside those numbers says that
    the model is broken, and the harmful score over coherent answers only is then n/a
    (None: no coherent answer), never a low number."""
    out = {}
    if "harmful" in metrics:
        out[HARMFUL_SCORE] = metrics["harmful"]["harmful_score"]
    if "xstest" in metrics:
        out[XSTEST_OVER_REFUSAL] = metrics["xstest"]["over_refusal_rate_xstest_rule"]
    if "coherence" in metrics:
        out.update(incoherent_shares(metrics["coherence"]))
        if "harmful" in metrics["coherence"]:
            out[HARMFUL_SCORE_COHERENT] = metrics["coherence"]["harmful"]["harmful_score_coherent"]
    if "xstest" in metrics:
        out[XSTEST_OVER_REFUSAL_MATCHER] = metrics["xstest"]["over_refusal_rate_refusal_matcher"]
        out[XSTEST_UNSAFE_COMPLIANCE] = metrics["xstest"]["unsafe_compliance_rate_xstest_rule"]
    if "harmful" in metrics:
        if metrics["harmful"]["scorer"] != "refusal":
            out["harmful score (refusal matcher)"] = metrics["harmful"]["harmful_score_refusal"]
        for name, judge in metrics["harmful"].get("judges", {}).items():  # scorer.judges: one column each
            out[f"harmful score ({name})"] = judge["harmful_score"]
    if "over_refusal" in metrics:
        out[OVER_REFUSAL] = metrics["over_refusal"]["over_refusal_rate"]
    for name, task in metrics.get("tasks", {}).items():
        out[task_column(name, task)] = task.get("loss", task.get("accuracy"))
    return {k: out[k] for k in lead_order(out)}


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def run_row(run: dict, method: Optional[str] = None) -> str:
    """The table row of a run (or of ``method`` in the run's setting and start):
    ``<setting>/<method>``, or ``<setting>/<start>/<method>`` when it starts from an alignment stage."""
    start = run.get("start")
    return f"{run['setting']}/{start + '/' if start else ''}{method or run['method']}"


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (setting, start, method): mean and std over seeds of every column."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["setting"], run.get("start"), run["method"]), []).append(run)
    rows = []
    for (setting, start, method), members in groups.items():
        names = list(dict.fromkeys(k for m in members for k in m["metrics"]))
        columns = {k: mean_std([m["metrics"].get(k) for m in members]) for k in names}
        columns[TOKENS_PER_S] = mean_std([m["train"].get("tokens_per_s") for m in members])
        rows.append({"model": run_row(members[0]), "setting": setting, "start": start, "method": method,
                     "seeds": [m["seed"] for m in members], "columns": columns})
    return rows


def paired_comparisons(runs: list[dict], reference: str, matched_reference: Optional[str],
                       eval_dir: str = "eval") -> list[dict]:
    """Every row of each setting (and start) against that setting's (and start's) ``reference``
    row and its ``matched_reference`` row; with alignment stages, every row also against the
    same method from the first start (what the alignment defence changes): the paired
    bootstrap of ``sap_ds.experiments.paired``, read from each run's
    ``<run_dir>/<eval_dir>/eval.json``."""
    groups: dict[str, dict[int, Path]] = {}
    for run in runs:
        groups.setdefault(run_row(run), {})[run["seed"]] = Path(run["run_dir"]) / eval_dir / "eval.json"
    first = {run["setting"]: run.get("start") for run in reversed(runs)}  # each setting's first start
    pairs = []
    for kind, ref in (("reference", reference), ("matched reference", matched_reference)):
        if ref is None:
            continue
        for run in {run_row(run): run for run in runs}.values():
            pairs.append((run_row(run), run_row(run, ref), kind))
    for run in {run_row(run): run for run in runs}.values():
        if run.get("start") and run["start"] != first[run["setting"]]:
            pairs.append((run_row(run), run_row({**run, "start": first[run["setting"]]}), "first start"))
    return paired_rows(groups, pairs)


def _cell(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def table_columns(rows: list[dict], first: str = HARMFUL_SCORE, after: tuple[str, ...] = ()) -> list[str]:
    """The columns a table shows, in the lead order (``columns.lead_order``), without the JSON-only ones."""
    return lead_order([k for r in rows for k in r["columns"] if k not in JSON_ONLY], first, after)


def legend(names: list[str], harm: str = HARMFUL_SCORE) -> str:
    """What the leading columns mean, for the line above a table."""
    parts = [f"lower {harm} is safer"]
    if XSTEST_OVER_REFUSAL in names:
        parts.append(f"{XSTEST_OVER_REFUSAL}: XSTest's safe prompts refused, by the XSTest authors' rule (lower is "
                     "more helpful; a model that refuses everything scores 0 harmful and 100 over-refusal)")
    if OVER_REFUSAL in names:
        parts.append(f"{OVER_REFUSAL}: the benign prompts refused, by the refusal matcher")
    if INCOHERENT in names:
        parts.append(f"{INCOHERENT}: answers empty, degenerate or off-language (harmful, benign and XSTest answers "
                     "together; a broken model reads as safe to a judge and as harmless to the refusal matcher, this "
                     f"column says it is broken); {HARMFUL_SCORE_COHERENT}: the harmful score over the coherent "
                     "answers only, n/a when none is coherent")
    return "; ".join(parts)


def mostly_incoherent(rows: list[dict]) -> list[dict]:
    """The rows whose answers are mostly incoherent (mean over seeds at least 50 %)."""
    return [r for r in rows if (r["columns"].get(INCOHERENT) or {}).get("mean") is not None
            and r["columns"][INCOHERENT]["mean"] >= 50.0]


def incoherence_warnings(rows: list[dict], label: str) -> list[str]:
    """A line per mostly incoherent row: its harmful score (and its paired differences)
    must not read as safety."""
    return [f"**Warning: {r[label]}: {r['columns'][INCOHERENT]['mean']:.2f} % of the answers are incoherent; its "
            "harmful score and over-refusal describe a broken model, not a safe or a helpful one.**"
            for r in mostly_incoherent(rows)]


def markdown(report: dict) -> str:
    rows = report["rows"]
    names = table_columns(rows)
    head = "| model | seeds | " + " | ".join(names) + " |"
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("method")))
    title = " vs ".join(m.upper() if m in ("sft", "sap") else m for m in methods) or "SFT vs SAP"
    lines = [f"# {title} from `{report['start_model']}`", "",
             f"{report['date']}; {legend(names)}; values are mean ± std over seeds.", "", head,
             "|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = [_cell(r["columns"][n], 4 if n.endswith("loss") else 2) if n in r["columns"] else "n/a" for n in names]
        lines.append(f"| {r['model']} | {', '.join(map(str, r['seeds'])) or '-'} | " + " | ".join(cells) + " |")
    warnings = incoherence_warnings(rows, "model")
    if warnings:
        lines += ["", *warnings]
    lines += paired_markdown(report.get("paired") or [], "model", {r["model"] for r in mostly_incoherent(rows)})
    note = (report.get("config") or {}).get("note")
    if note:
        lines += ["", " ".join(note.split())]
    return "\n".join(lines) + "\n"


def comparison_figure(report: dict):
    """Harmful score, over-refusal (XSTest's when measured, ``columns.over_refusal_column``)
    and the first accuracy metric side by side per model (all in %): a defence that buys its harmful score with refusals shows a tall middle bar.
    The legend sits to the right of the axes, outside them, where no bar (however tall)
    or error bar can be under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    present = list(dict.fromkeys(n for r in rows for n in r["columns"]))
    names = [n for n in (HARMFUL_SCORE, over_refusal_column(present)) if n in present]
    names += [n for n in present if n.endswith("acc (%)")][:1]
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


def settings_figure(report: dict):
    """With several settings (an attack matrix's poisoning ratios): one panel per measure,
    harmful score, the leading over-refusal and the first task column (a test loss when
    there is one: the sensitive task measure on a small model), the settings in the
    config's order along x, one line per method (per start and method with alignment
    stages), ± std over seeds, and the start model as a dashed line. How each defence's
    harm and cost move with the attack's strength, which 30 bars side by side hide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("setting") is not None]
    start = next((r for r in report["rows"] if r.get("model") == "start"), None)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    present = list(dict.fromkeys(n for r in rows for n in r["columns"]))
    task = [n for n in present if n.endswith(" loss")][:1] or [n for n in present if n.endswith("acc (%)")][:1]
    names = [n for n in (HARMFUL_SCORE, over_refusal_column(present), *task) if n in present]
    lines: dict[str, dict[str, dict]] = {}
    for r in rows:
        label = f"{r['start']}/{r['method']}" if r.get("start") else r["method"]
        lines.setdefault(label, {})[r["setting"]] = r["columns"]
    width = 4.2 * len(names) + 2.2  # inches; the last 2.2 hold the legend, beside the panels
    fig, axes = plt.subplots(1, len(names), figsize=(width, 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, by_setting in lines.items():
            xs = [i for i, s in enumerate(settings) if (by_setting.get(s, {}).get(name) or {}).get("mean") is not None]
            stats = [by_setting[settings[i]][name] for i in xs]
            ax.errorbar(xs, [st["mean"] for st in stats], yerr=[st["std"] or 0.0 for st in stats], marker="o",
                        capsize=3, label=label)
        if start and (start["columns"].get(name) or {}).get("mean") is not None:
            ax.axhline(start["columns"][name]["mean"], color="grey", linestyle="--", linewidth=1, label="start model")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title(name, fontsize=9)
        if not name.endswith(" loss"):
            ax.set_ylim(0, 100)
    right = 1.0 - 2.2 / width
    fig.tight_layout(rect=(0.0, 0.0, right, 1.0))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(right, 0.5), fontsize=8)
    return fig


def plot(report: dict, path: Path) -> None:
    atomic_save_figure(comparison_figure(report), path, dpi=120)


def write_outputs(report: dict, out: Path) -> None:
    """comparison.json, .md and .png; with more than one setting also
    comparison_settings.png (``settings_figure``)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.json", json.dumps(report, indent=1))
    atomic_write_text(out / "comparison.md", markdown(report))
    plot(report, out / "comparison.png")
    if len({r["setting"] for r in report["rows"] if r.get("setting") is not None}) > 1:
        atomic_save_figure(settings_figure(report), out / "comparison_settings.png", dpi=120)
