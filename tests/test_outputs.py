"""What a run leaves in output_dir and shows on the console, through the real CLI
(``python sap_ds/train.py``, one CPU rank): the final eval in metrics.jsonl and TensorBoard,
train.log, no checkpoints/.staging, plain per-step lines where the console is not a
terminal (a pipe here, as in a SLURM job) and a progress bar with tokens/s where it is (a
pseudo-terminal), and curves.png, also across a stop and resume."""
from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading
import types
from pathlib import Path

import pytest

from sap_ds.training.curves import curve_series
from tests.support.launch import free_port, run_single
from tests.support.repo import REPO

STEPS = 4
# logged at steps 2 and 4 (log_every), evaluated at 3 (eval_every) and at the last step (the final eval)
FINISHED = ["--config", "configs/tiny.yaml", "export.enabled=false", f"train.max_steps={STEPS}", "train.eval_every=3",
            "train.log_every=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _log_messages(out: Path) -> list[str]:
    """train.log's messages without their date, time and level (header lines left out)."""
    return [line.split(" ", 3)[3] for line in (out / "train.log").read_text().splitlines() if not line.startswith("====")]


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()  # the whole file decodes: not a file cut short
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.size[1] > 200


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run whose console is a pipe (what a batch job's output file is)."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    proc = run_single([*FINISHED, f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_the_final_eval_is_the_last_steps_record_in_metrics_and_tensorboard(finished):
    """The final eval is logged at the final step, in the same record as that step's loss (one
    record per step, never a second one for the eval), and reaches TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished
    records = _records(out)
    final_eval = json.loads((out / "summary.json").read_text())["final_eval_loss"]
    assert [r["step"] for r in records] == [2, 3, STEPS]
    assert "eval_loss" not in records[0] and math.isfinite(records[1]["eval_loss"])
    assert records[-1]["eval_loss"] == final_eval and math.isfinite(records[-1]["loss"])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    evals = {e.step: e.value for e in events.Scalars("eval_loss")}
    assert sorted(evals) == [3, STEPS] and evals[STEPS] == pytest.approx(final_eval, rel=1e-6)


def test_a_console_that_is_not_a_terminal_gets_plain_step_lines_instead_of_a_bar(finished):
    _, proc = finished
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[sap-ds] step ")]
    assert [line.split()[2] for line in lines] == ["2/4", "3/4", "4/4"], proc.stderr[-3000:]
    for line in lines:
        assert re.search(r"  loss \d+\.\d{4}  lr \S+  \d+ tokens/s", line), line
    assert "eval loss" not in lines[0] and all(re.search(r"eval loss \d+\.\d{4}$", line) for line in lines[1:])
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr, "a progress bar was written to a pipe"


def test_train_log_holds_the_consoles_messages_and_the_step_lines(finished):
    out, proc = finished
    header = (out / "train.log").read_text().splitlines()[0]
    assert header.startswith("==== ") and "start at step 0 of 4: sap-ds" in header and "train.max_steps=4" in header
    console = [line[len("[sap-ds] "):] for line in proc.stderr.splitlines() if line.startswith("[sap-ds] ")]
    messages = _log_messages(out)
    assert any(m.startswith("optimizer: ") for m in messages) and any(m.startswith("step 3/4") for m in messages)
    assert [m for m in messages if m in console] == console, "train.log misses a console message or reorders them"
    assert messages[-1].startswith(f"finished at step {STEPS}: train loss ") and "curves.png" in messages[-1]


def test_a_finished_run_leaves_no_staging_folder_and_draws_its_curves(finished):
    out, _ = finished
    checkpoints = out / "checkpoints"
    assert (checkpoints / f"step_{STEPS:08d}").is_dir() and not (checkpoints / ".staging").exists()
    assert (checkpoints / "zero_to_fp32.py").is_file(), "DeepSpeed's recovery script was not kept beside latest"
    _assert_png(out / "curves.png")
    series = curve_series(out / "metrics.jsonl")
    assert series["steps"] == [2, 3, STEPS] and series["eval_steps"] == [3, STEPS]


def test_a_start_that_runs_no_step_logs_no_second_final_eval(finished, tmp_path):
    """A run that died after its last checkpoint, before summary.json: the next start runs no
    step, evaluates, and finds that eval already in metrics.jsonl."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    (out / "summary.json").unlink()
    proc = run_single([*FINISHED, f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_this_run"] == 0
    records = _records(out)
    assert [r["step"] for r in records] == [2, 3, STEPS] and summary["final_eval_loss"] == records[-1]["eval_loss"]
    assert (out / "train.log").read_text().count(f"start at step {STEPS} of {STEPS}: ") == 1


def test_the_final_eval_of_a_start_without_steps_is_logged_where_it_is_missing(tmp_path):
    from sap_ds.training.metrics import MetricsLogger

    metrics = MetricsLogger(tmp_path)
    metrics.log({"step": 3, "loss": 1.0, "eval_loss": 2.0})
    metrics.log_final_eval(3, 2.0)  # there already
    metrics.log_final_eval(4, 1.5)  # the last step's record was lost with the crash
    metrics.log_final_eval(5, None)  # no eval data
    metrics.close()
    assert _records(tmp_path) == [{"step": 3, "loss": 1.0, "eval_loss": 2.0}, {"step": 4, "eval_loss": 1.5}]
    assert curve_series(tmp_path / "metrics.jsonl")["eval_steps"] == [3, 4]


def _run_on_terminal(args: list[str], timeout: int = 300) -> tuple[int, str]:
    """``python sap_ds/train.py`` with stderr on a pseudo-terminal (what a user at a terminal
    has; tqdm writes there) and stdout piped: (exit code, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, "sap_ds/train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    shown: list[bytes] = []

    def read_terminal():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        proc.communicate(timeout=timeout)
    finally:
        reader.join(timeout=30)
        os.close(master)
    return proc.returncode, b"".join(shown).decode("utf-8", errors="replace")


def test_a_stopped_and_resumed_run_on_a_terminal(tmp_path):
    """Stopped after step 1 (its stop file), then resumed from a terminal with an interrupted
    save's leftovers in checkpoints/.staging: the leftovers are removed, the terminal shows
    a bar with tokens/s and no plain step lines, and train.log and curves.png hold both starts."""
    steps = 3
    args = ["--config", "configs/tiny.yaml", "export.enabled=false", f"train.max_steps={steps}", "train.eval_every=0",
            f"output_dir={tmp_path / 'run'}"]
    out = tmp_path / "run"
    first = run_single(args, stop_after=1)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001", first.stderr[-4000:]
    leftover = out / "checkpoints" / ".staging" / "step_00000002"
    leftover.mkdir(parents=True)
    (leftover / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half written")

    code, terminal = _run_on_terminal(args)
    assert code == 0, terminal[-4000:]
    assert not (out / "checkpoints" / ".staging").exists()
    assert re.search(r"tok/s=\d+", terminal), terminal[-3000:]
    assert "[sap-ds] step 2/3" not in terminal, "plain step lines on a terminal that shows the bar"

    text = (out / "train.log").read_text()
    assert text.count(" start at step 0 of 3: ") == 1 and text.count(" start at step 1 of 3: ") == 1
    messages = _log_messages(out)
    steps_logged = [m.split()[1] for m in messages if m.startswith("step ")]
    assert steps_logged == ["1/3", "2/3", "3/3"], messages
    assert any("stop requested" in m for m in messages)
    assert any(m.startswith("removed ") and ".staging/step_00000002" in m for m in messages)
    assert [r["step"] for r in _records(out)] == [1, 2, 3] and "eval_loss" in _records(out)[-1]
    series = curve_series(out / "metrics.jsonl")
    assert series["steps"] == [1, 2, 3] and series["eval_steps"] == [3]
    _assert_png(out / "curves.png")


def test_a_plot_that_fails_is_a_warning_not_a_failed_run(tmp_path, caplog):
    from sap_ds.training.trainer import Trainer

    fake = types.SimpleNamespace(out=tmp_path, step=3, cfg=types.SimpleNamespace(run_name="r", method="sft"))
    with caplog.at_level("WARNING", logger="sap_ds"):
        assert Trainer._write_curves(fake) is False  # no metrics.jsonl to draw
    assert "curves.png not written" in caplog.text and not (tmp_path / "curves.png").exists()


def test_train_log_is_written_only_once_the_run_is_under_way_and_records_the_error_that_ends_it(tmp_path, capsys):
    """A start refused before step 1 leaves the output folder as it was (tests/test_bad_input.py),
    so train.log holds its messages back until the run is under way; an error after that is in it."""
    import logging

    from sap_ds.errors import ConfigError, report_user_error
    from sap_ds.training.metrics import TrainLog

    refused = TrainLog(tmp_path / "refused")
    refused.open()
    logging.getLogger("sap_ds").warning("data: 3 rows dropped")
    report_user_error(ConfigError("sap.rho: too small"))
    refused.close()
    assert not (tmp_path / "refused").exists()

    started = TrainLog(tmp_path / "run")
    started.open()
    logging.getLogger("sap_ds").warning("data: 3 rows dropped")
    started.start("start at step 0 of 2: test")
    report_user_error(ConfigError("data.train.0.path: row 7: no 'answer'"))
    started.close()
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert lines[0].startswith("==== ") and lines[0].endswith(" start at step 0 of 2: test ====")
    assert lines[1].endswith("WARNING data: 3 rows dropped")
    assert lines[2].endswith("ERROR sap-ds: error: data.train.0.path: row 7: no 'answer'")
    capsys.readouterr()
