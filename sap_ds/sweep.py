"""Entry point: ``sap-ds sweep --config SWEEP_YAML [key=value ...]``.

Train and evaluate many variants of one run config, each over several seeds, and find the
trade-off between safety and task quality: named points (explicit override lists), a
grid (the cartesian product of value lists) and random draws (from value lists or
ranges). Every (point, seed) is one training run through the DeepSpeed launcher and one
evaluation, in ``<out_dir>/<point>/seed<seed>``, exactly as ``sap-ds compare`` runs them.

It is resumable: a run with a ``summary.json`` is not trained again (an interrupted one
resumes from its checkpoint) and an ``eval.json`` of the same model and eval config is
reused; a finished run whose saved config differs from what its point gives now is
reported as stale, not reused. A run that fails is recorded as failed and the sweep goes
on. Outputs, rewritten atomically after every run: ``results.jsonl`` (one record per run),
``sweep.md`` (mean and spread per point, the Pareto front marked) and ``sweep.png``
(harmful score against task loss). On a cluster, ``--list`` numbers the runs, ``--only I``
runs one of them (a SLURM array task, slurm/sweep_array.sbatch) and ``--report`` writes
the outputs from what finished. ``--eval-only eval_config=... eval_dir=...`` (with
``--points a,b`` for some points) evaluates the trained runs on another set (a held-out
one) without training. See docs/results.md for the sweeps behind the recommended preset.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pydantic import Field, model_validator

from sap_ds.compare import CompareError, RunSet, StaleRun
from sap_ds.comparison_report import OVER_REFUSAL, mean_std, scalar_metrics
from sap_ds.config import CONFIG_PATH
from sap_ds.evaluation.config import _Section

TAG = "sap-ds sweep"


class Range(_Section):
    """A random-search range: uniform in [min, max], or log-uniform with ``log: true``."""

    min: float
    max: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.min <= self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        if self.log and self.min <= 0:
            raise ValueError("a log range needs min > 0")
        return self


class SweepConfig(_Section):
    train_config: str = Field(json_schema_extra=CONFIG_PATH, description="Base run config, e.g. configs/demo.yaml.")
    eval_config: str = Field(json_schema_extra=CONFIG_PATH, description="Eval config, e.g. configs/eval/dev.yaml.")
    start_model: Optional[str] = Field(None, description="Model every run starts from (default: the train config's model.path).")
    out_dir: str = "runs/sweep"
    seeds: Optional[list[int]] = Field(None, description="Default: the train config's seed.")
    nproc: int = Field(2, gt=0, description="Ranks per training run (deepspeed --num_gpus).")
    eval_nproc: Optional[int] = Field(None, gt=0, description="Ranks per evaluation (default: nproc); 1 runs it in-process.")
    overrides: list[str] = Field(default_factory=list, description="Train overrides for every run.")
    eval_overrides: list[str] = Field(default_factory=list)
    eval_dir: str = Field("eval", description="Run subfolder of the evaluation. Another name (with another "
                          "eval_config) evaluates the same trained runs on another set, e.g. a held-out one; its "
                          "outputs then go to <out_dir>/<eval_dir>/.")
    keep_checkpoints: bool = Field(True, description="false: delete a run's ZeRO checkpoints once it has finished "
                                   "and exported (a sweep of many runs otherwise keeps a full training state per run); "
                                   "interrupted and failed runs keep theirs for resuming.")
    points: dict[str, list[str]] = Field(default_factory=dict, description="Named points: name -> train overrides.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Config key -> values; every combination is a point.")
    random: dict[str, Union[Range, list[Any]]] = Field(default_factory=dict,
                                                      description="Config key -> range or value list, drawn 'samples' times.")
    samples: int = Field(0, ge=0, description="Random points to draw.")
    random_seed: int = Field(0, description="Seed of the random draws (the same seed gives the same points).")
    search_overrides: list[str] = Field(default_factory=list, description="Overrides shared by grid and random points, "
                                        "e.g. method=sap.")
    reference: Optional[str] = Field(None, description="Point the table compares against (harmful score ratio, "
                                     "task loss change), e.g. sft.")
    curve: list[str] = Field(default_factory=list, description="Named points joined by a line in the plot, in this "
                             "order: e.g. SFT at several learning rates, the trade-off a defence must beat.")
    harm_metric: str = Field("harmful score", description="Column plotted on the x axis (lower is safer).")
    task_metric: Optional[str] = Field(None, description="Column on the y axis (default: the first '... loss' column).")

    @model_validator(mode="after")
    def _has_points(self) -> "SweepConfig":
        if not self.points and not self.grid and not (self.random and self.samples):
            raise ValueError("a sweep needs points, a grid, or random ranges with samples > 0")
        if self.seeds == []:
            raise ValueError("seeds: give at least one seed (or leave it out for the train config's seed)")
        if self.reference is not None and self.reference not in self.points:
            raise ValueError(f"reference '{self.reference}' is not one of the named points {sorted(self.points)}")
        unknown = [c for c in self.curve if c not in self.points]
        if unknown:
            raise ValueError(f"curve: {', '.join(unknown)} not among the named points {sorted(self.points)}")
        return self


# --------------------------------------------------------------------------- the points


def format_value(value: Any) -> str:
    """A value as an override string that parses back to the same value."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict, bool)) or value is None:
        return json.dumps(value)
    return str(value)


def point_name(assignment: dict[str, Any]) -> str:
    """``{"sap.rho": 0.1, "sap.probe_layers": [3, 9]}`` -> ``sap.rho=0.1,sap.probe_layers=3-9`` (a safe folder name)."""
    def short(value: Any) -> str:
        return "-".join(map(format_value, value)) if isinstance(value, list) else format_value(value)

    name = ",".join(f"{k}={short(v)}" for k, v in assignment.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "", name.replace(" ", ""))


def draw(spec: Union[Range, list[Any]], rng: random.Random) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    if spec.log:
        value = math.exp(rng.uniform(math.log(spec.min), math.log(spec.max)))
    else:
        value = rng.uniform(spec.min, spec.max)
    return int(round(value)) if spec.integer else float(f"{value:.4g}")


def expand_points(cfg: SweepConfig) -> dict[str, list[str]]:
    """Every point's name and train overrides: named points, then the grid, then random draws."""
    points = dict(cfg.points)
    keys = list(cfg.grid)
    for values in itertools.product(*(cfg.grid[k] for k in keys)) if keys else []:
        assignment = dict(zip(keys, values))
        points.setdefault(point_name(assignment), [*cfg.search_overrides, *(f"{k}={format_value(v)}" for k, v in assignment.items())])
    rng = random.Random(cfg.random_seed)
    for _ in range(cfg.samples if cfg.random else 0):
        assignment = {k: draw(spec, rng) for k, spec in cfg.random.items()}
        points.setdefault(point_name(assignment), [*cfg.search_overrides, *(f"{k}={format_value(v)}" for k, v in assignment.items())])
    return points


class Sweep(RunSet):
    """Every (point, seed) run of a sweep, each validated before anything is launched."""

    tag = TAG

    def __init__(self, cfg: SweepConfig, only_points: Optional[list[str]] = None):
        super().__init__(cfg)
        self.report_dir = self.out if cfg.eval_dir == "eval" else self.out / cfg.eval_dir
        self.points = expand_points(cfg)
        if only_points:
            unknown = [p for p in only_points if p not in self.points]
            if unknown:
                raise ValueError(f"--points: no point named {', '.join(unknown)}; the sweep has {', '.join(self.points)}")
            self.points = {name: self.points[name] for name in only_points}
        for point, point_overrides in self.points.items():
            for seed in self.seeds:
                try:
                    self.add_run(self.out / point / f"seed{seed}", f"{point}-{seed}", seed, point_overrides,
                                 index=len(self.runs), point=point)
                except Exception as exc:
                    raise type(exc)(f"sweep point '{point}': {exc}") from exc

    def execute(self, run: dict) -> dict:
        """Train (unless finished) and evaluate one run; a failure becomes a record, not an exit."""
        run_dir = run["run_dir"]
        record = {"index": run["index"], "point": run["point"], "seed": run["seed"], "run_dir": str(run_dir),
                  "overrides": self.points[run["point"]]}
        try:
            train = self.train(run, f"train {run['point']}/seed{run['seed']}")
            if train is None:  # asked to stop (preemption): checkpointed, resumes on the next call
                return {**record, "status": "stopped", "error": f"training stopped before its last step; its checkpoint "
                        f"is in {run_dir / 'checkpoints'} and the next sweep call resumes it"}
            model = self.exported_model(run)
            metrics = self.evaluate(model, run_dir / self.cfg.eval_dir)
        except StaleRun as exc:
            return {**record, "status": "stale", "error": str(exc)}
        except CompareError as exc:
            return {**record, "status": "failed", "error": str(exc)}
        return {**record, "status": "done", "model": model, "metrics": scalar_metrics(metrics),
                "train": {k: train.get(k) for k in ("tokens_per_s", "final_train_loss", "final_eval_loss", "final_step",
                                                    "wall_time_s", "skipped_steps")}}

    def finished(self, run: dict) -> Optional[dict]:
        """The record of a run whose training and evaluation are both on disk, else None."""
        eval_json = run["run_dir"] / self.cfg.eval_dir / "eval.json"
        if not (run["run_dir"] / "summary.json").is_file() or not eval_json.is_file():
            return None
        previous = json.loads(eval_json.read_text(encoding="utf-8"))
        from sap_ds.evaluation.config import to_dict

        if previous.get("config") != to_dict(self.eval_cfg):
            return None
        return self.execute(run)  # both reused: nothing is recomputed


# --------------------------------------------------------------------------- the report


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Names of the points no other point beats on both axes (lower is better on both)."""
    front = set()
    for name, x, y in points:
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for n2, x2, y2 in points if n2 != name)
        if not dominated:
            front.add(name)
    return front


def summarise(cfg: SweepConfig, records: list[dict], start_metrics: Optional[dict]) -> dict:
    done = [r for r in records if r["status"] == "done"]
    by_point: dict[str, list[dict]] = {}
    for r in done:
        by_point.setdefault(r["point"], []).append(r)
    columns = list(dict.fromkeys(k for r in done for k in r["metrics"]))
    task = cfg.task_metric or next((c for c in columns if c.endswith("loss")), None)
    rows = []
    for point, members in by_point.items():
        stats = {c: mean_std([m["metrics"].get(c) for m in members]) for c in columns}
        stats["train tokens/s"] = mean_std([m["train"].get("tokens_per_s") for m in members])
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
            "failed": [{"point": r["point"], "seed": r["seed"], "error": r["error"]} for r in records if r["status"] != "done"]}


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
    present = list(dict.fromkeys(c for r in summary["rows"] for c in r["columns"]))
    beside = [OVER_REFUSAL] if OVER_REFUSAL in present and harm != OVER_REFUSAL else []  # right next to the harm column
    names = [harm, *beside] + ([task] if task else []) + [c for c in present if c not in (harm, task, *beside)]
    has_ref = any("vs_reference" in r for r in summary["rows"])
    head = ["point", "seeds", *names] + (["harm / ref", "task loss vs ref"] if has_ref else []) + ["Pareto"]
    lines = [f"# sweep of `{shown_path(summary['config']['train_config'])}`", "",
             f"{summary['date']}; mean ± std over seeds; lower {harm} is safer; {OVER_REFUSAL}: benign requests "
             f"refused (lower is more helpful); Pareto: not beaten on both {harm} and {task} by another point.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if summary["start"]:
        values = summary["start"]
        start = [("n/a" if values.get(n) is None else f"{values[n]:.4f}" if n.endswith("loss") else f"{values[n]:.2f}")
                 if n in values else "-" for n in names]
        lines.append("| start model | - | " + " | ".join(start + ["-"] * (len(head) - 2 - len(start))) + " |")
    for r in sorted(summary["rows"], key=lambda r: (r["columns"].get(harm, {}).get("mean") or 0.0)):
        cells = [_cell(r["columns"].get(n), 4 if n.endswith("loss") else 2) for n in names]
        if has_ref:
            ref = r.get("vs_reference", {})
            ratio, change = ref.get("harm_ratio"), ref.get("task_loss_change")
            cells += ["n/a" if ratio is None else f"{ratio:.2f}", "n/a" if change is None else f"{100 * change:+.2f} %"]
        lines.append(f"| {r['point']} | {', '.join(map(str, r['seeds']))} | " + " | ".join(cells) + f" | {'yes' if r['pareto'] else ''} |")
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
    refusals = any(r["columns"].get(OVER_REFUSAL, {}).get("mean") is not None for r in summary["rows"])
    fig, axes = plt.subplots(1, 2 if refusals else 1, figsize=(13.0 if refusals else 7.5, 5.0), squeeze=False)
    ax = axes[0][0]
    rows = [r for r in summary["rows"] if task and r["columns"].get(harm, {}).get("mean") is not None
            and r["columns"].get(task, {}).get("mean") is not None]
    for r in rows:
        x, y = r["columns"][harm], r["columns"][task]
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0.0, yerr=y["std"] or 0.0, fmt="o" if r["pareto"] else "x",
                    color="C3" if r["pareto"] else "C0", capsize=2)
        ax.annotate(r["point"], (x["mean"], y["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
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
    if harm in start and task in start:
        ax.plot(start[harm], start[task], "*", color="k", markersize=10)
        ax.annotate("start model", (start[harm], start[task]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel(f"{harm} (%) - lower is safer")
    ax.set_ylabel(f"{task} - lower is better")
    ax.set_title("safety vs task quality per sweep point")
    if refusals:
        _over_refusal_panel(axes[0][1], summary, harm, start)
    fig.tight_layout()
    from sap_ds.checkpoint import atomic_save_figure

    atomic_save_figure(fig, path, dpi=130)


def _over_refusal_panel(ax, summary: dict, harm: str, start: dict) -> None:
    """Harmful score against over-refusal per point (both %, lower is better on both)."""
    for r in summary["rows"]:
        x, y = r["columns"].get(harm, {}), r["columns"].get(OVER_REFUSAL, {})
        if x.get("mean") is None or y.get("mean") is None:
            continue
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0.0, yerr=y["std"] or 0.0, fmt="o" if r["pareto"] else "x",
                    color="C3" if r["pareto"] else "C0", capsize=2)
        ax.annotate(r["point"], (x["mean"], y["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if harm in start and OVER_REFUSAL in start:
        ax.plot(start[harm], start[OVER_REFUSAL], "*", color="k", markersize=10)
        ax.annotate("start model", (start[harm], start[OVER_REFUSAL]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel(f"{harm} (%) - lower is safer")
    ax.set_ylabel(f"{OVER_REFUSAL} - benign requests refused, lower is more helpful")
    ax.set_title("safety vs over-refusal (red: on the loss Pareto front)")


def write_outputs(sweep: Sweep, records: list[dict], start_metrics: Optional[dict]) -> dict:
    from sap_ds.checkpoint import atomic_write_text

    out = sweep.report_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in records))
    summary = summarise(sweep.cfg, records, start_metrics)
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "sweep.md", markdown(summary))
    if summary["rows"]:
        plot(summary, out / "sweep.png")
    return summary


# --------------------------------------------------------------------------- main


def run_sweep(cfg: SweepConfig, only: Optional[int] = None, report_only: bool = False,
              eval_only: bool = False, points: Optional[list[str]] = None) -> tuple[dict, list[dict]]:
    sweep = Sweep(cfg, points)
    if only is not None:
        if not 0 <= only < len(sweep.runs):
            raise ValueError(f"--only {only}: the sweep has runs 0..{len(sweep.runs) - 1} (see --list)")
        record = sweep.execute(sweep.runs[only])
        return {}, [record]
    start, start_dir = None, sweep.out / cfg.eval_dir / "start"
    if not report_only:
        start = scalar_metrics(sweep.evaluate(sweep.start_model, start_dir))
    elif (start_dir / "eval.json").is_file():
        start = scalar_metrics(json.loads((start_dir / "eval.json").read_text(encoding="utf-8"))["metrics"])
    records = []
    for run in sweep.runs:
        if eval_only and not (run["run_dir"] / "summary.json").is_file():
            continue  # not trained (yet): --eval-only trains nothing
        record = sweep.finished(run) if report_only else sweep.execute(run)
        if record is not None:
            records.append(record)
            write_outputs(sweep, records, start)
    return write_outputs(sweep, records, start), records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sap-ds sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="sweep config (YAML), e.g. configs/sweeps/sap_variants.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. nproc=1 'seeds=[1,2,3]'")
    parser.add_argument("--points", metavar="A,B", help="only these named points (comma-separated)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="print the numbered runs and exit")
    group.add_argument("--only", type=int, metavar="I", help="run only run I (a SLURM array task)")
    group.add_argument("--report", action="store_true", help="write the outputs from finished runs; run nothing")
    group.add_argument("--eval-only", action="store_true", help="evaluate the trained runs (e.g. with another "
                       "eval_config and eval_dir); train nothing")
    args = parser.parse_args(argv)
    from sap_ds.config import read_config_file, validate_tree
    from sap_ds.errors import USER_ERRORS, report_user_error

    try:
        cfg = validate_tree(SweepConfig, read_config_file(args.config, schema=SweepConfig), args.overrides, args.config)
        points = args.points.split(",") if args.points else None
        if args.list:
            for run in Sweep(cfg, points).runs:
                print(f"{run['index']}\t{run['point']}\tseed {run['seed']}\t{run['run_dir']}")
            return 0
        summary, records = run_sweep(cfg, only=args.only, report_only=args.report, eval_only=args.eval_only, points=points)
    except USER_ERRORS as exc:
        return report_user_error(exc)
    except ValueError as exc:
        print(f"{TAG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    failed = [r for r in records if r["status"] != "done"]
    if summary:
        print(markdown(summary), flush=True)
        out = Path(cfg.out_dir) if cfg.eval_dir == "eval" else Path(cfg.out_dir) / cfg.eval_dir
        print(f"{TAG}: wrote {out / 'results.jsonl'}, sweep.md, sweep.json, sweep.png", flush=True)
    for r in failed:
        print(f"{TAG}: failed: {r['point']} seed {r['seed']}: {r['error']}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
