"""Entry point: ``sap-ds attack --config ATTACK_YAML --model DIR [--out DIR] [key=value ...]``.

The durability check of a defence (TamperBench's protocol): evaluate a model (a defended
export, or any other), fine-tune it again with harmful attacks (harmful-only "pure bad",
a high poisoning ratio) over a small grid of learning rates and steps, evaluate every
attacked copy, and report per attack the most harmful grid point whose task quality stays
within a stated bound of the model's own (the bounded worst case), beside the whole grid.

Every attack run is a training run as ``sap-ds compare`` launches one
(``sap_ds.experiments.runs``): method sft from the model under attack, with the attack's
overrides, in ``<out>/<attack>/lr<lr>_steps<steps>/seed<seed>``; all of their configs are
built and validated before the first launch. It is resumable as compare is: a finished run
is reused when its config is the same (stale otherwise), an ``eval.json`` of the same model
and eval config is not recomputed; an attacked copy's full model is deleted once it is
evaluated (``keep_exports: false``, the default: a copy per grid point). Outputs, rewritten atomically after every run:
``attack.json`` (every grid point's metrics, which points fell outside the bound and why,
the bounded worst case per attack and overall) and ``attack.md``.

``attack_config: <path>`` in a compare or sweep config runs the same stage on every
run's export (in ``<run_dir>/attack``) and on the start model (``<out_dir>/start/attack``).
See docs/evaluation.md, "Re-attack".
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from sap_ds.config.reading import read_config_file, validate_tree
from sap_ds.entry import run_command
from sap_ds.errors import EXIT_STOPPED_RESUMABLE, ConfigError, ModelError
from sap_ds.experiments.attack_config import (
    AttackConfig,
    bounded_worst,
    grid_points,
    higher_is_worse,
    point_dir,
    resolve_columns,
    stage_columns,
    task_limit,
)
from sap_ds.experiments.comparison_report import scalar_metrics
from sap_ds.experiments.runs import (
    RunError,
    RunSet,
    RunStopped,
    StaleRun,
    ended_early,
    reusable_evaluation,
    run_side_by_side,
)
from sap_ds.experiments.sweep_report import shown_path
from sap_ds.files import atomic_write_text

TAG = "sap-ds attack"
REPORT_JSON, REPORT_MD = "attack.json", "attack.md"


def load_attack_config(path: str, overrides: list[str] = ()) -> AttackConfig:
    return validate_tree(AttackConfig, read_config_file(path, schema=AttackConfig), list(overrides), str(path))


class AttackPlan(RunSet):
    """Every attack run on one model: attacks x learning rates x steps x seeds, each run's
    config built and validated now (a bad override fails before anything trains)."""

    def __init__(self, cfg: AttackConfig, model: str, out: Path, source: str, tag: str = TAG):
        self.tag = tag
        # RunSet reads a compare-style config: the attack's, with the model under attack as the
        # start model of every run and the attack's folder as out_dir.
        try:
            super().__init__(SimpleNamespace(**cfg.model_dump(), start_model=model, out_dir=str(out)))
        except ModelError as exc:
            raise ModelError(f"the model under attack: {exc}") from None
        self.attack_cfg, self.source = cfg, source
        try:
            self.harm, self.task = resolve_columns(cfg, self.eval_cfg, source)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for attack, attack_overrides in cfg.attacks.items():
            for lr in cfg.lrs:
                for steps in cfg.steps:
                    for seed in self.seeds:
                        try:
                            self.add_run(self.out / point_dir(attack, lr, steps) / f"seed{seed}",
                                         f"attack-{attack}-lr{lr:g}-steps{steps}-seed{seed}", seed,
                                         ["method=sft", *attack_overrides, f"train.lr={lr!r}", f"train.max_steps={steps}"],
                                         attack=attack, lr=lr, steps=steps)
                        except ConfigError as exc:
                            raise ConfigError(f"{source}: attacks.{attack} at lr {lr:g}, steps {steps}: {exc}") from None

    def before_dir(self, given: Optional[Path]) -> Path:
        """Where the attacked model's own evaluation is: ``given`` (an ``eval.json`` or its
        folder) when it was made from this model with this eval config, so it is reused,
        else ``<out>/before``. The test is the one ``evaluate_model`` reuses by, so a given
        evaluation is never overwritten."""
        if given is not None:
            folder = given.parent if given.name == "eval.json" else given
            if reusable_evaluation(folder, self.start_model, self.eval_cfg) is not None:
                return folder
        return self.out / "before"

    def evaluate_attacked_copy(self, model: str, run: dict, alone: bool) -> dict:
        """Evaluate one attack run's export; then, unless ``keep_exports``, delete its full
        model (``export/model``: a copy of the attacked model's size per grid point, 140 GB
        each at 70B), keeping the evaluation, the LoRA adapter when there is one, and the
        summary, which is all the report and a rerun with the same eval config read. A later
        eval config that needs the deleted model is a StaleRun that says so."""
        eval_dir = run["run_dir"] / "eval"
        if not Path(model).is_dir():
            previous = reusable_evaluation(eval_dir, model, self.eval_cfg)
            if previous is None:
                raise StaleRun(f"{run['run_dir']}: its export/model was deleted after its evaluation (keep_exports: "
                               "false) and the eval config has changed since, so it cannot be evaluated again; move "
                               "the folder away to rerun this attack (or set keep_exports: true before the first run)")
            return previous["metrics"]
        metrics = self.evaluate(model, eval_dir, in_process=alone)
        if not self.attack_cfg.keep_exports and Path(model).is_dir():
            shutil.rmtree(model)
        return metrics

    def execute(self, run: dict, alone: bool = True) -> dict:
        """Train (unless finished) and evaluate one attack run; a failure becomes a record, so
        the other grid points still run and the report says which point is missing."""
        record = {"attack": run["attack"], "lr": run["lr"], "steps": run["steps"], "seed": run["seed"],
                  "run_dir": str(run["run_dir"])}
        what = f"attack {run['attack']} lr {run['lr']:g} steps {run['steps']} seed {run['seed']}"
        try:
            summary = self.train(run, what, echo=alone)
            if summary is None:
                return {**record, "status": "stopped", "error": f"{what} stopped before its last step; its checkpoint "
                        f"is in {run['run_dir'] / 'checkpoints'} and the next call resumes it"}
            model = self.exported_model(run)
            metrics = self.evaluate_attacked_copy(model, run, alone)
        except StaleRun as exc:
            return {**record, "status": "stale", "error": str(exc)}
        except RunError as exc:
            return {**record, "status": "failed", "error": str(exc)}
        return {**record, "status": "done", "model": model, "metrics": scalar_metrics(metrics),
                "train": {k: summary.get(k) for k in ("final_train_loss", "final_step", "train_examples",
                                                       "harmful_examples", "wall_time_s")}}


def attack(cfg: AttackConfig, model: str, out: Path, source: str, before_eval: Optional[Path] = None,
           alone: bool = True, tag: str = TAG, plan: Optional[AttackPlan] = None) -> dict:
    """Evaluate ``model``, run every attack of the grid on it, evaluate each, and write
    ``attack.json`` / ``attack.md`` to ``out`` (after every run, so an interruption keeps
    what finished). Not ``alone`` (inside a compare or sweep whose runs go side by side):
    one attack run at a time, each evaluation in a process of its own, output to the logs."""
    plan = plan or AttackPlan(cfg, model, Path(out), source, tag)
    before_dir = plan.before_dir(before_eval)
    if cfg.parallel == 1 or not alone:
        before = scalar_metrics(plan.evaluate(model, before_dir, in_process=alone))
        records: list[dict] = []
        for run in plan.runs:
            records.append(plan.execute(run, alone))
            write_outputs(build_report(plan, source, before, before_dir, records), plan.out)
    else:
        def so_far(start: Optional[dict], done: dict[int, dict]) -> None:
            if start is not None:  # the bound needs the model's own numbers
                write_outputs(build_report(plan, source, scalar_metrics(start), before_dir,
                                           [done[i] for i in sorted(done)]), plan.out)

        start, done = run_side_by_side(plan, plan.runs, lambda run: plan.execute(run, alone=False), before_dir, so_far)
        before, records = scalar_metrics(start), [done[i] for i in range(len(plan.runs))]
    report = build_report(plan, source, before, before_dir, records)
    write_outputs(report, plan.out)
    return report


# --------------------------------------------------------------------------- the report


def build_report(plan: AttackPlan, source: str, before: dict, before_dir: Path, records: list[dict]) -> dict:
    from sap_ds.evaluation.config import to_dict

    cfg, harm, task = plan.attack_cfg, plan.harm, plan.task
    points = grid_points(records, harm, task, before.get(task), cfg.max_task_worsening)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": source,
            "model": plan.start_model, "config": cfg.model_dump(mode="json"), "eval_config": to_dict(plan.eval_cfg),
            "harm_metric": harm, "task_metric": task,
            "bound": {"task_metric": task, "worse": "higher" if higher_is_worse(task) else "lower",
                      "max_task_worsening": cfg.max_task_worsening, "before": before.get(task),
                      "limit": task_limit(before.get(task), task, cfg.max_task_worsening)},
            "before": {"eval": str(before_dir / "eval.json"), "metrics": before},
            "planned_runs": len(plan.runs), "complete": len(records) == len(plan.runs) and
            all(r["status"] == "done" for r in records),
            "grid": points, "worst": bounded_worst(points, harm, list(cfg.attacks)), "runs": records}


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    harm, task, bound = report["harm_metric"], report["task_metric"], report["bound"]
    digits = 4 if bound["worse"] == "higher" else 2  # a loss to 4 places, an accuracy (%) to 2
    sign, rel = ("≤", "+") if bound["worse"] == "higher" else ("≥", "-")
    limit = (f"{task} {sign} {_num(bound['limit'], digits)} (the attacked model's {_num(bound['before'], digits)} {rel} "
             f"{bound['max_task_worsening']:.0%}; {bound['worse']} is worse)") if bound["limit"] is not None else \
        f"none: the attacked model has no {task}, so no attack is inside the bound"
    before = report["before"]["metrics"]
    lines = [f"# Re-attack of `{shown_path(report['model'])}`", "",
             f"{report['date']}; config `{shown_path(report['source'])}`; {report['planned_runs']} attack runs planned"
             + ("" if report["complete"] else ", not all finished (see below)") + ".", "",
             f"Capability bound: {limit}.", "",
             f"Before the attacks: {harm} {_num(before.get(harm))}, {task} {_num(before.get(task), digits)}.", "",
             f"## Bounded worst case ({harm}, higher is worse)", "",
             f"| attacks | {harm} | {task} | lr | steps |", "|---|---|---|---|---|"]
    worst = report["worst"]
    notes = []
    for name, entry in [*worst["per_attack"].items(), ("all attacks", worst["overall"])]:
        p = entry["point"]
        if p is None:
            lines.append(f"| {name} | {'none finished' if entry.get('finished') == 0 else 'none inside the bound'} | | | |")
            notes.append(entry["message"])
        else:
            lines.append(f"| {name} | {_num(p[harm])} | {_num(p[task], digits)} | {p['lr']:g} | {p['steps']} |")
    lines += [""] + [f"{n}" for n in notes] + ([""] if notes else [])
    lines += ["## Grid (mean over seeds)", "", f"| attack | lr | steps | seeds | {harm} | {task} | task change | inside bound |",
              "|---|---|---|---|---|---|---|---|"]
    for p in report["grid"]:
        change = "n/a" if p["task_worsening"] is None else f"{p['task_worsening']:+.1%} worse" if p["task_worsening"] >= 0 \
            else f"{-p['task_worsening']:.1%} better"
        inside = "yes" if p["inside_bound"] else f"no: {p['outside_because']}"
        lines.append(f"| {p['attack']} | {p['lr']:g} | {p['steps']} | {', '.join(map(str, p['seeds']))} | "
                     f"{_num(p[harm])} | {_num(p[task], digits)} | {change} | {inside} |")
    failed = [r for r in report["runs"] if r["status"] != "done"]
    if failed:
        lines += ["", "Not finished:"] + [f"- {r['attack']} lr {r['lr']:g} steps {r['steps']} seed {r['seed']}: "
                                          f"{r['status']}: {r['error'].splitlines()[0]}" for r in failed]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=1, ensure_ascii=False))
    atomic_write_text(out / REPORT_MD, markdown(report))


# --------------------------------------------------------------------------- the stage


class AttackStage:
    """The re-attack stage of ``sap-ds compare`` and ``sap-ds sweep`` (``attack_config:``):
    built before their first launch, from the start model, so that every attack run's config
    is validated then (the exports it will attack do not exist yet; they differ from the
    start model only in their weights)."""

    FOLDER = "attack"  # a run's attacks: <run_dir>/attack; the start model's: <out_dir>/start/attack

    def __init__(self, config_path: str, start_model: str, out_dir: Path, tag: str):
        self.source, self.tag = config_path, tag
        try:
            self.cfg = load_attack_config(config_path)
        except ConfigError as exc:
            raise ConfigError(f"attack_config: {exc}") from None
        self.start_out = Path(out_dir) / "start" / self.FOLDER
        self.start_plan = AttackPlan(self.cfg, start_model, self.start_out, config_path, tag)

    def run(self, model: str, out: Path, before_eval: Optional[Path], alone: bool) -> dict:
        """Attack ``model`` into ``out``; the record's columns (``stage_columns``). A grid point
        that failed or stopped is raised after the report is written (a RunStopped when
        every one that did not finish was stopped: the next call resumes them)."""
        plan = self.start_plan if out == self.start_out else None
        report = attack(self.cfg, model, out, self.source, before_eval, alone, self.tag, plan)
        unfinished = [r for r in report["runs"] if r["status"] != "done"]
        if unfinished:
            first = unfinished[0]
            message = (f"re-attack of {model}: {len(unfinished)} of {len(report['runs'])} attack runs did not finish "
                       f"(first: {first['error']}); the others are in {out / REPORT_JSON}")
            raise (RunStopped if all(r["status"] == "stopped" for r in unfinished) else RunError)(message)
        return stage_columns(report)

    def read(self, out: Path) -> dict:
        """The columns from an attack already on disk (``--report``, ``--eval-only``: nothing
        runs); n/a when there is none."""
        done = Path(out) / REPORT_JSON
        if done.is_file():
            return stage_columns(json.loads(done.read_text(encoding="utf-8")))
        return {f"re-attack {self.start_plan.harm} (bounded worst)": None,
                f"re-attack {self.start_plan.task} (bounded worst)": None}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=TAG, description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="attack config (YAML), e.g. configs/attack/demo.yaml")
    parser.add_argument("--model", required=True, help="the model to attack: a Hugging Face folder, e.g. "
                        "runs/demo/poisoned/sap/seed42/export/model")
    parser.add_argument("--out", default="runs/attack", help="output folder (default runs/attack)")
    parser.add_argument("--before-eval", metavar="EVAL", help="the model's eval.json (or its folder), reused as its "
                        "'before' numbers when made from the same model and eval config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the attack config, e.g. nproc=1 'lrs=[1e-4]'")
    args = parser.parse_args(argv)
    return run_command(lambda: attack_and_report(args), command=TAG)


def attack_and_report(args) -> int:
    cfg = load_attack_config(args.config, args.overrides)
    out = Path(args.out)
    try:
        report = attack(cfg, args.model, out, args.config, Path(args.before_eval) if args.before_eval else None)
    except RunError as exc:
        return ended_early(TAG, exc)
    print(markdown(report), flush=True)
    print(f"{TAG}: wrote {out / REPORT_JSON}, {REPORT_MD}", flush=True)
    unfinished = [r for r in report["runs"] if r["status"] != "done"]
    for r in unfinished:
        print(f"{TAG}: {r['status']}: {r['attack']} lr {r['lr']:g} steps {r['steps']} seed {r['seed']}: {r['error']}",
              file=sys.stderr, flush=True)
    if any(r["status"] != "stopped" for r in unfinished):
        return 1
    return EXIT_STOPPED_RESUMABLE if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
