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
one) without training. Two-stage sweeps: ``start_stages`` (alignment runs of ``start_config``,
``sap_ds.experiments.stages``) are trained once each in ``<out_dir>/start/<name>`` and a
point with ``start=<name>`` fine-tunes from that stage's export (``--only I`` trains its
stage first, under a lock shared by the array tasks). See docs/results.md for the sweeps
behind the recommended preset.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from sap_ds.config.reading import read_config_file, validate_tree
from sap_ds.entry import run_command
from sap_ds.errors import EXIT_STOPPED_RESUMABLE, USER_ERRORS
from sap_ds.experiments.attack import AttackStage
from sap_ds.experiments.comparison_report import scalar_metrics
from sap_ds.experiments.runs import RunError, RunSet, RunStopped, StaleRun, ended_early, run_side_by_side, say
from sap_ds.experiments.stage_config import split_start
from sap_ds.experiments.stages import StartStages
from sap_ds.experiments.sweep_config import SweepConfig, expand_points
from sap_ds.experiments.sweep_report import markdown, write_outputs
from sap_ds.files import atomic_write_text

TAG = "sap-ds sweep"


class Sweep(RunSet):
    """Every (point, seed) run of a sweep, each validated before anything is launched."""

    tag = TAG

    def __init__(self, cfg: SweepConfig, only_points: Optional[list[str]] = None):
        super().__init__(cfg)
        self.points = expand_points(cfg)
        if only_points:
            unknown = [p for p in only_points if p not in self.points]
            if unknown:
                raise ValueError(f"--points: no point named {', '.join(unknown)}; the sweep has {', '.join(self.points)}")
            self.points = {name: self.points[name] for name in only_points}
        # the alignment stages (start_stages), every stage's config validated now
        self.stages = StartStages(cfg, self.out, TAG, cfg.eval_dir) if cfg.start_stages else None
        for point, point_overrides in self.points.items():
            start, train_overrides = split_start(point_overrides)  # start=<stage>: the stage's export is its model
            for seed in self.seeds:
                try:
                    self.add_run(self.out / point / f"seed{seed}", f"{point}-{seed}", seed, train_overrides,
                                 start_model=self.stages.model(start) if start else None,
                                 index=len(self.runs), point=point, start=start)
                except Exception as exc:
                    raise type(exc)(f"sweep point '{point}': {exc}") from exc
        # the stages this call reports: those its points start from (every stage unless --points)
        self.start_names = [n for n in cfg.start_stages
                            if not only_points or any(run["start"] == n for run in self.runs)]
        # the re-attack (attack_config), every attack run's config validated now, before any training
        self.attack_stage = AttackStage(cfg.attack_config, self.start_model, self.out, TAG) if cfg.attack_config else None
        self.attack_runs = True  # False (--report, --eval-only): an attack is read from disk, never run

    def execute(self, run: dict, alone: bool = True) -> dict:
        """Train (unless finished) and evaluate one run; a failure becomes a record, not an exit.
        A run that is not ``alone`` (others beside it) keeps its output to its logs and
        evaluates in a process of its own. With ``attack_config`` its export is then attacked
        again (``--only I`` included) and the bounded worst case joins its metrics."""
        run_dir = run["run_dir"]
        record = {"index": run["index"], "point": run["point"], "start": run["start"], "seed": run["seed"],
                  "run_dir": str(run_dir), "overrides": self.points[run["point"]]}
        try:
            if run["start"] and self.attack_runs:  # its alignment stage first (once; --only I waits on its lock)
                self._ensure_stage(run)
            train = self.train(run, f"train {run['point']}/seed{run['seed']}", echo=alone)
            if train is None:  # asked to stop (preemption): checkpointed, resumes on the next call
                return {**record, "status": "stopped", "error": f"training stopped before its last step; its checkpoint "
                        f"is in {run_dir / 'checkpoints'} and the next sweep call resumes it"}
            model = self.exported_model(run)
            metrics = self.evaluate(model, run_dir / self.cfg.eval_dir, in_process=alone)
            reattack = self._reattack(model, run_dir, alone)
        except StaleRun as exc:
            return {**record, "status": "stale", "error": str(exc)}
        except RunStopped as exc:  # an attack run stopped on request: resumes on the next call
            return {**record, "status": "stopped", "error": str(exc)}
        except RunError as exc:
            return {**record, "status": "failed", "error": str(exc)}
        return {**record, "status": "done", "model": model, "metrics": {**scalar_metrics(metrics), **reattack},
                "train": {k: train.get(k) for k in ("tokens_per_s", "final_train_loss", "final_eval_loss", "final_step",
                                                    "wall_time_s", "skipped_steps")}}

    def _ensure_stage(self, run: dict) -> None:
        """The run's alignment stage, trained (once) before it. A stage stopped on request
        (a SLURM preemption: the stage's trainer watches the array task's stop file, which it
        inherits as $SAP_DS_STOP_FILE) leaves its REQUEUE marker in the stage's folder; a copy
        goes to this run's folder, the one slurm/common.sh looks in, so that the task is
        requeued and resumes the stage."""
        try:
            self.stages.ensure(run["start"], self.attack_stage)
        except RunStopped:
            marker = self.stages.runs[run["start"]]["run_dir"] / "REQUEUE"
            if marker.is_file():
                run["run_dir"].mkdir(parents=True, exist_ok=True)
                atomic_write_text(run["run_dir"] / "REQUEUE", marker.read_text(encoding="utf-8"))
            raise

    def _reattack(self, model: str, run_dir: Path, alone: bool) -> dict:
        """The re-attack's columns: run (or resumed) unless this call only reads results."""
        if self.attack_stage is None:
            return {}
        out = run_dir / self.attack_stage.FOLDER
        if not self.attack_runs:
            return self.attack_stage.read(out)
        return self.attack_stage.run(model, out, run_dir / self.cfg.eval_dir, alone)

    def start_reattack(self, start_dir: Path) -> dict:
        """The start model's re-attack columns (run, or read under ``--report`` / ``--eval-only``)."""
        if self.attack_stage is None:
            return {}
        if not self.attack_runs:
            return self.attack_stage.read(self.attack_stage.start_out)
        return self.attack_stage.run(self.start_model, self.attack_stage.start_out, start_dir, alone=True)

    def start_rows(self, mode: str) -> dict[str, Optional[dict]]:
        """Every reported stage's row (None where it has none), ``mode`` "run" (train, evaluate
        and re-attack), "eval" (evaluate the trained ones) or "read" (from disk). A stage that
        fails is left out here; the points starting from it get its error as their record."""
        rows: dict[str, Optional[dict]] = {}
        for name in self.start_names:
            try:
                rows[name] = (self.stages.read(name, self.attack_stage) if mode == "read"
                              else self.stages.ensure(name, self.attack_stage if mode == "run" else None, mode == "run"))
            except RunError as exc:
                say(f"{TAG}: start stage {name}: {exc}")
                rows[name] = None
        return rows

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
    sweep.attack_runs = not (report_only or eval_only)
    if only is not None:
        if not 0 <= only < len(sweep.runs):
            raise ValueError(f"--only {only}: the sweep has runs 0..{len(sweep.runs) - 1} (see --list)")
        record = sweep.execute(sweep.runs[only])
        return {}, [record]
    start_dir = sweep.out / cfg.eval_dir / "start"
    runs = [run for run in sweep.runs if not eval_only or (run["run_dir"] / "summary.json").is_file()]
    # (--eval-only trains nothing: runs not trained yet are left out)
    # the alignment stages first, one after another: every fine-tune of theirs waits on them anyway
    stages = sweep.start_rows("read" if report_only else "eval" if eval_only else "run") if sweep.stages else {}
    if report_only:
        start = None
        if (start_dir / "eval.json").is_file():
            start = scalar_metrics(json.loads((start_dir / "eval.json").read_text(encoding="utf-8"))["metrics"])
            start.update(sweep.start_reattack(start_dir))
        records = [r for r in map(sweep.finished, runs) if r is not None]
    elif cfg.parallel == 1:
        start = {**scalar_metrics(sweep.evaluate(sweep.start_model, start_dir)), **sweep.start_reattack(start_dir)}
        records = []
        for run in runs:
            records.append(sweep.execute(run))
            write_outputs(cfg.report_dir(), cfg, records, start, stages)  # the report so far, after every run
    else:
        start, records = _side_by_side(sweep, runs, start_dir, stages)
    return write_outputs(cfg.report_dir(), cfg, records, start, stages), records


def _side_by_side(sweep: Sweep, runs: list[dict], start_dir: Path, stages: dict) -> tuple[Optional[dict], list[dict]]:
    """``parallel: N``: N runs at once, longest first; the report is rewritten as each one
    ends and keeps the sweep's order. A failed run is a record, as in a serial sweep; an
    error outside the runs (the start model's evaluation) is raised."""
    cfg = sweep.cfg

    def report_so_far(start: Optional[dict], done: dict[int, dict]) -> None:
        write_outputs(cfg.report_dir(), cfg, [done[i] for i in sorted(done)], None if start is None else scalar_metrics(start),
                      stages)

    start, done = run_side_by_side(sweep, runs, lambda run: sweep.execute(run, alone=False), start_dir, report_so_far)
    return {**scalar_metrics(start), **sweep.start_reattack(start_dir)}, [done[i] for i in sorted(done)]


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
    return run_command(lambda: sweep_and_report(args))


def sweep_and_report(args) -> int:
    try:
        cfg = validate_tree(SweepConfig, read_config_file(args.config, schema=SweepConfig), args.overrides, args.config)
        points = args.points.split(",") if args.points else None
        if args.list:
            for run in Sweep(cfg, points).runs:
                start = f"\tstart {run['start']}" if run["start"] else ""  # trained first by the first task that needs it
                print(f"{run['index']}\t{run['point']}\tseed {run['seed']}\t{run['run_dir']}{start}")
            return 0
        summary, records = run_sweep(cfg, only=args.only, report_only=args.report, eval_only=args.eval_only, points=points)
    except USER_ERRORS:
        raise  # for run_command (a ConfigError is a ValueError too)
    except RunError as exc:  # an evaluation that failed, or the start model's re-attack stopped on request
        return ended_early(TAG, exc)
    except ValueError as exc:  # a bad --only/--points
        print(f"{TAG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    failed = [r for r in records if r["status"] != "done"]
    if summary:
        print(markdown(summary), flush=True)
        print(f"{TAG}: wrote {cfg.report_dir() / 'results.jsonl'}, sweep.md, sweep.json, sweep.png", flush=True)
    for r in failed:
        print(f"{TAG}: {r['status'] if r['status'] == 'stopped' else 'failed'}: {r['point']} seed {r['seed']}: "
              f"{r['error']}", file=sys.stderr, flush=True)
    if any(r["status"] != "stopped" for r in failed):
        return 1
    # Runs stopped on request (preemption) and nothing else wrong: resumable, as `sap-ds train` says it.
    return EXIT_STOPPED_RESUMABLE if failed else 0


if __name__ == "__main__":
    sys.exit(main())
