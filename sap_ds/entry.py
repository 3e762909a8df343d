"""What every command's ``main`` does around its own work, written once: the version floors
checked before anything heavy is imported, the console's log lines, and a user error
reported as one line with exit code 2 (its reason in the run's train.log too).

Exit codes (README, "Exit codes"): 0 done, 2 a user error (a bad config, input file or
checkpoint, or a package below its floor), 3 stopped by the numerical guard and 75 stopped
on request (the work returns those itself), 1 anything else (a traceback).

A command documented to be run by path (``deepspeed sap_ds/train.py``, ``sap_ds/bench.py``,
``sap_ds/eval.py``, which ``sap-ds compare`` launches so) puts the checkout on ``sys.path``
itself, in one line before its first ``sap_ds`` import: this module cannot, being one."""
from __future__ import annotations

import logging
from typing import Callable, Optional

from sap_ds.dependencies import refuse_old_packages
from sap_ds.errors import USER_ERRORS, report_user_error


def run_command(work: Callable[[], int], version_floors: Optional[str] = None, console_log: bool = False,
                user_errors: tuple[type[Exception], ...] = (), command: str = "sap-ds") -> int:
    """``work()``'s exit code, or 2 with one line on stderr for a user error it raised.

    ``version_floors``: the command whose package floors to check first
    (``sap_ds.dependencies.COMMAND_PACKAGES``; a package below its floor is exit code 2).
    ``console_log``: the ``sap_ds`` logger's INFO lines on the console, as ``[sap-ds] ...``.
    ``user_errors``: the command's own user errors besides ``USER_ERRORS`` (the planner's
    ``PlanError``); ``command``: the line's prefix, ``<command>: error: ...``."""
    if version_floors is not None and (code := refuse_old_packages(version_floors)) is not None:
        return code
    if console_log:
        logging.basicConfig(level=logging.INFO, format="[sap-ds] %(message)s")
    try:
        return work()
    except (*USER_ERRORS, *user_errors) as exc:
        return report_user_error(exc, command)
