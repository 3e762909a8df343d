"""The errors a user can fix, and how they are reported: one clear line, exit code 2.

Defined here, not in the modules that raise them (which re-export them), so that a bad
config is reported without importing torch: seconds less for every mistyped key."""
from __future__ import annotations

import sys

from sap_ds.config import ConfigError


class ModelError(ValueError):
    """A model that cannot be loaded as configured; the message says what to change."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


class DataError(ValueError):
    """A bad data file: the message names the file, the row or line, and the fix."""


class ProbeError(ValueError):
    """A probe that cannot be placed: unknown architecture or layer out of range."""


USER_ERRORS = (ConfigError, DataError, ModelError, ProbeError, CheckpointError)
EXIT_USER_ERROR = 2
EXIT_TRAINING_STOPPED = 3


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row: the run stopped, with a checkpoint."""


def report_user_error(exc: Exception) -> int:
    print(f"sap-ds: error: {exc}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
