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
on; one stopped on request (its training exited 75, a preemption) is recorded as stopped and
resumes on the next call (the sweep exits 1 after a failure, else 75 after a stop, else 0). Outputs, rewritten atomically after every run: ``results.jsonl`` (one record per run),
``sweep.md`` (mean and spread per point, the Pareto front marked) and ``sweep.png``
(harmful score against task loss). On a cluster, ``--list`` numbers the runs, ``--only I``
runs one of them (a SLURM array task, slurm/sweep_array.sbatch) and ``--report`` writes
the outputs from what finished; on one machine, ``parallel: N`` runs N at once (on CPU:
``nproc: 1``, one per core). ``--eval-only eval_config=... eval_dir=...`` (with
``--points a,b`` for some points) evaluates the trained runs on another set (a held-out
one) without training. See docs/results.md for the sweeps behind the recommended preset.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field, model_validator

from sap_ds.config.reading import CONFIG_PATH
from sap_ds.evaluation.config import _Section
from sap_ds.experiments.compare import CompareError, RunSet, StaleRun
from sap_ds.experiments.comparison_report import scalar_metrics
from sap_ds.experiments.sweep_report import markdown, write_outputs

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
    parallel: int = Field(1, gt=0, description="Runs at once (training, then its evaluation), each its own launch of "
                          "nproc ranks; with --eval-only, evaluations at once. On a CPU machine of N cores, nproc 1 x "
                          "parallel N. Refused on GPUs, where every launch takes devices 0..nproc-1 (there, a SLURM "
                          "array of --only I runs is the way to run many at once).")
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

    def execute(self, run: dict, alone: bool = True) -> dict:
        """Train (unless finished) and evaluate one run; a failure becomes a record, not an exit.
        A run that is not ``alone`` (others beside it) keeps its output to its logs and
        evaluates in a process of its own."""
        run_dir = run["run_dir"]
        record = {"index": run["index"], "point": run["point"], "seed": run["seed"], "run_dir": str(run_dir),
                  "overrides": self.points[run["point"]]}
        try:
            train = self.train(run, f"train {run['point']}/seed{run['seed']}", echo=alone)
            if train is None:  # asked to stop (preemption): checkpointed, resumes on the next call
                return {**record, "status": "stopped", "error": f"training stopped before its last step; its checkpoint "
                        f"is in {run_dir / 'checkpoints'} and the next sweep call resumes it"}
            model = self.exported_model(run)
            metrics = self.evaluate(model, run_dir / self.cfg.eval_dir, in_process=alone)
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


# --------------------------------------------------------------------------- main


def run_sweep(cfg: SweepConfig, only: Optional[int] = None, report_only: bool = False,
              eval_only: bool = False, points: Optional[list[str]] = None) -> tuple[dict, list[dict]]:
    sweep = Sweep(cfg, points)
    if only is not None:
        if not 0 <= only < len(sweep.runs):
            raise ValueError(f"--only {only}: the sweep has runs 0..{len(sweep.runs) - 1} (see --list)")
        record = sweep.execute(sweep.runs[only])
        return {}, [record]
    start_dir = sweep.out / cfg.eval_dir / "start"
    runs = [run for run in sweep.runs if not eval_only or (run["run_dir"] / "summary.json").is_file()]
    # (--eval-only trains nothing: runs not trained yet are left out)
    if report_only:
        start = None
        if (start_dir / "eval.json").is_file():
            start = scalar_metrics(json.loads((start_dir / "eval.json").read_text(encoding="utf-8"))["metrics"])
        records = [r for r in map(sweep.finished, runs) if r is not None]
    elif cfg.parallel == 1:
        start = scalar_metrics(sweep.evaluate(sweep.start_model, start_dir))
        records = []
        for run in runs:
            records.append(sweep.execute(run))
            write_outputs(sweep, records, start)  # the report so far, after every run
    else:
        start, records = _side_by_side(sweep, runs, start_dir)
    return write_outputs(sweep, records, start), records


def _side_by_side(sweep: Sweep, runs: list[dict], start_dir: Path) -> tuple[dict, list[dict]]:
    """``parallel: N``: N runs at once, longest first; the report is rewritten as each one
    ends and keeps the sweep's order. A failed run is a record, as in a serial sweep; an
    error outside the runs (the start model's evaluation) cancels what has not started."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from sap_ds.experiments.compare import launch_order

    done: dict[int, dict] = {}
    pool = ThreadPoolExecutor(max_workers=sweep.cfg.parallel)
    try:
        start_job = pool.submit(sweep.evaluate, sweep.start_model, start_dir, False)
        jobs = [pool.submit(sweep.execute, runs[i], False) for i in launch_order(runs)]
        start = scalar_metrics(start_job.result())
        for job in as_completed(jobs):
            record = job.result()
            done[record["index"]] = record
            write_outputs(sweep, [done[i] for i in sorted(done)], start)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # running ones finish: their results stay on disk
        raise
    pool.shutdown(wait=True)
    return start, [done[i] for i in sorted(done)]


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
    from sap_ds.config.reading import read_config_file, validate_tree
    from sap_ds.errors import EXIT_STOPPED_RESUMABLE, USER_ERRORS, report_user_error

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
    except (ValueError, CompareError) as exc:  # a bad --only/--points, or an evaluation that failed
        print(f"{TAG}: error: {exc}", file=sys.stderr, flush=True)
        return 2 if isinstance(exc, ValueError) else 1
    failed = [r for r in records if r["status"] != "done"]
    if summary:
        print(markdown(summary), flush=True)
        out = Path(cfg.out_dir) if cfg.eval_dir == "eval" else Path(cfg.out_dir) / cfg.eval_dir
        print(f"{TAG}: wrote {out / 'results.jsonl'}, sweep.md, sweep.json, sweep.png", flush=True)
    for r in failed:
        print(f"{TAG}: {r['status'] if r['status'] == 'stopped' else 'failed'}: {r['point']} seed {r['seed']}: "
              f"{r['error']}", file=sys.stderr, flush=True)
    if any(r["status"] != "stopped" for r in failed):
        return 1
    # Runs stopped on request (preemption) and nothing else wrong: resumable, as `sap-ds train` says it.
    return EXIT_STOPPED_RESUMABLE if failed else 0


if __name__ == "__main__":
    sys.exit(main())
