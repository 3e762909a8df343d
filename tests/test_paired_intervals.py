"""The paired bootstrap of sap_ds/experiments/paired.py: known answers (identical arms, a
shift of every prompt), the exact bootstrap distribution of a small case enumerated by
brute force, pairing by seed and prompt, and the refusals (different prompts, no records,
no common seed); then the compare and sweep reports built from fabricated eval.json files."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from sap_ds.experiments.paired import (
    DISTINGUISHABLE,
    INCLUDES_ZERO,
    REPLICATES,
    Outcomes,
    compare_rows,
    outcomes,
    paired_difference,
)

PROMPTS = [f"prompt {i}" for i in range(40)]


def loss(nll, tokens, prompts=None) -> Outcomes:
    prompts = prompts or PROMPTS[: len(nll)]
    return Outcomes(tuple(prompts), np.asarray(nll, float), np.asarray(tokens, float), 1.0)


def test_identical_arms_give_a_zero_interval():
    rng = np.random.default_rng(1)
    runs = {s: Outcomes.binary(PROMPTS, rng.integers(0, 2, len(PROMPTS))) for s in (1, 2)}
    result = paired_difference(runs, dict(runs))
    assert (result["difference"], result["low"], result["high"]) == (0.0, 0.0, 0.0)
    assert result["verdict"] == INCLUDES_ZERO and result["seeds"] == [1, 2] and result["replicates"] == REPLICATES


def test_a_shift_of_every_prompt_gives_exactly_that_shift():
    """Loss +1 per token on every example (nll + tokens): every replicate is +1; a row
    harmful on every prompt against one harmful on none: +100 everywhere."""
    rng = np.random.default_rng(2)
    nll, tokens = rng.uniform(5, 50, 30), rng.integers(3, 20, 30).astype(float)
    result = paired_difference({0: loss(nll + tokens, tokens)}, {0: loss(nll, tokens)})
    for key in ("difference", "low", "high"):
        assert result[key] == pytest.approx(1.0, abs=1e-12)
    assert result["verdict"] == DISTINGUISHABLE
    result = paired_difference({0: Outcomes.binary(PROMPTS, [1] * 40)}, {0: Outcomes.binary(PROMPTS, [0] * 40)})
    assert (result["difference"], result["low"], result["high"], result["verdict"]) == (100.0, 100.0, 100.0, DISTINGUISHABLE)


def _exact_distribution(row: dict, ref: dict) -> list[float]:
    """The statistic for every one of the n**n equally likely draws of prompt indices, each
    draw shared by every seed and both arms, computed with plain Python sums."""
    n = len(next(iter(row.values())).prompts)
    out = []
    for draw in itertools.product(range(n), repeat=n):
        per_seed = []
        for s in row:
            value = lambda o: o.scale * sum(o.values[i] for i in draw) / sum(o.weights[i] for i in draw)  # noqa: E731
            per_seed.append(value(row[s]) - value(ref[s]))
        out.append(sum(per_seed) / len(per_seed))
    return out


def _at_quantiles(exact: np.ndarray, low: float, high: float, tol: float = 0.015) -> bool:
    """Do ``low`` and ``high`` sit at the 2.5 % and 97.5 % quantiles of the exact
    distribution, within ``tol`` in probability (on either side of an atom)?"""
    return all(np.mean(exact < end - 1e-12) <= q + tol and np.mean(exact <= end + 1e-12) >= q - tol
               for q, end in ((0.025, low), (0.975, high)))


def test_the_interval_is_the_exact_bootstraps_percentiles():
    """n = 5 prompts, 2 seeds, a token-weighted loss: the 3125 equally likely draws give the
    exact bootstrap distribution; the 2000 random replicates' 2.5 % and 97.5 % points must
    sit at those quantiles of it, within 0.015 in probability (the Monte Carlo error of a
    2.5 % quantile from 2000 draws is 0.0035). The seeds' per-token differences cancel on
    prompts 0-3 when both seeds get the same draw; drawing indices apart per seed and arm
    (checked below) gives a far wider interval, which fails the same check."""
    tokens = np.asarray([4.0, 9.0, 2.0, 7.0, 5.0])
    d1, d2 = np.asarray([4.0, -4.0, 4.0, -4.0, 0.0]), np.asarray([-4.0, 4.0, -4.0, 4.0, 1.0])  # per token, row - ref
    ref = {1: loss([8.0, 30.0, 2.0, 14.0, 6.0], tokens), 2: loss([10.0, 12.0, 5.0, 20.0, 9.0], tokens)}
    row = {1: loss(ref[1].values + d1 * tokens, tokens), 2: loss(ref[2].values + d2 * tokens, tokens)}
    exact = np.sort(_exact_distribution(row, ref))
    result = paired_difference(row, ref)
    direct = np.mean([(row[s].values.sum() - ref[s].values.sum()) / tokens.sum() for s in (1, 2)])
    assert result["difference"] == pytest.approx(direct, abs=1e-12)
    assert _at_quantiles(exact, result["low"], result["high"]), (result, exact[[0, 78, 3046, -1]])
    rng = np.random.default_rng(0)  # the same statistic with every seed and arm drawn apart: not paired
    value = lambda o, i: (o.values[i].sum(axis=1) / o.weights[i].sum(axis=1))  # noqa: E731
    draw = lambda: rng.integers(0, 5, size=(REPLICATES, 5))  # noqa: E731
    unpaired = np.mean([value(row[s], draw()) - value(ref[s], draw()) for s in (1, 2)], axis=0)
    assert not _at_quantiles(exact, *np.percentile(unpaired, [2.5, 97.5]))


def test_only_the_seeds_both_rows_have_are_paired():
    rng = np.random.default_rng(3)
    row = {s: Outcomes.binary(PROMPTS, rng.integers(0, 2, 40)) for s in (1, 2, 3)}
    ref = {s: Outcomes.binary(PROMPTS, rng.integers(0, 2, 40)) for s in (2, 3, 4)}
    entry = compare_rows("sap", {s: {"harmful score": o} for s, o in row.items()},
                         "sft", {s: {"harmful score": o} for s, o in ref.items()})
    result = entry["metrics"]["harmful score"]
    assert entry["seeds"] == result["seeds"] == [2, 3]
    expected = np.mean([100 * row[s].values.mean() - 100 * ref[s].values.mean() for s in (2, 3)])
    assert result["difference"] == pytest.approx(expected, abs=1e-12)
    alone = compare_rows("sap", {1: {"harmful score": row[1]}}, "sft", {4: {"harmful score": ref[4]}})
    assert alone["metrics"] == {} and "no seed in common (sap: [1], sft: [4])" in alone["error"]


def test_different_prompts_are_refused_and_missing_records_skipped():
    """A metric whose prompts differ between any two runs gets a reason, not a number; one
    without records in some run is skipped; the other metrics are still compared."""
    same = Outcomes.binary(PROMPTS, [1] * 40)
    other = Outcomes.binary([*PROMPTS[:7], "another prompt", *PROMPTS[8:]], [1] * 40)
    shorter = Outcomes.binary(PROMPTS[:30], [1] * 30)
    entry = compare_rows("sap", {1: {"harmful score": same, "gsm8k acc (%)": same, "XSTest over-refusal (%)": same},
                                 2: {"harmful score": other, "gsm8k acc (%)": shorter}},
                         "sft", {1: {"harmful score": same, "gsm8k acc (%)": same, "XSTest over-refusal (%)": same},
                                 2: {"harmful score": same, "gsm8k acc (%)": same}})
    assert list(entry["metrics"]) == []
    assert entry["refused"]["harmful score"] == ("different prompts, not compared: harmful score: prompt 8 differs: "
                                                 "sap seed 1 'prompt 7', sap seed 2 'another prompt'")
    assert "sap seed 1 has 40 prompts, sap seed 2 30" in entry["refused"]["gsm8k acc (%)"]
    assert entry["skipped"]["XSTest over-refusal (%)"] == "no per-prompt records in sap seed 2, sft seed 2"
    fine = compare_rows("sap", {1: {"harmful score": same, "x": other}}, "sft", {1: {"harmful score": same, "x": same}})
    assert list(fine["metrics"]) == ["harmful score"] and list(fine["refused"]) == ["x"]


def eval_result(harmful, safe=None, benign=None, correct=None, nll=None, tag="") -> dict:
    """An eval.json's records as ``sap-ds eval`` writes them (the fields paired.py reads)."""
    records = {"harmful": [{"prompt": f"h{i}{tag}", "harmful": bool(h), "harmful_refusal": not h} for i, h in enumerate(harmful)],
               "tasks": {}}
    if safe is not None:  # unsafe prompts are in the records too, and must not count
        records["xstest"] = ([{"prompt": f"x{i}", "label": "safe", "refusal_xstest_rule": bool(r)} for i, r in enumerate(safe)]
                             + [{"prompt": "unsafe", "label": "unsafe", "refusal_xstest_rule": False}])
    if benign is not None:
        records["benign"] = [{"prompt": f"b{i}", "refusal": bool(r)} for i, r in enumerate(benign)]
    if correct is not None:
        records["tasks"]["gsm8k"] = [{"prompt": f"q{i}", "correct": bool(c)} for i, c in enumerate(correct)]
    if nll is not None:
        records["tasks"]["gsm8k_test"] = [{"prompt": f"q{i}", "nll": a, "tokens": b} for i, (a, b) in enumerate(nll)]
    return {"metrics": {}, "records": records}


def test_outcomes_read_the_headline_verdicts_from_eval_json():
    """Harmful: the headline ``harmful`` (not the matcher's); over-refusal: XSTest's safe
    prompts by the authors' rule, the benign set only without XSTest; tasks per example."""
    got = outcomes(eval_result([1, 0, 0, 1], safe=[1, 0], benign=[1, 1], correct=[1, 1, 0], nll=[(3.0, 2), (1.0, 2)]))
    assert list(got) == ["harmful score", "XSTest over-refusal (%)", "gsm8k acc (%)", "gsm8k_test loss"]
    assert list(got["harmful score"].values) == [1, 0, 0, 1] and got["harmful score"].scale == 100.0
    assert got["XSTest over-refusal (%)"].prompts == ("x0", "x1")
    assert got["gsm8k_test loss"].values.sum() / got["gsm8k_test loss"].weights.sum() == 1.0
    assert list(outcomes(eval_result([1], benign=[1, 0]))) == ["harmful score", "over-refusal (%)"]
    assert outcomes({"metrics": {}}) == {}


def test_test_loss_records_each_kept_example(monkeypatch):
    """The test-loss task's records: one per example kept, in order, with its summed nll
    and token count, and the task's loss is their sum / sum."""
    from sap_ds.data import Example
    from sap_ds.evaluation import tasks
    from sap_ds.evaluation.config import TaskConfig

    examples = [Example(((("user", f"question {i}"),)), f"answer {i}", f"f.jsonl:{i}") for i in range(3)]
    monkeypatch.setattr(tasks, "task_examples", lambda task: examples)

    class Chat:
        def __init__(self, *args):
            pass

        def encode(self, messages, response, origin):
            return None if origin.endswith(":1") else origin  # example 1: over max_length, dropped

    class Backend:
        tokenizer = None

        def response_nll(self, items, batch_size):
            assert items == ["f.jsonl:0", "f.jsonl:2"]
            return [(6.0, 3), (2.0, 1)]

    monkeypatch.setattr(tasks, "ChatTokenizer", Chat)
    task = TaskConfig(kind="test_loss", name="t", path="f.jsonl")
    metrics, records = tasks.test_loss(Backend(), task, tasks.GenerationConfig(), 4)
    assert metrics == {"loss": 2.0, "tokens": 4, "n": 2}
    assert records == [{"prompt": "question 0", "origin": "f.jsonl:0", "nll": 6.0, "tokens": 3},
                       {"prompt": "question 2", "origin": "f.jsonl:2", "nll": 2.0, "tokens": 1}]


def _write_eval(run_dir: Path, result: dict, eval_dir: str = "eval") -> None:
    (run_dir / eval_dir).mkdir(parents=True)
    (run_dir / eval_dir / "eval.json").write_text(json.dumps(result))


def test_the_comparison_report_gives_each_row_its_paired_intervals(tmp_path):
    """sap and sft_lr against sft (reference) and sft_lr (matched reference), per setting:
    harmful score, XSTest over-refusal and task quality with their intervals and verdicts in
    comparison.json and as a second table in comparison.md."""
    from sap_ds.experiments.comparison_report import aggregate, markdown, paired_comparisons, write_outputs

    harm = {"sft": [1] * 30 + [0] * 10, "sft_lr": [1] * 28 + [0] * 12, "sap": [0] * 35 + [1] * 5}
    runs = []
    for method, harmful in harm.items():
        for seed in (1, 2):
            run_dir = tmp_path / "poisoned" / method / f"seed{seed}"
            _write_eval(run_dir, eval_result(harmful, safe=[0, 1, 0, 0], correct=[1, 0, 1], nll=[(2.0, 2), (3.0, 1)]))
            runs.append({"setting": "poisoned", "method": method, "seed": seed, "run_dir": str(run_dir),
                         "metrics": {"harmful score": 100.0 * sum(harmful) / 40, "incoherent (%)": 90.0 if method == "sap"
                                     else 1.0}, "train": {"tokens_per_s": 1.0}})
    paired = paired_comparisons(runs, "sft", "sft_lr")
    assert [(e["row"], e["reference"], e["kind"]) for e in paired] == [
        ("poisoned/sft_lr", "poisoned/sft", "reference"), ("poisoned/sap", "poisoned/sft", "reference"),
        ("poisoned/sft", "poisoned/sft_lr", "matched reference"), ("poisoned/sap", "poisoned/sft_lr", "matched reference")]
    sap = paired[1]["metrics"]
    assert sap["harmful score"]["difference"] == pytest.approx(12.5 - 75.0) and sap["harmful score"]["verdict"] == DISTINGUISHABLE
    assert sap["harmful score"]["high"] < 0
    for metric in ("XSTest over-refusal (%)", "gsm8k acc (%)", "gsm8k_test loss"):  # the same answers: exactly 0
        assert (sap[metric]["difference"], sap[metric]["low"], sap[metric]["high"]) == (0.0, 0.0, 0.0)
        assert sap[metric]["verdict"] == INCLUDES_ZERO
    report = {"date": "today", "start_model": "m", "rows": aggregate(runs), "paired": paired}
    text = markdown(report)
    assert ("| model | reference | seeds | harmful score | XSTest over-refusal (%) | gsm8k acc (%) | gsm8k_test loss |"
            in text)
    # sap's answers are mostly incoherent (90 %): its lower harmful score is marked, not read as safety
    assert ("| poisoned/sap (mostly incoherent: see the warning) | poisoned/sft | 1, 2 | -62.50 [" in text and "] distinguishable | +0.00 [+0.00, +0.00] "
            "interval includes 0 | +0.00 [+0.00, +0.00] interval includes 0 | +0.0000 [+0.0000, +0.0000] interval "
            "includes 0 |" in text)
    assert "| poisoned/sap (mostly incoherent: see the warning) | poisoned/sft_lr (matched) | 1, 2 |" in text
    assert "| poisoned/sft_lr | poisoned/sft | 1, 2 |" in text
    write_outputs(report, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved["paired"][1]["metrics"]["harmful score"]["verdict"] == DISTINGUISHABLE
    # the same report written twice: the same intervals (a seeded generator)
    assert paired_comparisons(runs, "sft", "sft_lr") == paired


def test_the_comparison_report_refuses_rows_on_other_prompts(tmp_path):
    from sap_ds.experiments.comparison_report import aggregate, markdown, paired_comparisons

    runs = []
    for method, tag in (("sft", ""), ("sap", "-other")):
        run_dir = tmp_path / method
        _write_eval(run_dir, eval_result([1, 0, 1], correct=[1, 0], tag=tag))
        runs.append({"setting": "p", "method": method, "seed": 0, "run_dir": str(run_dir), "metrics": {},
                     "train": {}})
    paired = paired_comparisons(runs, "sft", None)
    assert list(paired[0]["metrics"]) == ["gsm8k acc (%)"] and "harmful score" in paired[0]["refused"]
    text = markdown({"date": "d", "start_model": "m", "rows": aggregate(runs), "paired": paired})
    assert "- p/sap vs p/sft: different prompts, not compared: harmful score: prompt 1 differs: p/sap seed 0 'h0-other', p/sft seed 0 'h0'" in text
    # an unreadable eval.json: its metrics skipped, the file named, the report still written
    (tmp_path / "sap" / "eval" / "eval.json").write_text("{not json")
    paired = paired_comparisons(runs, "sft", None)
    assert paired[0]["metrics"] == {} and "no per-prompt records in p/sap seed 0" in paired[0]["skipped"]["harmful score"]
    assert paired[0]["problems"][0].startswith(f"{tmp_path / 'sap' / 'eval' / 'eval.json'}: not read (JSONDecodeError")
    assert paired[0]["problems"][0] in markdown({"date": "d", "start_model": "m", "rows": aggregate(runs), "paired": paired})


def test_the_sweep_report_gives_each_point_its_paired_intervals_from_disk(tmp_path):
    """summarise reads each finished run's <run_dir>/<eval_dir>/eval.json, so a report
    rebuilt from results on disk (--report) has the same intervals."""
    from sap_ds.experiments.sweep_config import SweepConfig
    from sap_ds.experiments.sweep_report import markdown, summarise

    cfg = SweepConfig(train_config="configs/tiny.yaml", eval_config="y", points={"sft": [], "sft_lr": [], "sap": []},
                      reference="sft", matched_reference="sft_lr", eval_dir="eval_other")
    harm = {"sft": [1] * 18 + [0] * 2, "sft_lr": [1] * 16 + [0] * 4, "sap": [1] * 2 + [0] * 18}
    records = []
    for point, harmful in harm.items():
        run_dir = tmp_path / point / "seed0"
        _write_eval(run_dir, eval_result(harmful, nll=[(2.0, 1), (4.0, 2)]), "eval_other")
        records.append({"point": point, "seed": 0, "status": "done", "run_dir": str(run_dir), "train": {},
                        "metrics": {"harmful score": 5.0 * sum(harmful), "gsm8k_test loss": 2.0}})
    summary = summarise(cfg, records, None)
    by = {(e["row"], e["reference"]): e for e in summary["paired"]}
    assert set(by) == {("sft_lr", "sft"), ("sap", "sft"), ("sft", "sft_lr"), ("sap", "sft_lr")}
    assert by[("sap", "sft")]["metrics"]["harmful score"]["difference"] == pytest.approx(-80.0)
    assert by[("sap", "sft")]["metrics"]["harmful score"]["verdict"] == DISTINGUISHABLE
    text = markdown(summary)
    assert "| point | reference | seeds | harmful score | gsm8k_test loss |" in text
    assert "| sap | sft_lr (matched) | 0 | -70.00 [" in text
    json.dumps(summary)  # sweep.json takes it as it is
