"""Stopping and restarting a run by hand (issue 29, item 6): the stop file is a request to the
run that is training when it is made; a stopped run exits 75 ("stopped, resumable"), through
the real launcher, and compare and sweep read that code as "stopped", not as a crash or a
result; a restart finds files missing before it compares configs, and names a changed key
as ``key: old → new``, one per line."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sap_ds.errors import EXIT_STOPPED_RESUMABLE
from tests.support.launch import STOP_RUNNER, free_port
from tests.support.repo import REPO

STEPS = 3
RUN = ["--config", "configs/tiny.yaml", f"train.max_steps={STEPS}", "train.eval_every=0", "export.enabled=false"]
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _shell(command: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=REPO, env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_a_person_stops_a_run_and_restarts_it(tmp_path):
    """2 ranks through the deepspeed launcher: a stop file made during step 1 stops the run
    there with exit code 75, so `sap-ds train ... && next` does not go on; the honoured file
    is removed. A stop file left over from before the restart (what a run killed before it
    honoured one leaves) is removed with a warning, and the restart, through torchrun and
    `-m sap_ds.train` as the SLURM templates launch it, trains to the end."""
    out = tmp_path / "run"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    args = " ".join([*RUN, f"output_dir={out}"])
    stopped = _shell(f"{deepspeed} --num_gpus 2 --master_port {free_port()} {STOP_RUNNER} {args} && echo WENT-ON",
                     env={"SAP_DS_TEST_STOP_AFTER": "1"})
    printed = stopped.stdout + stopped.stderr
    assert stopped.returncode == EXIT_STOPPED_RESUMABLE, printed[-4000:]
    assert "WENT-ON" not in stopped.stdout
    assert "stopped at step 1 on request" in printed and "exit code 75: stopped, resumable" in printed
    assert not (out / "STOP").exists(), "the honoured stop file was left behind: it would stop the restart"
    assert (out / "REQUEUE").read_text().strip() == "step_00000001" and not (out / "summary.json").exists()

    (out / "STOP").touch()  # a stop file from before the restart
    time.sleep(0.05)
    restart = _shell(f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 --master_port {free_port()} "
                     f"-m sap_ds.train {args} && echo WENT-ON")
    printed = restart.stdout + restart.stderr
    assert restart.returncode == 0 and "WENT-ON" in restart.stdout, printed[-4000:]
    assert f"{out / 'STOP'} was there when this run started" in printed and "removed, training goes on" in printed
    assert "resumed from step_00000001 at step 1" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == STEPS and summary["steps_this_run"] == STEPS - 1
    assert not (out / "STOP").exists() and not (out / "REQUEUE").exists()


def test_only_a_stop_file_older_than_the_start_is_stale(tmp_path, monkeypatch, caplog):
    """A stop file made after the run started (the SLURM shell's warning trap while the ranks
    start up, or a person) is a request to this run and is kept; SAP_DS_STOP_FILE moves it."""
    from sap_ds.training.resume import clear_stale_stop_file, consume_stop_file, stop_file

    monkeypatch.delenv("SAP_DS_STOP_FILE", raising=False)
    stop = tmp_path / "STOP"
    stop.touch()
    made = stop.stat().st_mtime
    assert clear_stale_stop_file(tmp_path, started=made - 1) is None and stop.exists()
    with caplog.at_level(logging.WARNING, logger="sap_ds"):
        assert clear_stale_stop_file(tmp_path, started=made + 90) == stop and not stop.exists()
    assert f"{stop} was there when this run started (made 90 s before it)" in caplog.text
    assert clear_stale_stop_file(tmp_path, started=made + 90) is None and consume_stop_file(tmp_path) is None

    elsewhere = tmp_path / "shared" / "please-stop"
    monkeypatch.setenv("SAP_DS_STOP_FILE", str(elsewhere))
    assert stop_file(tmp_path) == elsewhere
    elsewhere.parent.mkdir()
    elsewhere.touch()
    assert consume_stop_file(tmp_path) == elsewhere and not elsewhere.exists()


# --------------------------------------------------------------------------- compare and sweep


def _exits_with(code: int):
    """A stand-in for the launcher: the command compare and sweep run for training, exiting
    with ``code`` (75: what a stopped run's launcher returns, tested above)."""
    return lambda script, nproc: [sys.executable, "-c", f"import sys; sys.exit({code})"]


def _sweep_config(tmp_path) -> Path:
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "train_config": "configs/tiny.yaml", "eval_config": "configs/eval/tiny.yaml", "start_model": "tiny-random",
        "out_dir": str(tmp_path / "out"), "nproc": 1, "eval_nproc": 1, "seeds": [0],
        "overrides": ["train.max_steps=2"], "points": {"sft": ["method=sft"]}}))
    return config


def test_sweep_takes_exit_75_as_stopped_not_failed(tmp_path, monkeypatch, capsys):
    import sap_ds.experiments.runs
    from sap_ds.experiments.sweep import main

    monkeypatch.chdir(REPO)
    config = _sweep_config(tmp_path)
    monkeypatch.setattr(sap_ds.experiments.runs, "launch_command", _exits_with(EXIT_STOPPED_RESUMABLE))
    assert main(["--config", str(config), "--only", "0"]) == EXIT_STOPPED_RESUMABLE
    err = capsys.readouterr().err
    assert "sap-ds sweep: stopped: sft seed 0: training stopped before its last step" in err and "failed" not in err
    monkeypatch.setattr(sap_ds.experiments.runs, "launch_command", _exits_with(1))
    assert main(["--config", str(config), "--only", "0"]) == 1
    assert "sap-ds sweep: failed: sft seed 0: train sft/seed0 failed with exit code 1" in capsys.readouterr().err


def test_compare_takes_exit_75_as_stopped_not_failed(tmp_path, monkeypatch, capsys):
    import sap_ds.experiments.runs
    from sap_ds.experiments.compare import main
    from sap_ds.experiments.runs import RunSet

    monkeypatch.chdir(REPO)
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({
        "train_config": "configs/tiny.yaml", "eval_config": "configs/eval/tiny.yaml", "start_model": "tiny-random",
        "methods": ["sft"], "nproc": 1, "eval_nproc": 1, "out_dir": str(tmp_path / "out"),
        "overrides": ["train.max_steps=2"]}))
    monkeypatch.setattr(RunSet, "evaluate", lambda self, model, out, in_process=True: {})  # the start model's eval
    monkeypatch.setattr(sap_ds.experiments.runs, "launch_command", _exits_with(EXIT_STOPPED_RESUMABLE))
    assert main(["--config", str(config)]) == EXIT_STOPPED_RESUMABLE
    err = capsys.readouterr().err
    assert "sap-ds compare: stopped: train default/sft/seed" in err and "running the comparison again resumes it" in err
    monkeypatch.setattr(sap_ds.experiments.runs, "launch_command", _exits_with(1))
    assert main(["--config", str(config)]) == 1
    assert "sap-ds compare: error: train default/sft/seed" in capsys.readouterr().err


# --------------------------------------------------------------------------- a restart's checks


def _finished_run(tmp_path, overrides: list[str]) -> tuple[Path, list[str]]:
    """An output folder holding a finished run of configs/tiny.yaml under ``overrides``: what
    the finished-run check reads (summary.json, and config.json as the trainer writes it)."""
    from sap_ds.config.run import config_to_dict, load_config

    out = tmp_path / "finished"
    out.mkdir()
    args = [*RUN, f"output_dir={out}", *overrides]
    (out / "config.json").write_text(json.dumps(config_to_dict(load_config(args[1], args[2:])), indent=1))
    (out / "summary.json").write_text(json.dumps({"final_step": STEPS}))
    return out, args


def test_a_restart_checks_files_before_configs_and_lists_changes_one_per_line(tmp_path, monkeypatch, capsys):
    """A mistyped data path given to a finished run's folder is a missing file (named, with
    its key), not a config change with the list of data sources printed twice; a real
    change is one `key: old → new` line per key. (sap_ds.train.main in this process: both
    end before any process group exists.)"""
    from sap_ds.train import main

    monkeypatch.chdir(REPO)
    out, args = _finished_run(tmp_path, [])
    capsys.readouterr()
    assert main(args) == 0 and f"{out} holds this run" in capsys.readouterr().out

    assert main([*args, "data.train.0.path=data/gsm8k/trian.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "data.train.0.path: file not found: data/gsm8k/trian.jsonl" in err, err
    assert "finished run" not in err and "→" not in err

    assert main([*args, "train.lr=1e-3", "data.train.0.limit=5", "data.eval=[]"]) == 2
    err = capsys.readouterr().err
    lines = err[err.index("trained under another config:"):].splitlines()
    assert lines[1].startswith("  data.eval.0: {'path': ") and lines[1].endswith(" → (not set)"), lines
    assert lines[2:4] == ["  data.train.0.limit: 64 → 5", "  train.lr: 0.003 → 0.001"], lines
    assert lines[4].startswith("To train this config, give it a new output_dir"), lines


def test_config_changes_name_entries_of_lists_and_shorten_long_values():
    from sap_ds.config.run import CHANGE_VALUE_CHARS, config_changes, config_to_dict, load_config

    tiny = REPO / "configs" / "tiny.yaml"
    saved = config_to_dict(load_config(tiny))
    long_path = "/data/" + "x" * 300 + "/train.jsonl"
    changes = config_changes(saved, load_config(tiny, [f"data.train.0.path={long_path}", "seed=7"]))
    assert len(changes) == 2 and changes[1] == f"seed: {saved['seed']} → 7", changes
    key, _, values = changes[0].partition(": ")
    old, new = values.split(" → ")
    assert key == "data.train.0.path" and old == repr(saved["data"]["train"][0]["path"])
    assert len(new) <= CHANGE_VALUE_CHARS and new.startswith("'/data/xx") and new.endswith("x/train.jsonl'") and "…" in new
