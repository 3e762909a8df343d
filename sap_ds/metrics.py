"""Metrics to JSONL (one object per logged step, appended and flushed), TensorBoard and,
when ``logging.wandb`` is set, Weights & Biases.

JSONL is the record of truth that scripts read and is always written; TensorBoard and W&B
are for looking. Only rank 0 writes. Nothing is opened before ``open()`` (the trainer
calls it once it knows whether an earlier run's files are to be kept or replaced).

W&B: ``mode: offline`` writes the run under ``<output_dir>/wandb`` without any network
(``wandb sync`` uploads it later); a resumed run continues the same W&B run (its id is
kept in ``<output_dir>/wandb_run_id``).
"""
from __future__ import annotations

import importlib.util
import json
import math
import secrets
from pathlib import Path
from typing import Optional

WANDB_ID_FILE = "wandb_run_id"
WANDB_VERSION = "0.31.0"  # the version the dev extra and requirements-cpu.txt install


def check_logging(cfg) -> None:
    """Before step 1: W&B asked for but not installed is a ConfigError, not a silent skip."""
    from sap_ds.config import ConfigError

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

        from sap_ds.checkpoint import atomic_write_text

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
