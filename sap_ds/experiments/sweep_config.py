"""What a sweep is: its config (``SweepConfig``, the random ``Range``) and its points, the
named ones, the grid's combinations and the random draws, each a name and train overrides.

Apart from the runner (``sap_ds.experiments.sweep``) and the report
(``sap_ds.experiments.sweep_report``), which both read it: the report needs the config
and none of the launching."""
from __future__ import annotations

import itertools
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field, model_validator

from sap_ds.config.reading import CONFIG_PATH
from sap_ds.evaluation.config import _Section
from sap_ds.experiments.stage_config import START_CONFIG_HELP, START_STAGES_HELP, check_start, check_stages, split_start


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
    attack_config: Optional[str] = Field(None, json_schema_extra=CONFIG_PATH, description="An attack config "
                                         "(configs/attack/demo.yaml): every run's export is attacked again after its "
                                         "evaluation (in <run_dir>/attack; --only I does its run's), the start model "
                                         "too (<out_dir>/start/attack), and the table gets the bounded worst case.")
    start_config: Optional[str] = Field(None, json_schema_extra=CONFIG_PATH, description=START_CONFIG_HELP)
    start_stages: dict[str, list[str]] = Field(default_factory=dict, description=START_STAGES_HELP + " A point "
                                               "starts from one with start=<name> among its overrides (or a grid "
                                               "over start); a point without one starts from start_model.")
    start_references: dict[str, str] = Field(default_factory=dict, description="Start stage -> named point: every "
                                             "point starting from that stage is also compared with this point (e.g. "
                                             "SAP on a Booster start with SFT on the same start), besides reference.")
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
    matched_reference: Optional[str] = Field(None, description="A second point the table compares against, e.g. SFT "
                                             "at the learning rate whose task loss matches the defence's (a slower "
                                             "attack also learns less harm).")
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
        if self.matched_reference is not None and self.matched_reference not in self.points:
            raise ValueError(f"matched_reference '{self.matched_reference}' is not one of the named points {sorted(self.points)}")
        unknown = [c for c in self.curve if c not in self.points]
        if unknown:
            raise ValueError(f"curve: {', '.join(unknown)} not among the named points {sorted(self.points)}")
        check_stages(self.start_config, self.start_stages)
        for name, overrides in expand_points(self).items():
            check_start(f"points.{name}" if name in self.points else f"point {name}", split_start(overrides)[0],
                        self.start_stages)
        for stage, point in self.start_references.items():
            check_start(f"start_references.{stage}", stage, self.start_stages)
            if point not in self.points:
                raise ValueError(f"start_references.{stage}: '{point}' is not one of the named points {sorted(self.points)}")
            if split_start(self.points[point])[0] != stage:
                raise ValueError(f"start_references.{stage}: point '{point}' does not start from {stage} (no start={stage})")
        return self

    def report_dir(self) -> Path:
        """Where the outputs go: ``out_dir``, or ``<out_dir>/<eval_dir>`` for another evaluation of the same runs."""
        return Path(self.out_dir) if self.eval_dir == "eval" else Path(self.out_dir) / self.eval_dir


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
