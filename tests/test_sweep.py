"""``sap-ds sweep``: a tiny sweep end to end (named point + grid, one rank, 2 steps), its
resumption, the SLURM-array entry points, and the point expansion and Pareto logic."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from sap_ds.experiments.sweep import main
from sap_ds.experiments.sweep_config import Range, SweepConfig, expand_points, point_name
from sap_ds.experiments.sweep_report import pareto_front
from tests.support.repo import REPO


def tiny_sweep(tmp_path, **extra) -> dict:
    return {"train_config": "configs/tiny.yaml", "eval_config": "configs/eval/tiny.yaml", "start_model": "tiny-random",
            "out_dir": str(tmp_path / "out"), "nproc": 1, "eval_nproc": 1, "seeds": [0],
            "overrides": ["train.max_steps=2", "train.eval_every=0"],
            "eval_overrides": ["generation.max_new_tokens=4", "tasks=[{kind: test_loss, name: gsm8k_test, "
                               "path: data/gsm8k/test.jsonl, format: gsm8k, limit: 4, max_length: 96}]"],
            "points": {"sft": ["method=sft"]}, "grid": {"sap.rho": [0.01]}, "search_overrides": ["method=sap"],
            "reference": "sft", **extra}


def test_sweep_end_to_end_resume_and_failure(tmp_path, monkeypatch, capsys):
    """A named point, a grid point and a point that diverges (lr 1e30: non-finite loss, the
    trainer stops with exit 3): the failure is recorded and the sweep goes on."""
    diverges = ["method=sft", "train.lr=1.0e+30", "train.max_bad_steps=1", "train.max_steps=4"]
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path, points={"sft": ["method=sft"], "diverges": diverges},
                                                keep_checkpoints=False),
                                     sort_keys=False))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sap_ds.experiments.sweep", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "failed: diverges seed 0" in proc.stderr and "launch.log" in proc.stderr
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["point"], r["status"]) for r in records] == [("sft", "done"), ("diverges", "failed"), ("sap.rho=0.01", "done")]
    for r in (records[0], records[2]):
        assert {"harmful score", "over-refusal (%)", "gsm8k_test loss"} <= set(r["metrics"]) and r["train"]["final_step"] == 2
        assert (out / r["point"] / "seed0" / "eval" / "eval.json").is_file()
    # each point really ran with its overrides
    sap_config = json.loads((out / "sap.rho=0.01" / "seed0" / "config.json").read_text())
    assert sap_config["method"] == "sap" and sap_config["sap"]["rho"] == 0.01
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["task_metric"] == "gsm8k_test loss" and summary["start"]["harmful score"] is not None
    assert {r["point"] for r in summary["rows"]} == {"sft", "sap.rho=0.01"} and summary["failed"][0]["point"] == "diverges"
    assert any(r["pareto"] for r in summary["rows"])
    assert next(r for r in summary["rows"] if r["point"] == "sft")["vs_reference"]["task_loss_change"] == 0.0
    assert (out / "sweep.png").stat().st_size > 0 and "| sft | 0 |" in (out / "sweep.md").read_text()
    assert "| point | seeds | harmful score | over-refusal (%) | gsm8k_test loss |" in (out / "sweep.md").read_text()
    # keep_checkpoints: false drops a finished run's training state, never a failed run's
    assert not (out / "sft" / "seed0" / "checkpoints").exists() and (out / "sft" / "seed0" / "export" / "model").is_dir()
    assert (out / "diverges" / "seed0" / "checkpoints").is_dir()

    # resumable: a second call trains only what did not finish (the failed point), in this process
    monkeypatch.chdir(REPO)
    capsys.readouterr()
    assert main(["--config", str(config)]) == 1
    printed = capsys.readouterr().out
    assert printed.count("sap-ds sweep: train") == 1 and "train diverges/seed0" in printed
    # SLURM array entry points: --list numbers the runs, --report trains nothing
    assert main(["--config", str(config), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:3] for line in listed] == [["0", "sft", "seed 0"], ["1", "diverges", "seed 0"],
                                                         ["2", "sap.rho=0.01", "seed 0"]]
    assert main(["--config", str(config), "--report", "seeds=[0,1]"]) == 0
    printed = capsys.readouterr().out
    assert "sap-ds sweep: train" not in printed and "| sft | 0 |" in printed
    # the paired intervals come from the runs' eval.json on disk
    paired = json.loads((out / "sweep.json").read_text())["paired"]
    assert [(e["row"], e["reference"], e["seeds"]) for e in paired] == [("sap.rho=0.01", "sft", [0])]
    assert {"harmful score", "over-refusal (%)", "gsm8k_test loss"} <= set(paired[0]["metrics"])
    # --eval-only: the trained runs on another eval set, into their own folder; nothing trains
    assert main(["--config", str(config), "--eval-only", "--points", "sft,diverges", "eval_dir=eval_other",
                 "eval_overrides=[generation.max_new_tokens=2]"]) == 0
    printed = capsys.readouterr().out
    assert "sap-ds sweep: train" not in printed and printed.count("sap-ds sweep: eval") == 2  # start, sft
    assert (out / "sft" / "seed0" / "eval_other" / "eval.json").is_file() and (out / "eval_other" / "sweep.md").is_file()
    assert not (out / "sap.rho=0.01" / "seed0" / "eval_other").exists()
    assert main(["--config", str(config), "--list", "--points", "nope"]) == 2
    assert "--points: no point named nope" in capsys.readouterr().err
    assert json.loads((out / "sft" / "seed0" / "eval" / "eval.json").read_text())["config"]["generation"]["max_new_tokens"] == 4
    # a run trained under other settings is not reused: the train config changed under the
    # SAP point (a key SFT does not read, so the SFT run still counts)
    assert main(["--config", str(config), "--report", "overrides=[train.max_steps=2, train.eval_every=0, sap.temperature=2.0]"]) == 1
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "sap-ds sweep: train" not in printed
    assert "\n  sap.temperature: 1.0 → 2.0\n" in printed and "Move the folder away" in printed
    records = {r["point"]: r["status"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert records == {"sft": "done", "sap.rho=0.01": "stale"}


def test_runs_side_by_side(tmp_path):
    """``parallel: 2``: the runs train at once, longest first (the SAP point before SFT), each
    with its output in its logs; the report keeps the sweep's order and has every run."""
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path, parallel=2, keep_checkpoints=False), sort_keys=False))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sap_ds.experiments.sweep", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["index"], r["point"], r["status"]) for r in records] == [(0, "sft", "done"), (1, "sap.rho=0.01", "done")]
    launched = [line for line in proc.stdout.splitlines() if line.startswith("sap-ds sweep: train ")]
    # 2 starts, then 2 ends: both ran at once (which of the two threads prints its start line first is a race)
    assert len(launched) == 4 and all("(output in " in line for line in launched[:2])
    # ... and SAP was submitted first: the order the pool took them in
    from sap_ds.config.reading import read_config_file, validate_tree
    from sap_ds.experiments.runs import launch_order
    from sap_ds.experiments.sweep import Sweep

    cfg = validate_tree(SweepConfig, read_config_file(str(config), schema=SweepConfig), [], str(config))
    runs = Sweep(cfg).runs
    assert [runs[i]["point"] for i in launch_order(runs)] == ["sap.rho=0.01", "sft"]
    assert sum("(output in " in line for line in launched) == 2 and sum("finished in" in line for line in launched) == 2
    for point in ("sft", "sap.rho=0.01"):
        run_dir = out / point / "seed0"
        assert "summary" in (run_dir / "launch.log").read_text()
        assert (run_dir / "eval" / "eval.log").is_file() and (run_dir / "eval" / "eval.json").is_file()
    assert (out / "eval" / "start" / "eval.json").is_file() and "| sft | 0 |" in (out / "sweep.md").read_text()
    assert "sap-ds summary" not in proc.stdout  # not on the console: two runs would interleave there


def test_runs_side_by_side_are_refused_on_gpus(monkeypatch, capsys, tmp_path):
    """As in ``sap-ds compare``: every launch would take GPUs 0..nproc-1."""
    import sap_ds.parallel.distributed

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sap_ds.parallel.distributed, "on_cpu", lambda: False)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path, parallel=2)))
    assert main(["--config", str(config), "--list"]) == 1
    assert "parallel: 2: every launch takes GPUs 0..nproc-1" in capsys.readouterr().err


def test_expand_points_grid_and_random():
    cfg = SweepConfig(train_config="x", eval_config="y", points={"sft": ["method=sft"]},
                      grid={"sap.rho": [0.01, 0.1], "sap.probe_layers": [[3, 9], [6]]}, search_overrides=["method=sap"],
                      random={"sap.probe_lr": Range(min=0.01, max=1.0, log=True), "sap.probe_reset": [True, False]}, samples=3)
    points = expand_points(cfg)
    names = list(points)
    assert names[:5] == ["sft", "sap.rho=0.01,sap.probe_layers=3-9", "sap.rho=0.01,sap.probe_layers=6",
                         "sap.rho=0.1,sap.probe_layers=3-9", "sap.rho=0.1,sap.probe_layers=6"]
    assert points[names[2]] == ["method=sap", "sap.rho=0.01", "sap.probe_layers=[6]"]
    random_points = names[5:]
    assert 1 <= len(random_points) <= 3 and random_points == list(expand_points(cfg))[5:]  # same seed, same draws
    for name in random_points:
        lr = float(name.split("sap.probe_lr=")[1].split(",")[0])
        assert 0.01 <= lr <= 1.0


def test_a_safety_mix_ratio_grid_is_a_sweep(tmp_path, monkeypatch, capsys):
    """Any method is a sweep point: SafeInstr's ratio grid (method safety_mix) against SFT
    validates against the train config and lists its runs; a bad ratio names its point."""
    monkeypatch.chdir(REPO)
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path, grid={"safety_mix.ratio": [0.03, 0.1]},
                                                search_overrides=["method=safety_mix"])))
    assert main(["--config", str(config), "--list"]) == 0
    listed = [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines()]
    assert listed == [["0", "sft"], ["1", "safety_mix.ratio=0.03"], ["2", "safety_mix.ratio=0.1"]]
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path, grid={"safety_mix.ratio": [0.0]},
                                                search_overrides=["method=safety_mix"])))
    assert main(["--config", str(config), "--list"]) == 2
    assert "sweep point 'safety_mix.ratio=0.0'" in capsys.readouterr().err


def test_point_name_and_pareto():
    assert point_name({"data.harmful_ratio": 0.2, "sap.kernels": "torch"}) == "data.harmful_ratio=0.2,sap.kernels=torch"
    front = pareto_front([("a", 10.0, 1.0), ("b", 5.0, 1.2), ("c", 12.0, 1.1), ("d", 5.0, 1.3), ("e", 1.0, 2.0)])
    assert front == {"a", "b", "e"}  # c is beaten by a on both, d by b on loss


def test_bad_sweep_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path, points={"bad": ["sap.rhoo=0.1"]}, grid={}, reference=None)))
    assert main(["--config", str(config)]) == 2
    assert "sweep point 'bad'" in capsys.readouterr().err
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path, points={}, grid={}, reference=None)))
    assert main(["--config", str(config)]) == 2
    assert "a sweep needs points, a grid, or random ranges" in capsys.readouterr().err
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path, reference="nope")))
    assert main(["--config", str(config)]) == 2
    assert "reference 'nope' is not one of the named points" in capsys.readouterr().err
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path, curve=["sft", "sft_lr1"])))
    assert main(["--config", str(config)]) == 2
    assert "curve: sft_lr1 not among the named points ['sft']" in capsys.readouterr().err
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path), sort_keys=False))
    assert main(["--config", str(config), "--only", "7"]) == 2
    assert "the sweep has runs 0..1" in capsys.readouterr().err


def test_plot_draws_the_curve_through_its_points_in_order(tmp_path, monkeypatch):
    """``curve``: the named points joined in the config's order (not sorted, not the front),
    points without results left out."""
    from sap_ds.experiments import sweep_report
    from sap_ds.experiments.sweep_report import plot

    figures = []
    monkeypatch.setattr(sweep_report, "atomic_save_figure", lambda fig, path, dpi: figures.append(fig))
    cell = lambda harm, loss: {"harmful score": {"mean": harm, "std": 1.0}, "gsm8k_test loss": {"mean": loss, "std": 0.01}}
    rows = [{"point": name, "pareto": False, "columns": cell(h, l)}
            for name, h, l in [("lr_low", 20.0, 1.20), ("sft", 60.0, 1.10), ("lr_mid", 40.0, 1.15), ("sap", 15.0, 1.16)]]
    summary = {"harm_metric": "harmful score", "task_metric": "gsm8k_test loss", "rows": rows, "start": None,
               "config": {"curve": ["sft", "lr_mid", "missing", "lr_low"]}}
    plot(summary, tmp_path / "p.png")
    lines = [ln for ln in figures[0].axes[0].get_lines() if ln.get_label() == "sft - lr_mid - lr_low"]
    assert len(lines) == 1
    assert list(lines[0].get_xdata()) == [60.0, 40.0, 20.0] and list(lines[0].get_ydata()) == [1.10, 1.15, 1.20]


@pytest.mark.parametrize("spec", [{"min": 2.0, "max": 1.0}, {"min": 0.0, "max": 1.0, "log": True}])
def test_bad_ranges(spec):
    with pytest.raises(ValueError):
        Range(**spec)


def test_the_report_names_configs_relative_to_the_working_directory(tmp_path, monkeypatch):
    """sweep.md's header: config paths arrive resolved; under the working directory they are
    shown relative to it (no machine path pasted into docs), elsewhere as given."""
    from sap_ds.experiments.sweep_report import shown_path

    monkeypatch.chdir(REPO)
    assert shown_path(str(REPO / "configs" / "demo.yaml")) == "configs/demo.yaml"
    assert shown_path(str(tmp_path / "x.yaml")) == str(tmp_path / "x.yaml")


def test_the_sweep_table_leads_with_harm_over_refusal_coherence_then_task():
    from sap_ds.experiments.sweep_report import markdown

    stat = lambda v: {"mean": v, "std": None, "n": 1}  # noqa: E731
    columns = {"gsm8k_test loss": stat(1.2), "over-refusal (%)": stat(10.0), "harmful score": stat(20.0),
               "XSTest over-refusal (%)": stat(8.0), "incoherent (%)": stat(70.0), "incoherent: empty (%)": stat(70.0),
               "harmful score, coherent only": stat(None), "train tokens/s": stat(3.0), "XSTest unsafe compliance (%)": stat(5.0)}
    summary = {"harm_metric": "harmful score", "task_metric": "gsm8k_test loss", "start": None, "failed": [],
               "date": "today", "config": {"train_config": "configs/tiny.yaml"},
               "rows": [{"point": "sap", "seeds": [0], "pareto": True, "columns": columns}]}
    text = markdown(summary)
    assert ("| point | seeds | harmful score | XSTest over-refusal (%) | incoherent (%) | harmful score, coherent only | "
            "gsm8k_test loss | over-refusal (%) | XSTest unsafe compliance (%) | train tokens/s | Pareto |") in text
    assert "| sap | 0 | 20.00 | 8.00 | 70.00 | n/a | 1.2000 | 10.00 | 5.00 | 3.00 | yes |" in text
    assert "**Warning: sap: 70.00 % of the answers are incoherent" in text


def test_a_stop_outside_the_runs_exits_75_to_resume(tmp_path, monkeypatch, capsys):
    """A stop request that lands during the start model's re-attack (outside any run's record)
    is a resumable stop, 75 as `sap-ds train` and every run's own stop, not a failure (1)."""
    from sap_ds.experiments import sweep as sweep_module
    from sap_ds.experiments.runs import RunError, RunStopped

    monkeypatch.chdir(REPO)
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path)))

    def stopped(*args, **kwargs):
        raise RunStopped("attack pure_bad on the start model stopped on request before its last step")
    monkeypatch.setattr(sweep_module, "run_sweep", stopped)
    assert main(["--config", str(config)]) == 75
    assert "stopped: attack pure_bad on the start model" in capsys.readouterr().err

    def failed(*args, **kwargs):
        raise RunError("evaluation of the start model failed")
    monkeypatch.setattr(sweep_module, "run_sweep", failed)
    assert main(["--config", str(config)]) == 1
