"""The errors a user can fix, and how they are reported: one clear line, exit code 2."""
from __future__ import annotations

import sys

from sap_ds.checkpoint import CheckpointError
from sap_ds.config import ConfigError
from sap_ds.data import DataError
from sap_ds.modeling import ModelError
from sap_ds.probe import ProbeError

USER_ERRORS = (ConfigError, DataError, ModelError, ProbeError, CheckpointError)
EXIT_USER_ERROR = 2
EXIT_TRAINING_STOPPED = 3


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row: the run stopped, with a checkpoint."""


def report_user_error(exc: Exception) -> int:
    print(f"sap-ds: error: {exc}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
