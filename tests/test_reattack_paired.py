"""scripts/reattack_paired.py: each attacked copy against the reference's at the same grid
point (attack, lr, steps, seed), the models before the attack too, read from folders that
were moved since (paths found under the attack folder), a point the reference lacks or that
did not finish named instead of compared, and an unknown --metrics column refused."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.support.repo import REPO

SCRIPT = REPO / "scripts" / "reattack_paired.py"
PROMPTS = [f"harmful request {i}" for i in range(20)]


def _eval(path, harmful_hits, nll=2.0):
    path.mkdir(parents=True)
    records = {"harmful": [{"prompt": p, "harmful": i < harmful_hits} for i, p in enumerate(PROMPTS)],
               "tasks": {"gsm8k_test": [{"prompt": f"q{i}", "nll": nll * 10, "tokens": 10} for i in range(8)]}}
    (path / "eval.json").write_text(json.dumps({"records": records}))


def _attack(folder, before_hits, points, unfinished=(), stage=False):
    """An attack folder as sap-ds attack writes it; ``points``: (attack, lr, steps) -> harmful hits.
    attack.json names the paths where the attack ran (here: a folder that no longer exists).
    ``stage``: as compare's re-attack stage leaves it, the run's own eval/ beside it as 'before'."""
    _eval(folder.parent / "eval" if stage else folder / "before", before_hits)
    runs = []
    for (attack, lr, steps), hits in points.items():
        _eval(folder / attack / f"lr{lr:g}_steps{steps}" / "seed42" / "eval", hits, nll=1.5)
        runs.append({"attack": attack, "lr": lr, "steps": steps, "seed": 42, "status": "done",
                     "run_dir": f"gone/{attack}/lr{lr:g}_steps{steps}/seed42"})
    runs += [{"attack": a, "lr": lr, "steps": s, "seed": 42, "status": "failed", "run_dir": "gone"} for a, lr, s in unfinished]
    (folder / "attack.json").write_text(json.dumps({"before": {"eval": "gone/eval/eval.json"}, "runs": runs}))


def test_each_attacked_copy_is_paired_with_the_reference_at_the_same_point(tmp_path):
    ref, row = tmp_path / "sft" / "seed1" / "attack", tmp_path / "sap" / "seed1" / "attack"
    _attack(ref, 10, {("pure_bad", 1e-3, 8): 20, ("poison_0.5", 5e-4, 8): 16})
    _attack(row, 2, {("pure_bad", 1e-3, 8): 20, ("poison_0.5", 5e-4, 8): 6, ("poison_0.5", 1e-3, 16): 20},
            unfinished=[("pure_bad", 5e-4, 16)], stage=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reference", str(ref), str(row)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines() if line.startswith("| sap")}
    # 20 prompts: 2 vs 10 harmful is -40 points; the same 20 of 20 is exactly 0; 6 vs 16 is -50
    assert "| sft before attack | - | -40.00 [" in lines["sap before attack"]
    assert "| sft pure_bad lr 0.001 x8 | 42 | +0.00 [+0.00, +0.00] interval includes 0 |" in lines["sap pure_bad lr 0.001 x8"]
    assert "| -50.00 [" in lines["sap poison_0.5 lr 0.0005 x8"] and "distinguishable" in lines["sap poison_0.5 lr 0.0005 x8"]
    assert "sap poison_0.5 lr 0.001 x16" not in lines  # the reference has no such point
    assert "- sap poison_0.5 lr 0.001 x16: the reference has no finished run at this point" in proc.stdout
    assert "- sap pure_bad lr 0.0005 x16 seed 42: failed" in proc.stdout
    # --metrics keeps the columns asked for, in that order; an unknown one is refused naming the ones there are
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reference", str(ref), str(row), "--metrics",
                           "gsm8k_test loss,harmful score"], capture_output=True, text=True)
    assert "| attacked copy | reference | seeds | gsm8k_test loss | harmful score |" in proc.stdout
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reference", str(ref), str(row), "--metrics", "harm"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--metrics harm: not a column here (columns: gsm8k_test loss, harmful score)" in proc.stderr


def test_a_folder_without_an_attack_report_is_named(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reference", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and f"{tmp_path / 'attack.json'}: not an attack report" in proc.stderr


def test_pool_gives_the_mean_over_each_attacks_grid_with_one_interval(tmp_path):
    """--pool: per attack, the mean over the points both models finished of the per-point
    difference (here -50 and -10 -> -30 over 2 points, pure_bad's 0 over 1), its interval
    inside the per-point ones' span, and no pooled row from a point only one model has."""
    ref, row = tmp_path / "sft" / "seed1" / "attack", tmp_path / "sap" / "seed1" / "attack"
    _attack(ref, 10, {("pure_bad", 1e-3, 8): 20, ("poison_0.5", 5e-4, 8): 16, ("poison_0.5", 1e-3, 8): 12})
    _attack(row, 2, {("pure_bad", 1e-3, 8): 20, ("poison_0.5", 5e-4, 8): 6, ("poison_0.5", 1e-3, 8): 10,
                     ("poison_0.5", 1e-3, 16): 20})
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reference", str(ref), str(row), "--pool", "--metrics",
                           "harmful score"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| sap")}
    pooled = cells["sap poison_0.5, mean of its grid"]
    assert pooled[1:3] == ["sft poison_0.5, mean of its grid", "2 points"]
    assert pooled[3].startswith("-30.00 [") and pooled[3].endswith("distinguishable |")
    low, high = (float(v) for v in pooled[3].split("[")[1].split("]")[0].split(", "))
    assert -50 < low < -30 < high < -10
    assert cells["sap pure_bad, mean of its grid"][2:4] == ["1 point", "+0.00 [+0.00, +0.00] interval includes 0 |"]
    # without --pool the table is the per-point one alone
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reference", str(ref), str(row)], capture_output=True, text=True)
    assert "mean of its grid" not in proc.stdout
