"""Two-stage experiments, the config side: alignment stages (``start_stages``) that make the
model a fine-tune starts from, and which stage a sweep point or a comparison row starts from.

Alignment-stage defences (standard refusal SFT, Booster, Vaccine, RepNoise) change the
model the user fine-tunes, so comparing them means training each once and fine-tuning every
method from its export. A stage is ``start_config`` (a run config, e.g. configs/align.yaml)
with the stage's train overrides; a sweep point picks one with a ``start=NAME`` entry among its
overrides (a grid over ``start`` works too), a comparison with ``starts: [NAME, ...]``.
Pure config: the launching is ``sap_ds.experiments.stages``; the sweep's report reads this
without importing that."""
from __future__ import annotations

import re
from typing import Optional

START_KEY = "start"  # the override-like entry of a sweep point: start=<stage name>
CONFIG_KEY = "config"  # the override-like entry of a stage: config=<run config> instead of start_config
START_MODEL_TOKEN = "${start_model}"  # in a run's overrides: replaced by the model the run starts from
RESERVED = ("attack",)  # <out_dir>/start/attack is the start model's re-attack

START_CONFIG_HELP = ("Run config of the alignment stages (start_stages), e.g. ../align.yaml: each stage is this "
                     "config with its overrides, trained once with this config's seed (shared by every seed of the "
                     "fine-tunes that start from it) in <out_dir>/start/<name>, exported and evaluated.")
START_STAGES_HELP = ("Alignment stage name -> train overrides of start_config, e.g. {standard: [], lower_lr: "
                     "[train.lr=5.0e-4]}; a first entry config=<run config> trains the stage from that config "
                     "instead (a shipped name such as booster_align, or a path from the working directory). A fine-tune that names a stage starts from its export (trained first, once, "
                     "under a file lock when SLURM array tasks share it); the table gets a 'start model <name>' row "
                     "per stage.")


def split_start(overrides: list[str], name: str = START_KEY) -> tuple[Optional[str], list[str]]:
    """The stage a point's overrides name (the last ``start=NAME``; None without one) and the
    other overrides, the train overrides proper; with ``name="config"``, a stage's own run config."""
    start, rest = None, []
    for item in overrides:
        key, eq, value = item.partition("=")
        if eq and key.strip() == name:
            start = value.strip()
        else:
            rest.append(item)
    return start, rest


def check_stages(start_config: Optional[str], start_stages: dict[str, list[str]]) -> None:
    """ValueError (the config validators turn it into a ConfigError naming the file) for stage
    names that cannot be folders, a reserved name, or stages without a start_config."""
    without = [name for name, overrides in start_stages.items() if split_start(overrides, CONFIG_KEY)[0] is None]
    if without and not start_config:
        raise ValueError(f"start_stages: {', '.join(without)} need start_config (the run config the alignment stages "
                         "are trained with, e.g. start_config: ../align.yaml) or a config=<run config> entry")
    for name in start_stages:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in RESERVED or name.startswith("."):
            raise ValueError(f"start_stages: '{name}' cannot name a stage (letters, digits, . _ - only; "
                             f"not {', '.join(RESERVED)}: <out_dir>/start/attack is the start model's re-attack)")


def check_start(where: str, start: Optional[str], start_stages: dict[str, list[str]]) -> None:
    """ValueError naming ``where`` (the config key) when ``start`` names no stage."""
    if start is not None and start not in start_stages:
        valid = ", ".join(start_stages) if start_stages else "none: the config has no start_stages"
        raise ValueError(f"{where}: start={start} is not among start_stages ({valid})")
