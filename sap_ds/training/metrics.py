"""Metrics to JSONL (one object per logged step, appended and flushed), TensorBoard and,
when ``logging.wandb`` is set, Weights & Biases.

JSONL is the record of truth that scripts read and is always written; TensorBoard and W&B
are for looking. Only rank 0 writes. Nothing is opened before ``open()`` (the trainer
calls it once it knows whether an earlier run's files are to be kept or replaced).

W&B: ``mode: offline`` writes the run under ``<output_dir>/wandb`` without any network
(``wandb sync`` uploads it later); a resumed run continues the same W&B run (its id is
kept in ``<output_dir>/wandb_run_id``).

``TrainLog`` keeps ``<output_dir>/train.log``: the console's ``sap_ds`` messages and the
per-step lines, appended across starts (``step_line`` formats them, for the console too
where it is not a terminal and shows them instead of a progress bar).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Optional

from sap_ds.errors import ConfigError, add_error_recorder, remove_error_recorder
from sap_ds.files import atomic_write_text

WANDB_ID_FILE = "wandb_run_id"
TRAIN_LOG = "train.log"
WANDB_VERSION = "0.31.0"  # the version the dev extra and requirements-cpu.txt install


def check_logging(cfg) -> None:
    """Before step 1: W&B asked for but not installed is a ConfigError, not a silent skip."""
    if cfg.logging.wandb is not None and cfg.logging.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"logging.wandb: W&B logging is set (project '{cfg.logging.wandb.project}') but the wandb package is not "
            f"installed: pip install 'sap-ds[wandb]' (or wandb=={WANDB_VERSION}), or remove logging.wandb "
            "(metrics.jsonl and TensorBoard are always written)"
        )


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool = True, logging_cfg=None, run_config: Optional[dict] = None,
                 run_name: str = "run"):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.logging_cfg = logging_cfg
        self.run_config = run_config or {}
        self.run_name = run_name
        self._tb = None
        self._file = None
        self._wandb = None

    def open(self) -> None:
        if not self.enabled or self._file is not None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if self.logging_cfg is None or self.logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but logging must never kill a run
                self._tb = None
        wandb_cfg = self.logging_cfg.wandb if self.logging_cfg is not None else None
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self._wandb = self._start_wandb(wandb_cfg)

    def _start_wandb(self, wandb_cfg):
        import wandb

        id_file = self.out_dir / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else secrets.token_hex(4)
        atomic_write_text(id_file, run_id + "\n")
        return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode,
                          name=wandb_cfg.name or self.run_name, tags=wandb_cfg.tags or None, dir=str(self.out_dir),
                          config=self.run_config, id=run_id, resume="allow")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.open()
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(numbers, step=record["step"])

    def log_final_eval(self, step: int, eval_loss: Optional[float]) -> None:
        """The final eval of a start that ran no step (its last step and checkpoint came from
        an earlier start, which died before summary.json): a record of its own at that step,
        unless metrics.jsonl has the eval there already (the loop logs the final eval with the
        last step's record, so a finished run has one record per step)."""
        if not self.enabled or eval_loss is None or self._has_eval_at(step):
            return
        self.log({"step": step, "eval_loss": eval_loss})

    def _has_eval_at(self, step: int) -> bool:
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return False
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and record.get("step") == step and record.get("eval_loss") is not None:
                return True
        return False

    def summary(self, values: dict) -> None:
        """The run's final numbers (W&B run summary; the trainer writes summary.json)."""
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in values.items() if isinstance(v, (int, float, str)) or v is None})

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def step_line(record: dict, total_steps: int) -> str:
    """One logged step as a plain line: step, loss, lr, tokens/s, and the eval loss when
    the step evaluated (train.log; the console where it is not a terminal)."""
    loss = record.get("loss")
    parts = [f"step {record['step']}/{total_steps}",
             f"loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "loss n/a",
             f"lr {record['lr']:.3g}", f"{record['tokens_per_s']:.0f} tokens/s"]
    if "eval_loss" in record:
        parts.append(f"eval loss {record['eval_loss']:.4f}" if record["eval_loss"] is not None else "eval loss n/a")
    return "  ".join(parts)


class _TrainLogHandler(logging.Handler):
    """Writes train.log; until the run is under way it holds the records instead, so that a
    start refused before step 1 leaves the output folder as it was (the console has its
    messages)."""

    def __init__(self, formatter: logging.Formatter):
        super().__init__(logging.NOTSET)
        self.setFormatter(formatter)
        self.pending: list[logging.LogRecord] = []
        self.stream = None
        self.opened = time.localtime()  # the header's time: when this start began, before the records it holds

    def begin(self, path: Path, header: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(path, "a", encoding="utf-8")
        self.stream.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S', self.opened)} {header} ====\n")
        pending, self.pending = self.pending, []
        for record in pending:  # formatted now, with the times they were logged at
            self.emit(record)
        self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self.pending.append(record)
            return
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging's rule: a failed log line never stops the program
            self.handleError(record)

    def record_error(self, message: str) -> None:
        """A line the console got outside the ``sap_ds`` logger (the error that ends a run)."""
        logger = logging.getLogger("sap_ds")
        self.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None))

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


class TrainLog:
    """``<output_dir>/train.log`` (rank 0): what the console shows from the ``sap_ds`` logger,
    the per-step lines (also when the console shows a progress bar instead) and an error that
    ended the run, appended across starts with a header line for each. The console of a job
    is easily lost (a SLURM output file per requeue, a closed terminal); this file stays with
    the run's metrics and checkpoints.

    ``open()`` (when the trainer is built) starts collecting the messages, ``start()`` (once
    the run is under way, where config.json is written) writes them after the header: a
    start refused before step 1 writes nothing."""

    FORMAT = "%(asctime)s %(levelname)s %(message)s"

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = Path(out_dir) / TRAIN_LOG
        self.enabled = enabled
        self._handler: Optional[_TrainLogHandler] = None

    def open(self) -> None:
        if not self.enabled or self._handler is not None:
            return
        self._handler = _TrainLogHandler(logging.Formatter(self.FORMAT, "%Y-%m-%d %H:%M:%S"))
        logging.getLogger("sap_ds").addHandler(self._handler)
        add_error_recorder(self._handler.record_error)  # the user error that ends the run, as the console shows it

    def start(self, header: str) -> None:
        """The run is under way: append the header line for this start and what was logged so far."""
        if self._handler is not None and self._handler.stream is None:
            self._handler.begin(self.path, header)

    def write(self, line: str, echo: bool = False) -> None:
        """A line (a step's) to train.log, and with ``echo`` to the console as well (through the
        ``sap_ds`` logger, so it looks like the other console lines). Rank 0 only, like the file."""
        if not self.enabled:
            return
        logger = logging.getLogger("sap_ds")
        if echo and logger.isEnabledFor(logging.INFO):
            logger.info(line)
        elif self._handler is not None:
            self._handler.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, None, None))

    def close(self) -> None:
        if self._handler is not None:
            remove_error_recorder(self._handler.record_error)
            logging.getLogger("sap_ds").removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def record_in_train_log(message: str) -> None:
    """A line the console got outside the ``sap_ds`` logger (the error that ends a run) into
    the train.log of this process's run, if one is under way."""
    for handler in logging.getLogger("sap_ds").handlers:
        if isinstance(handler, _TrainLogHandler):
            handler.record_error(message)
