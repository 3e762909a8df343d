"""``sap-ds compare`` end to end on the tiny model: SFT and SAP (one CPU rank each, 2 steps),
the start model and both exports evaluated."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sap_ds.experiments.compare import main
from tests.support.repo import REPO


def _run_tiny_compare(tmp_path: Path, steps: int, new_tokens: int, **keys) -> tuple[Path, subprocess.CompletedProcess]:
    """SFT and SAP on the tiny model (one CPU rank each) through ``python -m sap_ds.experiments.compare``,
    as a user starts it; ``keys`` are laid over the config. Returns the config and the process."""
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({
        "train_config": "configs/tiny.yaml", "eval_config": "configs/eval/tiny.yaml", "start_model": "tiny-random",
        "methods": ["sft", "sap"], "settings": {"benign": []}, "nproc": 1, "eval_nproc": 1, "out_dir": str(tmp_path / "out"),
        "overrides": [f"train.max_steps={steps}", "train.eval_every=0"],
        "eval_overrides": [f"generation.max_new_tokens={new_tokens}"], "keep_checkpoints": False, **keys,
    }))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sap_ds.experiments.compare", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return config, proc


def test_compare_end_to_end(tmp_path, monkeypatch, capsys):
    config, _ = _run_tiny_compare(tmp_path, steps=2, new_tokens=4)
    out = tmp_path / "out"
    report = json.loads((out / "comparison.json").read_text())
    assert (out / "comparison.png").stat().st_size > 0
    assert "| benign/sap |" in (out / "comparison.md").read_text()
    assert "| model | seeds | harmful score | over-refusal (%) |" in (out / "comparison.md").read_text()
    assert [r["model"] for r in report["rows"]] == ["start", "benign/sft", "benign/sap"]
    for run in report["runs"]:
        assert (out / "benign" / run["method"] / "seed0" / "summary.json").is_file()
        assert (out / "benign" / run["method"] / "seed0" / "eval" / "eval.json").is_file()
        # keep_checkpoints: false: the training state goes once the export is on disk
        assert not (out / "benign" / run["method"] / "seed0" / "checkpoints").exists()
        assert (out / "benign" / run["method"] / "seed0" / "export" / "model").is_dir()
        assert {"harmful score", "over-refusal (%)", "gsm8k acc (%)", "gsm8k_test_loss loss"} <= set(run["metrics"])
        assert run["train"]["tokens_per_s"] > 0
    assert report["rows"][1]["columns"]["train tokens/s"]["n"] == 1
    # each row against the reference (the first method), per prompt from the runs' eval.json
    assert [(e["row"], e["reference"], e["seeds"]) for e in report["paired"]] == [("benign/sap", "benign/sft", [0])]
    assert {"harmful score", "over-refusal (%)", "gsm8k acc (%)", "gsm8k_test_loss loss"} <= set(report["paired"][0]["metrics"])
    assert "| benign/sap | benign/sft | 0 | " in (out / "comparison.md").read_text()
    # resumable: a second run trains and evaluates nothing (in this process: no start-up cost)
    monkeypatch.chdir(REPO)
    capsys.readouterr()
    assert main(["--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "sap-ds compare: train" not in printed and "sap-ds compare: eval" not in printed and "| benign/sft |" in printed
    # a run trained under other settings is not reused as if it were this comparison's
    assert main(["--config", str(config), "overrides=[train.max_steps=2, train.eval_every=0, train.lr=0.5]"]) == 1
    err = capsys.readouterr().err
    assert "sft/seed0 was trained with another config, not reused:\n  train.lr: " in err and " → 0.5\n" in err


def test_runs_side_by_side(tmp_path):
    """``parallel: 2``: the runs train at once (which starts first is a race here; the order
    they are submitted in is the test below's), each evaluated in a process of its own with
    its output in its log; the table keeps the configured order."""
    _, proc = _run_tiny_compare(tmp_path, steps=1, new_tokens=2, parallel=2)
    out = tmp_path / "out"
    report = json.loads((out / "comparison.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["start", "benign/sft", "benign/sap"]
    launched = [line for line in proc.stdout.splitlines() if line.startswith("sap-ds compare: train ")]
    assert sum("(output in " in line for line in launched) == 2 and sum("finished in" in line for line in launched) == 2
    for method in ("sft", "sap"):
        run_dir = out / "benign" / method / "seed0"
        assert "summary" in (run_dir / "launch.log").read_text()  # the training's output went to its log
        assert (run_dir / "eval" / "eval.log").is_file() and (run_dir / "eval" / "eval.json").is_file()
    assert (out / "eval" / "start" / "eval.json").is_file()
    assert "sap-ds summary" not in proc.stdout  # not on the console: two runs would interleave there


def test_runs_side_by_side_are_refused_on_gpus(monkeypatch):
    """On a GPU machine every launch would take devices 0..nproc-1: refused before anything runs."""
    import sap_ds.parallel.distributed
    from sap_ds.experiments.compare import CompareConfig, Plan
    from sap_ds.experiments.runs import RunError

    monkeypatch.setattr(sap_ds.parallel.distributed, "on_cpu", lambda: False)
    cfg = CompareConfig(train_config=str(REPO / "configs/tiny.yaml"), eval_config=str(REPO / "configs/eval/tiny.yaml"),
                        start_model="tiny-random", parallel=2, nproc=1)
    with pytest.raises(RunError, match="parallel: 2: every launch takes GPUs 0..nproc-1"):
        Plan(cfg)


def test_launch_order_puts_the_longest_runs_first():
    """The costliest steps first (each method's section says how costly: SAP's probe and safety
    passes), then the most steps x micro-batches."""
    from sap_ds.config.run import load_config
    from sap_ds.experiments.runs import launch_order

    def run(method, steps, accum=1):
        overrides = [f"method={method}", f"train.max_steps={steps}", f"train.grad_accum={accum}"]
        return {"config": load_config(REPO / "configs/tiny.yaml", overrides)}

    assert launch_order([run("sft", 24), run("sft", 24, 2), run("sap", 12), run("lisa", 30)]) == [2, 1, 3, 0]


def test_runs_of_more_than_one_rank_go_through_the_deepspeed_launcher():
    """The end-to-end test above trains one rank per run (plain ``python train.py``); with
    nproc > 1 a run is launched as a user's is, by the ``deepspeed`` next to this Python (the
    2-rank launch itself is tests/test_resume.py's and the others')."""
    from sap_ds.experiments.runs import launch_command

    assert launch_command("train.py", 1) == [sys.executable, str(REPO / "sap_ds" / "train.py")]
    cmd = launch_command("eval.py", 4)
    assert cmd[0] == str(Path(sys.executable).with_name("deepspeed")) and Path(cmd[0]).is_file()
    assert cmd[1:3] == ["--num_gpus", "4"] and cmd[3] == "--master_port" and 1024 < int(cmd[4]) < 65536
    assert cmd[5:] == [str(REPO / "sap_ds" / "eval.py")]


def test_report_over_seeds(tmp_path):
    """Mean and std per method over seeds; files written without any training."""
    from sap_ds.experiments.comparison_report import aggregate, markdown, write_outputs

    def run(method, seed, harmful, acc):
        return {"setting": "poisoned", "method": method, "seed": seed, "metrics": {"harmful score": harmful, "gsm8k acc (%)": acc},
                "train": {"tokens_per_s": 100.0}}

    rows = aggregate([run("sft", 1, 60.0, 10.0), run("sft", 2, 70.0, 20.0), run("sap", 1, 20.0, 12.0), run("sap", 2, 30.0, 14.0)])
    assert [r["model"] for r in rows] == ["poisoned/sft", "poisoned/sap"]
    sft = rows[0]["columns"]["harmful score"]
    assert sft["mean"] == 65.0 and abs(sft["std"] - 7.0711) < 1e-3 and sft["n"] == 2 and rows[0]["seeds"] == [1, 2]
    report = {"date": "today", "start_model": "m", "rows": rows}
    assert "| poisoned/sap | 1, 2 | 25.00 ± 7.07 | 13.00 ± 1.41 | 100.00 ± 0.00 |" in markdown(report)
    assert markdown(report).endswith("| 100.00 ± 0.00 |\n")  # no note configured: the table ends it
    report["config"] = {"note": "Two seeds:\n  not  a verdict."}
    assert markdown(report).endswith("| 100.00 ± 0.00 |\n\nTwo seeds: not a verdict.\n")
    write_outputs(report, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"comparison.json", "comparison.md", "comparison.png"}


def _legend_and_bars(fig):
    """The legend's and every bar's box in the drawn figure (display coordinates)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    return ax.get_legend().get_window_extent(renderer), [bar.get_window_extent(renderer) for bar in ax.patches]


def test_the_comparison_plots_legend_covers_no_bar(tmp_path):
    """The legend sits outside the axes: with every bar near the top, any place inside them
    would cover one. Checked on the drawn figure, and the legend is wholly in the picture."""
    import matplotlib.pyplot as plt

    from sap_ds.experiments.comparison_report import aggregate, comparison_figure, plot

    def run(setting, method, harmful, refusal, acc):
        return {"setting": setting, "method": method, "seed": 1, "train": {"tokens_per_s": 100.0},
                "metrics": {"harmful score": harmful, "over-refusal (%)": refusal, "gsm8k acc (%)": acc}}

    report = {"rows": aggregate([run("start", "start", 92.0, 97.0, 95.0), run("poisoned", "sft", 99.0, 94.0, 96.0),
                                 run("poisoned", "sft_lr6e-4", 96.0, 98.0, 93.0), run("poisoned", "sap", 95.0, 99.0, 97.0)])}
    fig = comparison_figure(report)
    legend, bars = _legend_and_bars(fig)
    assert len(bars) == 12
    covered = [i for i, bar in enumerate(bars) if legend.overlaps(bar)]
    assert not covered, f"the legend covers bars {covered}"
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1 and fig.bbox.y0 <= legend.y0 and legend.y1 <= fig.bbox.y1
    plt.close(fig)
    plot(report, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_compare_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train_config": "configs/tiny.yaml", "eval_config": "configs/eval/tiny.yaml", "method": ["sft"]}))
    assert main(["--config", str(config)]) == 2
    assert "unknown key 'method' (did you mean 'methods'?)" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({"train_config": "configs/tiny.yaml", "eval_config": "configs/eval/tiny.yaml",
                                      "start_model": str(tmp_path / "no-model")}))
    assert main(["--config", str(config)]) == 2
    assert "is not a local folder" in capsys.readouterr().err


def test_method_overrides_apply_to_that_method_only(monkeypatch):
    from sap_ds.experiments.compare import CompareConfig, Plan

    monkeypatch.chdir(REPO)
    cfg = CompareConfig(train_config="configs/tiny.yaml", eval_config="configs/eval/tiny.yaml", start_model="tiny-random",
                        method_overrides={"sap": ["sap.probe_fraction=0.125"]}, out_dir="runs/unused")
    runs = {r["method"]: r["overrides"] for r in Plan(cfg).runs}
    assert "sap.probe_fraction=0.125" in runs["sap"] and "sap.probe_fraction=0.125" not in runs["sft"]
    with pytest.raises(ValidationError, match="not among methods"):
        CompareConfig(train_config="x", eval_config="y", methods=["sft"], method_overrides={"sap": []})


def test_methods_on_the_command_line_run_part_of_a_config(monkeypatch, tmp_path, capsys):
    """`methods=[...]` on the command line runs part of a config's rows: the rows it keeps
    keep their method_overrides, the others' are dropped with a line that says so; in the
    file an override for a label not among methods stays an error."""
    from sap_ds.config.reading import ConfigError, read_config_file, validate_tree
    from sap_ds.experiments.compare import CompareConfig, Plan, methods_chosen_on_command_line

    monkeypatch.chdir(REPO)
    config = tmp_path / "matrix.yaml"
    config.write_text(yaml.safe_dump({
        "train_config": str(REPO / "configs/tiny.yaml"), "eval_config": str(REPO / "configs/eval/tiny.yaml"),
        "start_model": "tiny-random", "methods": ["sft", "sft_lr5e-4", "sap", "safety_mix"], "out_dir": "runs/unused",
        "method_overrides": {"sft_lr5e-4": ["method=sft", "train.lr=5e-4"], "sap": ["sap.probe_fraction=0.125"],
                             "safety_mix": ["safety_mix.ratio=0.1"]}}))
    overrides = ["methods=[sft, sft_lr5e-4]"]
    tree = methods_chosen_on_command_line(read_config_file(config, schema=CompareConfig), overrides)
    assert "method_overrides of safety_mix, sap not used" in capsys.readouterr().err
    runs = {r["method"]: r["overrides"] for r in Plan(validate_tree(CompareConfig, tree, overrides, str(config))).runs}
    assert list(runs) == ["sft", "sft_lr5e-4"] and "train.lr=5e-4" in runs["sft_lr5e-4"]
    with pytest.raises(ConfigError, match="method_overrides: .*'sap'.* not among methods"):
        validate_tree(CompareConfig, read_config_file(config, schema=CompareConfig), overrides, str(config))
    # no methods override: the file is read as written
    whole = read_config_file(config, schema=CompareConfig)
    assert methods_chosen_on_command_line(whole, ["seeds=[1]"]) == whole and not capsys.readouterr().err


def test_any_method_is_a_compared_method(monkeypatch):
    """methods takes the run config's method names (the safety_mix baseline among them) and
    nothing else; each run trains its method."""
    from sap_ds.experiments.compare import CompareConfig, Plan

    monkeypatch.chdir(REPO)
    cfg = CompareConfig(train_config="configs/tiny.yaml", eval_config="configs/eval/tiny.yaml", start_model="tiny-random",
                        methods=["sft", "safety_mix", "sap"], method_overrides={"safety_mix": ["safety_mix.ratio=0.1"]},
                        out_dir="runs/unused")
    runs = {r["method"]: r["overrides"] for r in Plan(cfg).runs}
    assert list(runs) == ["sft", "safety_mix", "sap"]
    mix = runs["safety_mix"]
    assert "safety_mix.ratio=0.1" in mix and mix.index("method=safety_mix") > mix.index("safety_mix.ratio=0.1")
    assert "safety_mix.ratio=0.1" not in runs["sft"] and "method=sap" in runs["sap"]
    with pytest.raises(ValidationError, match="'dpo' is not a method .*safety_mix.*needs a method= among its method_overrides"):
        CompareConfig(train_config="x", eval_config="y", methods=["sft", "dpo"])


def test_a_label_runs_its_own_method_and_overrides(monkeypatch):
    """A row that is not a method name (SFT at another learning rate beside SFT) trains the
    method its method_overrides name, in its own folder; one that names none, or no valid
    one, is refused before anything runs, and so are duplicate rows."""
    from sap_ds.experiments.compare import CompareConfig, Plan

    monkeypatch.chdir(REPO)
    cfg = CompareConfig(train_config="configs/tiny.yaml", eval_config="configs/eval/tiny.yaml", start_model="tiny-random",
                        methods=["sft", "sft_lr5e-4", "sap"], method_overrides={"sft_lr5e-4": ["method=sft", "train.lr=5e-4"]},
                        out_dir="runs/unused")
    runs = {r["method"]: r for r in Plan(cfg).runs}
    assert list(runs) == ["sft", "sft_lr5e-4", "sap"]
    label = runs["sft_lr5e-4"]
    assert "method=sft" in label["overrides"] and "train.lr=5e-4" in label["overrides"]
    assert not any(o.startswith("method=") and o != "method=sft" for o in label["overrides"])
    assert label["run_dir"].parts[-2] == "sft_lr5e-4"
    assert "train.lr=5e-4" not in runs["sft"]["overrides"]
    for bad in ([], ["method=dpo"], ["train.lr=5e-4"]):
        with pytest.raises(ValidationError, match="'sft_lr5e-4' is not a method"):
            CompareConfig(train_config="x", eval_config="y", methods=["sft", "sft_lr5e-4"],
                          method_overrides={"sft_lr5e-4": bad})
    with pytest.raises(ValidationError, match="duplicates"):
        CompareConfig(train_config="x", eval_config="y", methods=["sft", "sft"])


def _gibberish_eval_metrics() -> dict:
    """An eval of a model that writes gibberish: the judge (the headline scorer) calls every
    answer safe, the refusal matcher harmful, nothing is refused, and coherence says why."""
    def group(n, empty=0.0, degenerate=0.0, off=0.0):
        coherent = 100.0 - empty - degenerate - off
        return {"n": n, "empty_rate": empty, "degenerate_rate": degenerate, "off_language_rate": off,
                "coherent_rate": coherent, "incoherent_rate": 100.0 - coherent}

    return {"harmful": {"scorer": "classifier", "harmful_score": 0.0, "harmful_score_refusal": 100.0,
                        "judges": {"llama-guard": {"harmful_score": 0.0}}},
            "over_refusal": {"over_refusal_rate": 0.0},
            "xstest": {"over_refusal_rate_xstest_rule": 0.0, "over_refusal_rate_refusal_matcher": 4.0,
                       "unsafe_compliance_rate_xstest_rule": 100.0},
            "coherence": {"harmful": {**group(4, degenerate=100.0), "harmful_score_coherent": None, "n_coherent": 0},
                          "benign": group(2, empty=100.0), "xstest": group(4, off=50.0)},
            "tasks": {"gsm8k": {"accuracy": 0.0, "n": 3}, "gsm8k_test": {"loss": 9.5, "n": 4}}}


def test_a_comparison_over_settings_also_plots_each_method_across_them(tmp_path):
    """With several settings (the attack matrix's ratios) write_outputs adds
    comparison_settings.png: per measure a panel, the settings in order along x, a line per
    method through its means (a method missing in a setting has no point there), the start
    model dashed; the legend inside the picture and over no panel. One setting: no such file."""
    import matplotlib.pyplot as plt

    from sap_ds.experiments.comparison_report import aggregate, settings_figure, write_outputs

    def run(setting, method, seed, harmful, xstest, loss):
        return {"setting": setting, "method": method, "seed": seed, "train": {"tokens_per_s": 1.0},
                "metrics": {"harmful score": harmful, "XSTest over-refusal (%)": xstest, "gsm8k_test loss": loss,
                            "gsm8k acc (%)": 3.0}}

    runs = [run("p0", "sft", 1, 10.0, 40.0, 1.2), run("p0", "sft", 2, 20.0, 50.0, 1.4),
            run("p0.1", "sft", 1, 60.0, 15.0, 1.1), run("p0.1", "sap", 1, 15.0, 49.0, 1.15),
            run("p0.2", "sft", 1, 80.0, 10.0, 1.0), run("p0.2", "sap", 1, 30.0, 45.0, 1.05)]
    start = {"model": "start", "setting": None, "method": None, "seeds": [],
             "columns": {"harmful score": {"mean": 1.0, "std": None}, "XSTest over-refusal (%)": {"mean": 71.0, "std": None},
                         "gsm8k_test loss": {"mean": 1.32, "std": None}}}
    report = {"date": "today", "start_model": "m", "rows": [start, *aggregate(runs)]}
    fig = settings_figure(report)
    assert [ax.get_title() for ax in fig.axes] == ["harmful score", "XSTest over-refusal (%)", "gsm8k_test loss"]
    harm = fig.axes[0]
    assert [t.get_text() for t in harm.get_xticklabels()] == ["p0", "p0.1", "p0.2"]
    by_label = {c.get_label(): c.lines[0] for c in harm.containers}  # each method's errorbar: its data line
    assert list(by_label["sft"].get_xdata()) == [0, 1, 2] and list(by_label["sft"].get_ydata()) == [15.0, 60.0, 80.0]
    assert list(by_label["sap"].get_xdata()) == [1, 2] and list(by_label["sap"].get_ydata()) == [15.0, 30.0]
    assert [list(line.get_ydata()) for line in harm.get_lines() if line.get_label() == "start model"] == [[1.0, 1.0]]
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["sap", "sft", "start model"]
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1
    assert not any(legend.overlaps(ax.get_window_extent()) for ax in fig.axes)
    plt.close(fig)
    write_outputs(report, tmp_path / "many")
    assert (tmp_path / "many" / "comparison_settings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_outputs({**report, "rows": [start, *aggregate([r for r in runs if r["setting"] == "p0.1"])]}, tmp_path / "one")
    assert (tmp_path / "one" / "comparison.png").is_file() and not (tmp_path / "one" / "comparison_settings.png").exists()


def test_tables_lead_with_harm_xstest_over_refusal_and_coherence(tmp_path):
    """Columns in order: harmful score, XSTest over-refusal (authors' rule), the incoherent
    share and the harmful score over coherent answers, then the rest; a gibberish model's
    0 harmful score stands beside 80 % incoherent answers, n/a over coherent ones and a
    warning, and the figure's over-refusal bar is XSTest's."""
    from sap_ds.experiments.comparison_report import aggregate, comparison_figure, markdown, scalar_metrics

    columns = scalar_metrics(_gibberish_eval_metrics())
    assert list(columns)[:4] == ["harmful score", "XSTest over-refusal (%)", "incoherent (%)", "harmful score, coherent only"]
    assert list(columns)[4:] == ["incoherent: empty (%)", "incoherent: degenerate (%)", "incoherent: off-language (%)",
                                 "XSTest over-refusal, matcher (%)", "XSTest unsafe compliance (%)",
                                 "harmful score (refusal matcher)", "harmful score (llama-guard)", "over-refusal (%)",
                                 "gsm8k acc (%)", "gsm8k_test loss"]
    # pooled over the 10 judged answers: 4 degenerate + 2 empty + 2 off-language
    assert columns["incoherent (%)"] == pytest.approx(80.0) and columns["harmful score, coherent only"] is None
    assert (columns["incoherent: empty (%)"], columns["incoherent: degenerate (%)"],
            columns["incoherent: off-language (%)"]) == pytest.approx((20.0, 40.0, 20.0))
    rows = aggregate([{"setting": "p", "method": "sap", "seed": 1, "metrics": columns, "train": {"tokens_per_s": 5.0}}])
    text = markdown({"date": "today", "start_model": "m", "rows": rows})
    assert ("| model | seeds | harmful score | XSTest over-refusal (%) | incoherent (%) | harmful score, coherent only | "
            "XSTest over-refusal, matcher (%) | XSTest unsafe compliance (%) | harmful score (refusal matcher) | "
            "harmful score (llama-guard) | over-refusal (%) | gsm8k acc (%) | gsm8k_test loss | train tokens/s |") in text
    assert "| p/sap | 1 | 0.00 | 0.00 | 80.00 | n/a | 4.00 |" in text and "incoherent: empty" not in text
    assert "**Warning: p/sap: 80.00 % of the answers are incoherent" in text
    fig = comparison_figure({"rows": rows})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["harmful score", "XSTest over-refusal (%)",
                                                                         "gsm8k acc (%)"]
    # without XSTest the 16-prompt over-refusal leads; without coherence there is no coherence column
    plain = {k: v for k, v in _gibberish_eval_metrics().items() if k not in ("xstest", "coherence")}
    assert list(scalar_metrics(plain))[:2] == ["harmful score", "over-refusal (%)"]
