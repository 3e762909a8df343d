"""What a start of ``sap-ds train`` does with an output folder that already holds a run.

The rules (docs/design.md, "Re-runs and resumes"):

* an unfinished run (checkpoints, no ``summary.json``) resumes from its latest
  checkpoint (``train.resume: auto``), also under a changed config: the earlier config is
  kept as ``config.before_step{N}.json`` and the changed keys are logged;
* a finished run (``summary.json``) started again under the same config is done: nothing
  is trained or exported again;
* a finished run started under another config is an error naming the changed keys: its
  results would otherwise be mixed with a second setting's under one folder;
* ``train.resume: never`` starts over: the earlier run's checkpoints, metrics, summary and
  export are deleted first;
* a stop file (``$SAP_DS_STOP_FILE``, default ``<output_dir>/STOP``) is a request to the
  run that is training when it is made: the trainer deletes it once it has honoured it, and
  one made before a run started is left over from an earlier run (killed before it could
  honour it), so it is removed with a warning, as the SLURM templates do at job start.

Everything here reads files only (no process group), so ``sap_ds/train.py`` applies the
first two rules before any rank starts.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from sap_ds.config.run import RunConfig, config_changes, config_to_dict
from sap_ds.errors import ConfigError
from sap_ds.files import atomic_write_text

log = logging.getLogger("sap_ds")

SUMMARY = "summary.json"
CONFIG = "config.json"
# What a finished run leaves that a new start under train.resume=never replaces.
# train.log is not among them: it is the folder's history, appended with a header per start.
RUN_OUTPUTS = ("checkpoints", "export", "tensorboard", "metrics.jsonl", "curves.png", SUMMARY, "REQUEUE", "wandb_run_id")


def stop_file(out: Path) -> Path:
    """The file whose existence asks the training run in ``out`` to checkpoint and stop
    (checked by every rank after every step): ``$SAP_DS_STOP_FILE``, else ``out/STOP``."""
    return Path(os.environ.get("SAP_DS_STOP_FILE") or out / "STOP")


def consume_stop_file(out: Path) -> Optional[Path]:
    """Delete the stop file once the run has stopped for it (rank 0, after every rank has
    agreed to stop): left behind, it would stop the next start after one step. Returns the
    path when there was one (the stop may have come from a signal instead)."""
    path = stop_file(out)
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def clear_stale_stop_file(out: Path, started: float) -> Optional[Path]:
    """A stop file made before this run started (``started``, a ``time.time()``) asked an
    earlier run to stop, one killed before it honoured it or one from a version that left
    it behind: remove it with a warning, so that this run trains on. Called by rank 0 before
    the process group exists, hence before any rank first looks for the file. A stop file
    made after the start (a SLURM warning signal while the ranks start up) is left to be
    honoured."""
    path = stop_file(out)
    try:
        made = path.stat().st_mtime
    except FileNotFoundError:
        return None
    if made >= started:
        return None
    path.unlink(missing_ok=True)
    log.warning("%s was there when this run started (made %s before it): a stop request for an earlier run, which "
                "did not honour it; removed, training goes on. To stop this run, create the file while it trains.",
                path, _duration(started - made))
    return path


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def saved_config(out: Path) -> Optional[dict]:
    """The config.json an earlier start of this run wrote (None if there is none)."""
    path = out / CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): a change of config on resume cannot be checked", path, exc)
        return None


def finished_run(cfg: RunConfig) -> Optional[dict]:
    """The summary of the finished run in ``cfg.output_dir`` when it was trained under this
    config (the caller reports it done); None when there is no finished run there or
    ``train.resume`` is ``never``; ConfigError when it was trained under another config."""
    out = Path(cfg.output_dir)
    summary_path = out / SUMMARY
    if cfg.train.resume == "never" or not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{summary_path}: unreadable ({exc}): cannot tell whether the run there finished; "
                          "remove it to resume, or set train.resume=never to start over") from None
    previous = saved_config(out)
    if previous is None:
        changes = [f"{out / CONFIG} is missing or unreadable, so the run's config is unknown"]
    else:
        changes = config_changes(previous, cfg)
    if changes:
        raise ConfigError(
            f"output_dir {out} holds a finished run ({summary.get('final_step')} steps, {SUMMARY}) trained under "
            f"another config:\n  " + "\n  ".join(changes) + "\nTo train this config, give it a new output_dir "
            "(output_dir=...), or set train.resume=never to overwrite the finished run. (To fine-tune further from "
            f"the finished run's weights, start a new run from its export: model.path={out / 'export' / 'model'}.)"
        )
    return summary


def clear_previous_run(out: Path) -> None:
    """``train.resume: never``: delete what an earlier run left in ``out`` (rank 0 only), so
    that a later ``auto`` start can never resume from the old checkpoints or mistake the old
    summary for this run's."""
    removed = []
    for name in (*RUN_OUTPUTS, *sorted(p.name for p in out.glob("config.before_step*.json"))):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log.warning("train.resume=never: removed the earlier run's %s from %s", ", ".join(removed), out)


def record_config(out: Path, cfg: RunConfig, previous: Optional[dict], step: int) -> None:
    """Write config.json. A resume under a changed config is allowed (a longer schedule,
    another save interval, another number of ranks) but never silent: the config the earlier
    steps were trained with is kept as ``config.before_step{N}.json`` and the changed keys
    are logged, so that a result is never attributed to settings it was only partly
    trained with (sap-ds compare and sweep treat such a run as stale)."""
    out.mkdir(parents=True, exist_ok=True)
    changes = config_changes(previous, cfg) if previous is not None and step > 0 else []
    if changes:
        kept = out / f"config.before_step{step}.json"
        atomic_write_text(kept, json.dumps(previous, indent=1))
        log.warning("resumed at step %d under a config that differs from the one steps 1-%d were trained with "
                    "(that one is kept as %s):\n  %s", step, step, kept, "\n  ".join(changes))
    atomic_write_text(out / CONFIG, json.dumps(config_to_dict(cfg), indent=1))


def check_batch_on_new_world(meta: dict, cfg: RunConfig, world: int, folder: Path) -> None:
    """Resuming on another number of ranks keeps the run's global batches: the task batch
    (micro_batch_size x grad_accum x ranks) and the method's own (``MethodSection.rank_batches``:
    SAP's safety batch, safety_batch_size x ranks) index the data by step, so another size
    would skip or repeat examples and change the optimisation. Names the overrides that
    restore them."""
    problems = []
    task = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    saved_task = meta.get("global_batch")
    if saved_task is not None and saved_task != task:
        per_rank = saved_task / world
        if per_rank != int(per_rank):
            hint = f"{saved_task} examples do not split over {world} ranks; resume on a number of ranks that divides it"
        elif per_rank % cfg.train.micro_batch_size == 0:
            hint = f"set train.grad_accum={int(per_rank // cfg.train.micro_batch_size)}"
        else:
            hint = f"set train.micro_batch_size x train.grad_accum to {int(per_rank)} per rank"
        problems.append(f"the task batch was {saved_task} examples per step and would be {task} "
                        f"(train.micro_batch_size {cfg.train.micro_batch_size} x train.grad_accum "
                        f"{cfg.train.grad_accum} x {world} ranks); {hint}")
    section = cfg.method_section
    for batch in section.rank_batches:
        saved, key = meta.get(batch.meta_key), f"{section.name}.{batch.size_key}"
        now = getattr(section, batch.size_key) * world
        if saved is not None and saved != now:
            per_rank = saved / world
            hint = f"{key}={int(per_rank)}" if per_rank == int(per_rank) else "a world size that divides it"
            problems.append(f"the {batch.what} was {saved} {batch.unit} per step and would be {now} "
                            f"({key} x {world} ranks); {hint}")
    if problems:
        raise ConfigError(f"{folder}: written on {meta.get('world_size')} ranks, resumed on {world}: "
                          + "; ".join(problems) + ". Keep the global batch when the number of ranks changes.")
