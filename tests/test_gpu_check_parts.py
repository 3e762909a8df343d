"""The GPU check in two parts for a short GPU lease (issue 31, "The GPU check, ready for a
15-minute window"): the parts cover every step once (step 1 in both: each report names its
card and versions), each part's estimated GPU time and its engine timeout fit 5 minutes, the
two commands docs/benchmarks.md gives are the ones the check takes, and a one-GPU report
says what it does not prove. No GPU and no engine here: the --cpu run is tests/test_gpu_check.py."""
from __future__ import annotations

import re
import shlex

import pytest

from sap_ds.gpu_check import __main__ as gpu_check
from sap_ds.gpu_check.report import STEP_NAMES, markdown, not_proven
from tests.support.repo import REPO

DEVICE_COMMAND_LIMIT = 2000  # characters of one command line to the GPU machine


def test_the_two_parts_cover_every_step():
    parts = gpu_check.PARTS
    assert sorted(parts) == [1, 2]
    assert sorted(set(parts[1].steps) | set(parts[2].steps)) == sorted(STEP_NAMES)
    assert set(parts[1].steps) & set(parts[2].steps) == {1}  # versions and device, in both reports
    assert 5 in parts[1].steps and 6 not in parts[1].steps  # step 5's deterministic cuBLAS never times the bench


@pytest.mark.parametrize("number", [1, 2])
def test_each_part_fits_five_minutes(number):
    """The estimate of the part fits, and so does the worst case its engine timeout allows
    (local steps' estimate + the timeout), with the timeout above the engine steps' estimate."""
    part = gpu_check.PARTS[number]
    local = [s for s in part.steps if s not in gpu_check.ENGINE_STEPS]
    engine = [s for s in part.steps if s in gpu_check.ENGINE_STEPS]
    assert gpu_check.estimate_s(part.steps) <= gpu_check.PART_BUDGET_S <= 300
    assert gpu_check.estimate_s(engine) < part.engine_timeout_s
    assert gpu_check.estimate_s(local) + part.engine_timeout_s <= gpu_check.PART_BUDGET_S


def test_part_and_timeout_arguments():
    args = gpu_check.parse_args(["--out", "o", "--part", "2", "--scratch", "/tmp/s"])
    assert (args.part, args.scratch, gpu_check.engine_timeout(args)) == (2, "/tmp/s", gpu_check.PARTS[2].engine_timeout_s)
    assert gpu_check.engine_timeout(gpu_check.parse_args(["--out", "o", "--part", "1", "--cpu"])) == 600
    assert gpu_check.engine_timeout(gpu_check.parse_args(["--out", "o", "--part", "1", "--engine-timeout", "500"])) == 500
    with pytest.raises(SystemExit):  # a part is a set of steps: not both
        gpu_check.parse_args(["--out", "o", "--part", "1", "--steps", "1,2"])


def test_docs_give_the_two_commands_the_check_takes():
    """docs/benchmarks.md names the exact two device commands; each is short, sends its
    report to its own folder under $OUT and its checkpoints to a scratch folder outside it."""
    text = (REPO / "docs/benchmarks.md").read_text()
    commands = re.findall(r"^(bash scripts/gpu_check\.sh --part [12] .*)$", text, flags=re.M)
    assert len(commands) == 2, commands
    outs = []
    for number, command in enumerate(commands, start=1):
        assert len(command) < DEVICE_COMMAND_LIMIT
        words = shlex.split(command)[2:]
        script_only = {"--wheels", "--python"}
        assert not script_only & set(words)
        args = gpu_check.parse_args(words)
        assert args.part == number and args.out.startswith("$OUT/") and args.scratch and "$OUT" not in args.scratch
        outs.append(args.out)
    assert outs[0] != outs[1]


def _report(mode: str, world: int | None) -> dict:
    return {"mode": mode, "date_utc": "2026-12-06T00:00:00+00:00", "git_commit": "abc", "seconds": 1.0, "part": 1,
            "part_what": gpu_check.PARTS[1].what, "machine": {"device_name": "NVIDIA H100 80GB HBM3", "device": "cuda"},
            "engine_world_size": world, "passed": True, "steps": [], "not_proven": not_proven(mode == "cpu", world)}


def test_a_one_gpu_report_says_what_it_does_not_prove():
    text = markdown(_report("gpu", 1))
    assert "part 1: correctness" in text
    for words in ("world size 1", "alias the shards", "coalesced refresh", "stream", "NCCL"):
        assert words in text, words
    assert not not_proven(False, 8)  # an 8-GPU run has no such caveat
    assert "Triton interpreter" in markdown(_report("cpu", 2))
