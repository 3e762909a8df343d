"""The errors a user can fix, and how they are reported: one clear line, exit code 2.

Defined here, not in the modules that raise them (which re-export them), so that a bad
config is reported without importing torch: seconds less for every mistyped key."""
from __future__ import annotations

import sys
from typing import Callable


class ConfigError(ValueError):
    """A bad configuration: the message names the file, the key and what would be valid."""


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
# Stopped on request (SIGUSR1, SIGTERM or the stop file), with a checkpoint: the same command
# resumes the run. Not 0, so that `sap-ds train ... && sap-ds eval ...` does not go on to an
# export that does not exist; sysexits.h's EX_TEMPFAIL ("a temporary failure; the user is
# invited to retry"), which no Python error or launcher uses for anything else.
EXIT_STOPPED_RESUMABLE = 75


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row: the run stopped, with a checkpoint."""


# Where a reported error's line goes besides stderr: a run under way adds its train.log here
# (sap_ds.training.metrics.TrainLog), so that a run that ended on a user error has the reason in
# output_dir/train.log too. Registered from above rather than imported from here: this module is
# the foundation every other one imports, and imports none of them.
_ERROR_RECORDERS: list[Callable[[str], None]] = []


def add_error_recorder(recorder: Callable[[str], None]) -> None:
    """Give ``recorder`` every line ``report_user_error`` prints, until ``remove_error_recorder``."""
    _ERROR_RECORDERS.append(recorder)


def remove_error_recorder(recorder: Callable[[str], None]) -> None:
    if recorder in _ERROR_RECORDERS:
        _ERROR_RECORDERS.remove(recorder)


def report_user_error(exc: Exception, command: str = "sap-ds") -> int:
    message = f"{command}: error: {exc}"
    print(message, file=sys.stderr, flush=True)
    for record in list(_ERROR_RECORDERS):
        record(message)
    return EXIT_USER_ERROR
