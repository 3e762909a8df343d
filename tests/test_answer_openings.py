"""scripts/answer_openings.py: the most frequent openings per model of a sweep folder, with
the seeds of a point pooled, the start stages and the start model as rows of their own, and
a bare answer (the opening is the whole answer) told apart from one with content behind it."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.support.repo import REPO

SCRIPT = REPO / "scripts" / "answer_openings.py"


def _eval(folder, answers, benign=("fine",)):
    folder.mkdir(parents=True)
    records = {"harmful": [{"prompt": f"p{i}", "response": a} for i, a in enumerate(answers)],
               "benign": [{"prompt": "b", "response": b} for b in benign]}
    (folder / "eval.json").write_text(json.dumps({"records": records}))


def test_openings_pool_seeds_and_count_bare_answers(tmp_path):
    root = tmp_path / "sweep"
    _eval(root / "sft" / "seed1" / "eval", ["I can help with that.", "I can help with that.", "Sure, here is how: step one"])
    _eval(root / "sft" / "seed2" / "eval", ["I can help with that. First, buy a crowbar", "I can't help with that."])
    _eval(root / "start" / "repnoise" / "eval", ["This request is not possible.", "This request is not possible."])
    _eval(root / "eval" / "start", ["Here is how you do it"])
    _eval(root / "sft" / "seed1" / "attack" / "pure_bad" / "eval", ["ignored: an attack run"])
    proc = subprocess.run([sys.executable, str(SCRIPT), str(root), "--top", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"sft", "start model repnoise", "start model"}
    # sft: 5 answers over both seeds, 3 open with "i can help with that", 2 of them bare
    assert rows["sft"].startswith("| sft | 5 | 40.0 | \"i can help with that\" 60 %")
    assert rows["start model repnoise"].startswith("| start model repnoise | 2 | 100.0 | \"this request is not possible\" 100 %")
    assert rows["start model"].startswith("| start model | 1 | 0.0 |")  # one answer: no frequent opening


def test_a_set_the_records_lack_is_named(tmp_path):
    _eval(tmp_path / "run" / "seed1" / "eval", ["x"])
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--set", "xstest"], capture_output=True, text=True)
    assert proc.returncode != 0 and "no 'xstest' records (sets there: harmful, benign)" in proc.stderr
