"""Entry point: ``sap-ds compare --config COMPARE_YAML [key=value ...]``.

The experiment of the paper in one command: fine-tune the same (aligned) starting model
with each method (SFT, SAP, or any other ``method:``, e.g. the safety_mix baseline) on the
same data, seed and budget, for every attack setting
and seed; evaluate the starting model and every exported model with one eval config;
write ``comparison.json``, ``comparison.md`` and ``comparison.png`` to ``out_dir``.

Training runs go through the DeepSpeed launcher (``deepspeed --num_gpus N
sap_ds/train.py``) exactly as a user would start them (``sap_ds.experiments.runs``, which
``sap-ds sweep`` shares), in ``<out_dir>/<setting>/<method>/seed<seed>``. It is resumable: a run folder with a
``summary.json`` is not trained again (an interrupted run resumes from its checkpoint,
the trainer's ``train.resume: auto``; a run stopped on request, exit code 75, ends the
comparison with that code), and an ``eval.json`` made from the same model and
eval config is not recomputed. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from pydantic import Field, model_validator

from sap_ds.config.methods import METHOD_SECTIONS
from sap_ds.config.reading import CONFIG_PATH, parse_overrides, read_config_file, validate_tree
from sap_ds.entry import run_command
from sap_ds.evaluation.config import _Section
from sap_ds.experiments.attack import AttackStage
from sap_ds.experiments.comparison_report import (aggregate, markdown, mean_std, paired_comparisons, run_row,
                                                 scalar_metrics, write_outputs)
from sap_ds.experiments.runs import RunError, RunSet, RunStopped, ended_early, run_side_by_side
from sap_ds.experiments.stage_config import START_CONFIG_HELP, START_STAGES_HELP, check_start, check_stages
from sap_ds.experiments.stages import StartStages

METHODS = tuple(METHOD_SECTIONS)  # the run config's method: values

class CompareConfig(_Section):
    train_config: str = Field(json_schema_extra=CONFIG_PATH, description="Base run config, e.g. configs/demo.yaml.")
    eval_config: str = Field(json_schema_extra=CONFIG_PATH, description="Eval config, e.g. configs/eval/demo.yaml.")
    start_model: Optional[str] = Field(None, description="Model every run starts from (default: the train config's model.path).")
    methods: list[str] = Field(default_factory=lambda: ["sft", "sap"],
                               description="Run config 'method:' values, e.g. [sft, safety_mix, sap], or labels of "
                               "other runs whose method_overrides name their method (sft_lr5e-4: [method=sft, "
                               "train.lr=5.0e-4]), each a row of the table.")
    seeds: Optional[list[int]] = Field(None, description="Default: the train config's seed.")
    settings: dict[str, list[str]] = Field(default_factory=lambda: {"default": []},
                                           description="Attack setting name -> train overrides.")
    nproc: int = Field(2, gt=0, description="Ranks per training run (deepspeed --num_gpus).")
    parallel: int = Field(1, gt=0, description="Training runs at once, each its own launch of nproc ranks, each "
                          "evaluated as soon as it finishes. On CPU, nproc 1 x parallel = cores beats one run of all "
                          "cores (no gloo collectives between ranks; "
                          "measured in docs/results.md). Refused on GPUs, where every launch takes devices 0..nproc-1.")
    eval_nproc: Optional[int] = Field(None, gt=0, description="Ranks per evaluation (default: nproc); 1 runs it in-process.")
    out_dir: str = "runs/compare"
    overrides: list[str] = Field(default_factory=list, description="Train overrides for every run.")
    method_overrides: dict[str, list[str]] = Field(default_factory=dict,
                                                   description="Method (or label) -> train overrides for its runs only.")
    eval_overrides: list[str] = Field(default_factory=list)
    reference: Optional[str] = Field(None, description="The row every other row is compared with (paired "
                                     "difference and its 95 % bootstrap interval), one of methods; default: the first.")
    matched_reference: Optional[str] = Field(None, description="A second reference, e.g. SFT at the learning rate whose "
                                             "task loss matches the defence's (sft_lr6e-4): a slower attack also "
                                             "learns less harm, so a defence is read against it too.")
    note: Optional[str] = Field(None, description="Printed under the table (comparison.md and stdout): what the "
                                "numbers do and do not show, e.g. that one seed cannot separate two methods.")
    keep_checkpoints: bool = Field(True, description="false: delete a run's ZeRO checkpoints once it has finished "
                                   "and exported (a full training state per run otherwise stays on disk); an "
                                   "interrupted or failed run keeps its own for resuming.")
    attack_config: Optional[str] = Field(None, json_schema_extra=CONFIG_PATH, description="An attack config "
                                         "(configs/attack/demo.yaml): every run's export and the start model are "
                                         "attacked again after their evaluation (sap-ds attack, in <run_dir>/attack "
                                         "and <out_dir>/start/attack) and the table gets the bounded worst case.")

    start_config: Optional[str] = Field(None, json_schema_extra=CONFIG_PATH, description=START_CONFIG_HELP)
    start_stages: dict[str, list[str]] = Field(default_factory=dict, description=START_STAGES_HELP)
    starts: Optional[list[str]] = Field(None, description="Stages of start_stages to fine-tune from, a dimension of "
                                        "the table beside settings and methods (rows <setting>/<start>/<method>, "
                                        "runs in <out_dir>/<setting>/<start>/<method>/seed<seed>); default: "
                                        "start_model alone. Each row is compared with the reference of its own "
                                        "setting and start, and with the same method from the first start.")

    @model_validator(mode="after")
    def _non_empty(self) -> "CompareConfig":
        if not self.methods or not self.settings or self.seeds == []:
            raise ValueError("methods, seeds and settings must each have at least one entry")
        unknown = sorted(set(self.method_overrides) - set(self.methods))
        if unknown:
            raise ValueError(f"method_overrides: {unknown} not among methods {self.methods}")
        for label in self.methods:
            if label not in METHODS and run_method(label, self.method_overrides.get(label, [])) is None:
                raise ValueError(f"methods: '{label}' is not a method ({', '.join(METHODS)}); as the label of a "
                                 f"run of its own it needs a method= among its method_overrides, e.g. {label}: "
                                 "[method=sft, train.lr=5.0e-4]")
        for key in ("reference", "matched_reference"):
            if getattr(self, key) is not None and getattr(self, key) not in self.methods:
                raise ValueError(f"{key}: '{getattr(self, key)}' is not among methods {self.methods}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods has duplicates: {self.methods}")
        check_stages(self.start_config, self.start_stages)
        if self.starts is not None:
            if not self.starts or len(set(self.starts)) != len(self.starts):
                raise ValueError(f"starts: give distinct stage names of start_stages, not {self.starts}")
            for start in self.starts:
                check_start("starts", start, self.start_stages)
        return self


def run_method(label: str, overrides: list[str]) -> Optional[str]:
    """The method a row of the comparison trains with: the label itself when it is a method
    name, else the last valid ``method=`` among its overrides (None if there is none)."""
    named = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "method"]
    named = [m for m in named if m in METHODS]
    return named[-1] if named else (label if label in METHODS else None)


# --------------------------------------------------------------------------- the plan


class Plan(RunSet):
    """Every training run and evaluation of one comparison: settings x methods x seeds."""

    tag = "sap-ds compare"

    def __init__(self, cfg: CompareConfig):
        from sap_ds.evaluation.config import to_dict

        super().__init__(cfg)
        self.eval_config = to_dict(self.eval_cfg)
        # the alignment stages the rows start from (starts), every stage's config validated now
        self.stages = StartStages(cfg, self.out, self.tag) if cfg.starts else None
        for setting, setting_overrides in cfg.settings.items():
            for start in cfg.starts or [None]:
                where = self.out / setting / start if start else self.out / setting
                for label in cfg.methods:  # a method's name, or the label of a run whose overrides name its method
                    for seed in self.seeds:
                        self.add_run(where / label / f"seed{seed}", f"{setting}-{start + '-' if start else ''}{label}-{seed}",
                                     seed, [*setting_overrides, *cfg.method_overrides.get(label, []),
                                            *([f"method={label}"] if label in METHODS else [])],
                                     start_model=self.stages.model(start) if start else None,
                                     setting=setting, start=start, method=label)

    def train(self, run: dict, what: str = "", echo: bool = True) -> dict:
        what = what or f"train {run_row(run)}/seed{run['seed']}"
        summary = super().train(run, what, echo)
        if summary is None:
            raise RunStopped(f"{what} stopped before its last step (a stop was requested); its checkpoint is in "
                             f"{run['run_dir'] / 'checkpoints'} and running the comparison again resumes it")
        return summary


# --------------------------------------------------------------------------- main


def _finished_run(plan: "Plan", run: dict, alone: bool, stage: Optional[AttackStage] = None) -> dict:
    """Train (or reuse) one run, then evaluate its export, then (with ``attack_config``)
    attack the export again: one row's worth of results. A run that is not ``alone`` (others
    beside it) keeps its output to its logs and evaluates in a process of its own."""
    summary = plan.train(run, echo=alone)
    model = plan.exported_model(run)
    metrics = plan.evaluate(model, run["run_dir"] / "eval", in_process=alone)
    reattack = stage.run(model, run["run_dir"] / stage.FOLDER, run["run_dir"] / "eval", alone) if stage else {}
    return {"setting": run["setting"], "start": run["start"], "method": run["method"], "seed": run["seed"],
            "run_dir": str(run["run_dir"]),
            "model": model, "metrics": {**scalar_metrics(metrics), **reattack}, "eval": metrics,
            "train": {k: summary.get(k) for k in ("tokens_per_s", "final_train_loss", "final_eval_loss",
                                                   "final_step", "wall_time_s", "harmful_examples", "train_examples")}}


def run_all(plan: "Plan") -> tuple[dict, list[dict]]:
    """The start model's metrics and every run's results, in the plan's order. With
    ``parallel: N`` N runs train at once (longest first); a failure stops new launches, lets
    the running ones finish (their results stay on disk for the next call) and is raised.
    With ``attack_config`` the re-attack's configs are all validated first, and the start
    model's re-attack columns are left in ``plan.start_attack``."""
    start_out = plan.out / "eval" / "start"
    stage = AttackStage(plan.cfg.attack_config, plan.start_model, plan.out, plan.tag) if plan.cfg.attack_config else None
    plan.start_attack = {}
    # the alignment stages first, one after another (their fine-tunes wait on them anyway)
    plan.start_rows = {name: plan.stages.ensure(name, stage) for name in plan.cfg.starts or []}
    if plan.cfg.parallel == 1:
        start = plan.evaluate(plan.start_model, start_out)
        if stage:
            plan.start_attack = stage.run(plan.start_model, stage.start_out, start_out, alone=True)
        return start, [_finished_run(plan, run, True, stage) for run in plan.runs]
    start, results = run_side_by_side(plan, plan.runs, lambda run: _finished_run(plan, run, False, stage), start_out)
    if stage:
        plan.start_attack = stage.run(plan.start_model, stage.start_out, start_out, alone=True)
    return start, [results[i] for i in range(len(plan.runs))]


def compare(cfg: CompareConfig, source: str) -> dict:
    plan = Plan(cfg)
    start_metrics, runs = run_all(plan)
    start = {"metrics": {**scalar_metrics(start_metrics), **plan.start_attack}}
    start_row = {"model": "start", "setting": None, "method": None, "seeds": [],
                 "columns": {k: mean_std([v]) for k, v in start["metrics"].items()}}
    stage_rows = [{"model": f"start model {name}", "setting": None, "start": name, "method": None, "seeds": [row["seed"]],
                   "columns": {k: mean_std([v]) for k, v in row["metrics"].items()}} for name, row in plan.start_rows.items()]
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": source,
              "config": cfg.model_dump(mode="json"), "start_model": plan.start_model, "eval_config": plan.eval_config,
              "start": start, "starts": plan.start_rows, "runs": runs, "rows": [start_row, *stage_rows, *aggregate(runs)],
              "paired": paired_comparisons(runs, cfg.reference or cfg.methods[0], cfg.matched_reference)}
    write_outputs(report, plan.out)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sap-ds compare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="compare config (YAML), e.g. configs/compare_demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. nproc=1 'seeds=[1,2]'")
    args = parser.parse_args(argv)
    return run_command(lambda: compare_and_report(args))


def methods_chosen_on_command_line(tree: dict, overrides: list[str]) -> dict:
    """``tree`` with the method_overrides of the labels a ``methods=[...]`` override leaves
    out dropped, and a line that says which: running part of a config's rows (``sap-ds
    compare --config the_matrix.yaml 'methods=[sft, sap]'``) needs no copy of the file. In the
    file itself an override for an unlisted label stays an error (most often a typo)."""
    chosen = dict(parse_overrides(list(overrides))).get("methods")
    table = tree.get("method_overrides")
    if not isinstance(chosen, list) or not isinstance(table, dict):
        return tree
    unused = [label for label in table if label not in chosen]
    if unused:
        print(f"sap-ds compare: methods={chosen} from the command line; method_overrides of {', '.join(unused)} "
              "not used", file=sys.stderr, flush=True)
    return {**tree, "method_overrides": {label: value for label, value in table.items() if label in chosen}}


def compare_and_report(args) -> int:
    tree = methods_chosen_on_command_line(read_config_file(args.config, schema=CompareConfig), args.overrides)
    cfg = validate_tree(CompareConfig, tree, args.overrides, args.config)
    try:
        report = compare(cfg, args.config)
    except RunError as exc:
        return ended_early("sap-ds compare", exc)
    print(markdown(report), flush=True)
    print(f"sap-ds compare: wrote {Path(cfg.out_dir) / 'comparison.json'}, comparison.md, comparison.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
