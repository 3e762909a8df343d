"""Two-stage experiments (``start_stages``): an alignment stage trained once and shared by the
fine-tunes that start from it, under a lock that two SLURM array tasks (two processes here)
share; the validation before step 1; the start rows and the pairing of the reports."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from pydantic import ValidationError

from sap_ds.experiments.sweep import main
from tests.support.repo import REPO

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def two_stage_sweep(tmp_path, **extra) -> dict:
    """Two 1-step fine-tunes of the tiny model from one 1-step alignment stage."""
    return {"train_config": "configs/tiny.yaml", "eval_config": "configs/eval/tiny.yaml", "out_dir": str(tmp_path / "out"),
            "nproc": 1, "eval_nproc": 1, "seeds": [0], "overrides": ["train.max_steps=1", "train.eval_every=0"],
            "eval_overrides": ["generation.max_new_tokens=2", "tasks=[{kind: test_loss, name: gsm8k_test, "
                               "path: data/gsm8k/test.jsonl, format: gsm8k, limit: 4, max_length: 96}]"],
            "start_config": "configs/tiny.yaml",
            "start_stages": {"aligned": ["train.max_steps=1", "train.eval_every=0", "seed=5"]},
            "points": {"a": ["start=aligned", "method=sft"], "b": ["start=aligned", "method=sft", "train.lr=1.0e-3"]},
            "reference": "a", **extra}


def test_two_array_tasks_train_their_shared_stage_once(tmp_path, monkeypatch, capsys):
    """``--only 0`` and ``--only 1`` at once (two SLURM array tasks): the stage is trained by
    one of them only, and both fine-tunes start from its export; ``--report`` gives the
    stage its row; a changed stage is reported stale, not reused."""
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(two_stage_sweep(tmp_path), sort_keys=False))
    tasks = [subprocess.Popen([sys.executable, "-m", "sap_ds.experiments.sweep", "--config", str(config), "--only", str(i)],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sum(o.count("sap-ds sweep: train start stage aligned") for o in outputs) == 1, outputs
    out = tmp_path / "out"
    stage = out / "start" / "aligned"
    assert json.loads((stage / "config.json").read_text())["seed"] == 5  # one alignment, its own seed
    for point in ("a", "b"):
        assert json.loads((out / point / "seed0" / "config.json").read_text())["model"]["path"] == str(stage / "export" / "model")

    monkeypatch.chdir(REPO)
    capsys.readouterr()
    assert main(["--config", str(config), "--report"]) == 0
    printed = capsys.readouterr().out
    assert "train" not in printed.split("# sweep")[0] and "| start model aligned | 5 |" in printed
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["starts"]["aligned"]["model"] == str(stage / "export" / "model")
    assert {r["point"] for r in summary["rows"]} == {"a", "b"}
    assert main(["--config", str(config), "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("\tstart aligned")

    # the stage's config changed after it finished: stale, never silently reused
    config.write_text(yaml.safe_dump(two_stage_sweep(tmp_path, start_stages={"aligned": ["train.max_steps=1",
                                     "train.eval_every=0", "seed=5", "train.lr=1.0e-4"]}), sort_keys=False))
    assert main(["--config", str(config), "--only", "0"]) == 1
    err = capsys.readouterr().err
    assert "failed: a seed 0" in err and "was trained with another config" in err and "train.lr" in err


LOCKER = """
import sys, time
from pathlib import Path
from sap_ds.experiments.stages import stage_lock
with stage_lock(Path(sys.argv[1]), "test"):
    Path(sys.argv[2]).write_text(repr(time.time()))
    time.sleep(float(sys.argv[3]))
    Path(sys.argv[2] + ".out").write_text(repr(time.time()))
"""


def test_the_stage_lock_makes_a_second_process_wait(tmp_path):
    lock = tmp_path / "start" / "s.lock"
    first = subprocess.Popen([sys.executable, "-c", LOCKER, str(lock), str(tmp_path / "first"), "2"], cwd=REPO, env=ENV)
    deadline = time.time() + 60
    while not (tmp_path / "first").exists():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", LOCKER, str(lock), str(tmp_path / "second"), "0"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert first.wait(timeout=60) == 0 and second.returncode == 0, second.stderr
    assert "waiting for" in second.stdout
    assert float((tmp_path / "second").read_text()) >= float((tmp_path / "first.out").read_text())


def test_bad_two_stage_configs_fail_before_step_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    config = tmp_path / "s.yaml"

    def fails(expected: str, **extra) -> None:
        config.write_text(yaml.safe_dump(two_stage_sweep(tmp_path, **extra)))
        assert main(["--config", str(config), "--list"]) == 2
        err = capsys.readouterr().err
        assert expected in err, err

    fails("points.b: start=nope is not among start_stages (aligned)", points={"a": ["start=aligned"], "b": ["start=nope"]})
    fails("start=aligned is not among start_stages (none", start_stages={}, start_config=None)
    fails("start_stages: aligned need start_config", start_config=None)
    fails("start_stages: 'attack' cannot name a stage", start_stages={"attack": []}, points={"a": ["start=attack"]})
    fails("point start=x: start=x is not among start_stages", grid={"start": ["x"]})
    fails("start_stages.aligned (over", start_stages={"aligned": ["train.bogus=1"]})
    fails("start_references.aligned: point 'c' does not start from aligned",
          points={"a": ["start=aligned"], "c": ["method=sft"]}, start_references={"aligned": "c"})
    fails(f"start_model: '{tmp_path / 'missing'}' is not a local folder", start_model=str(tmp_path / "missing"))
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_a_point_names_its_start_model_in_its_overrides(monkeypatch):
    """``${start_model}`` in an override is the model the run starts from (SafeLoRA's aligned model)."""
    from sap_ds.experiments.sweep import Sweep
    from sap_ds.experiments.sweep_config import SweepConfig

    monkeypatch.chdir(REPO)
    cfg = SweepConfig(**two_stage_sweep(REPO / "runs" / "unused", points={
        "plain": ["method=sft"],
        "safelora": ["start=aligned", "method=sft", "lora.enabled=true", "export.safelora.enabled=true", "export.safelora.base_model=tiny-random",
                     "export.safelora.aligned_model=${start_model}"]}, reference=None))
    runs = {run["point"]: run for run in Sweep(cfg).runs}
    stage_model = str(REPO / "runs" / "unused" / "out" / "start" / "aligned" / "export" / "model")
    assert runs["safelora"]["config"].model.path == stage_model
    assert runs["safelora"]["config"].export.safelora.aligned_model == stage_model
    assert runs["plain"]["config"].model.path == "tiny-random" and runs["plain"]["start"] is None


def test_compare_crosses_starts_with_methods_and_pairs_within_a_start(monkeypatch):
    from sap_ds.experiments import comparison_report
    from sap_ds.experiments.compare import CompareConfig, Plan

    monkeypatch.chdir(REPO)
    base = {"train_config": "configs/tiny.yaml", "eval_config": "configs/eval/tiny.yaml", "start_model": "tiny-random",
            "out_dir": "runs/unused", "seeds": [0], "start_config": "configs/tiny.yaml",
            "start_stages": {"std": [], "boost": ["config=tiny", "train.lr=1.0e-4"]}}
    plan = Plan(CompareConfig(**base, starts=["std", "boost"]))
    assert [(r["start"], r["method"], str(r["run_dir"])) for r in plan.runs] == [
        ("std", "sft", "runs/unused/default/std/sft/seed0"), ("std", "sap", "runs/unused/default/std/sap/seed0"),
        ("boost", "sft", "runs/unused/default/boost/sft/seed0"), ("boost", "sap", "runs/unused/default/boost/sap/seed0")]
    assert {r["config"].model.path for r in plan.runs if r["start"] == "boost"} == {"runs/unused/start/boost/export/model"}
    stage = plan.stages.runs["boost"]  # config=<shipped name>: that run config, with the stage's overrides
    assert stage["train_config"] == str(REPO / "configs" / "tiny.yaml") and stage["config"].train.lr == 1.0e-4
    monkeypatch.setattr(comparison_report, "paired_rows", lambda groups, pairs: pairs)
    assert comparison_report.paired_comparisons(plan.runs, "sft", None) == [
        ("default/std/sft", "default/std/sft", "reference"), ("default/std/sap", "default/std/sft", "reference"),
        ("default/boost/sft", "default/boost/sft", "reference"), ("default/boost/sap", "default/boost/sft", "reference"),
        ("default/boost/sft", "default/std/sft", "first start"), ("default/boost/sap", "default/std/sap", "first start")]
    for bad, match in (({"starts": ["nope"]}, "starts: start=nope is not among start_stages"),
                       ({"starts": []}, "starts: give distinct stage names"),
                       ({"starts": ["std"], "start_config": None}, "start_stages: std need start_config")):
        with pytest.raises(ValidationError, match=match):
            CompareConfig(**{**base, **bad})


def test_sweep_pairs_with_the_reference_and_the_same_start_reference(monkeypatch):
    from sap_ds.experiments import sweep_report
    from sap_ds.experiments.sweep_config import SweepConfig

    cfg = SweepConfig(train_config="t", eval_config="e", start_config="s", start_stages={"std": [], "boost": []},
                      points={"sft": ["start=std"], "boost_sft": ["start=boost"], "boost_sap": ["start=boost", "method=sap"]},
                      reference="sft", start_references={"boost": "boost_sft"})
    done = [{"point": p, "start": s, "seed": 1, "run_dir": "r"} for p, s in
            (("sft", "std"), ("boost_sft", "boost"), ("boost_sap", "boost"))]
    monkeypatch.setattr(sweep_report, "paired_rows", lambda groups, pairs: pairs)
    assert sweep_report.paired_points(cfg, done) == [
        ("sft", "sft", "reference"), ("boost_sft", "sft", "reference"), ("boost_sap", "sft", "reference"),
        ("boost_sft", "boost_sft", "same-start reference"), ("boost_sap", "boost_sft", "same-start reference")]


def test_a_stage_stopped_for_preemption_requeues_the_array_task(tmp_path, monkeypatch):
    """slurm/common.sh requeues a task on the REQUEUE marker in its own run folder; a stage
    stopped inside that task leaves the marker in the stage's folder, so the sweep copies it."""
    from sap_ds.experiments.runs import RunStopped
    from sap_ds.experiments.sweep import Sweep
    from sap_ds.experiments.sweep_config import SweepConfig

    monkeypatch.chdir(REPO)
    sweep = Sweep(SweepConfig(**two_stage_sweep(tmp_path)))
    run = sweep.runs[0]

    def stopped(name, attack_stage=None, train=True):
        stage_dir = sweep.stages.runs[name]["run_dir"]
        stage_dir.mkdir(parents=True)
        (stage_dir / "REQUEUE").write_text("step_00001\n")
        raise RunStopped("start stage aligned stopped before its last step")

    monkeypatch.setattr(sweep.stages, "ensure", stopped)
    record = sweep.execute(run)
    assert record["status"] == "stopped" and (run["run_dir"] / "REQUEUE").read_text() == "step_00001\n"
