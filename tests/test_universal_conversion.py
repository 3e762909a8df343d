"""Resuming on another world size at 70B (issue 31, item 3): rank 0 converts the checkpoint to
DeepSpeed's universal format while the other ranks wait.

- The others wait on the long-timeout gloo group (``distributed.wait_timeout_minutes``, as
  ``barrier()`` does), not on the default NCCL group, whose watchdog (``timeout_minutes``)
  would abort a conversion of ~1.1 TB long before it ends.
- ds_to_universal gets parallel workers, as many as the node's cores and memory allow (an
  extract worker loads one rank's whole optimizer file, a merge worker one parameter's
  fp32 shards and their concatenation).
- ds_to_universal cannot continue a half-done conversion (it extracts everything again, and
  writes files in place), so an interrupted one is recorded: the next try says what
  happened and starts over, and after two interrupted tries the job is refused with the
  command that converts outside a job, instead of every requeue starting over for ever.

CPU only, no process group: ``torch.distributed`` and the conversion's process are faked
(tests/test_resume.py converts real checkpoints through the launcher)."""
from __future__ import annotations

import collections
import json
import logging
import subprocess
import types

import pytest
import torch

from sap_ds.errors import CheckpointError
from sap_ds.parallel import distributed
from sap_ds.training import checkpoint

GB = 2**30


def test_rank0_work_is_waited_for_on_the_long_timeout_group(monkeypatch):
    import torch.distributed as dist

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(distributed, "_wait_group", "wait-group")
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src=0, group=None, device=None:
                        seen.update(group=group, src=src))
    checkpoint._on_rank0_then_all(lambda: None, "converting")
    assert seen == {"group": "wait-group", "src": 0}


def _checkpoint_folder(tmp_path, ranks: int, optim_bytes: int, largest: int):
    """What ZeRO-3 writes, as far as the worker count reads it: per-rank optimizer files of
    ``optim_bytes`` (sparse) and model-state files whose param_shapes hold a ``largest``-element parameter."""
    folder = tmp_path / "step_00000010"
    folder.mkdir()
    for rank in range(ranks):
        with open(folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", "wb") as f:
            f.truncate(optim_bytes)
        shapes = collections.OrderedDict([("embed.weight", torch.Size([largest // 8, 8])), ("norm.weight", torch.Size([8]))])
        torch.save({"param_shapes": [shapes]}, folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    return folder


@pytest.fixture()
def node(monkeypatch):
    """A node of 64 cores with ``available`` bytes of free memory (set by the test), and the
    conversion's process recorded: what it was asked, and a universal folder it 'writes'."""
    import psutil

    state = {"available": 1000 * GB, "calls": [], "returncode": 0}
    monkeypatch.setattr(checkpoint.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=state["available"]))

    def run(argv, **kwargs):
        state["calls"].append(argv)
        out = argv[argv.index("--output_folder") + 1]
        if state["returncode"] == 0:
            (checkpoint.Path(out) / "zero").mkdir(parents=True)
        else:
            print("AssertionError: Unused patterns=['x'] while merging tp slices", file=kwargs["stdout"], flush=True)
        return subprocess.CompletedProcess(argv, state["returncode"])

    monkeypatch.setattr(checkpoint.subprocess, "run", run)
    return state


def _flag(argv, name):
    return int(argv[argv.index(name) + 1])


def test_worker_counts_follow_cores_and_memory_and_reach_ds_to_universal(tmp_path, node):
    # 70B full FT on 8 ranks: each optimizer file ~100 GB; the embedding, 1.05e9 elements, the largest parameter
    folder = _checkpoint_folder(tmp_path, ranks=8, optim_bytes=100 * GB, largest=1_050_000_000)
    target = checkpoint.convert_to_universal(folder)
    (argv,) = node["calls"]
    assert argv[1:3] == ["-m", "deepspeed.checkpoint.ds_to_universal"]
    # half of 1000 GB free: 5 files of 100 GB at once; merging 8.4 GB per worker: capped at 16
    assert (_flag(argv, "--num_extract_workers"), _flag(argv, "--num_merge_workers")) == (5, checkpoint.MAX_CONVERSION_WORKERS)
    assert target == folder / "universal" and (target / "zero").is_dir()
    assert not (folder / ".universal.tmp").exists() and not (folder / checkpoint.CONVERSION_ATTEMPTS).exists()

    node["available"] = 20 * GB  # little memory left (e.g. offloaded optimizer states): one file at a time
    target.rename(folder / "done")
    checkpoint.convert_to_universal(folder)
    assert (_flag(node["calls"][1], "--num_extract_workers"), _flag(node["calls"][1], "--num_merge_workers")) == (1, 1)


def test_a_finished_conversion_is_not_repeated(tmp_path, node):
    folder = _checkpoint_folder(tmp_path, ranks=2, optim_bytes=GB, largest=1000)
    checkpoint.convert_to_universal(folder)
    checkpoint.convert_to_universal(folder)
    assert len(node["calls"]) == 1


@pytest.fixture()
def warnings_logged():
    seen = []

    class Recorder(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler = Recorder()
    logging.getLogger("sap_ds").addHandler(handler)
    yield seen
    logging.getLogger("sap_ds").removeHandler(handler)


def test_an_interrupted_conversion_is_said_and_started_over_then_refused(tmp_path, node, warnings_logged):
    folder = _checkpoint_folder(tmp_path, ranks=2, optim_bytes=GB, largest=1000)
    real_run = checkpoint.subprocess.run

    def killed(argv, **kwargs):  # the job ends (time limit, node failure) while the conversion runs
        out = checkpoint.Path(argv[argv.index("--output_folder") + 1])
        (out / "tmp" / "embed.weight" / "0").mkdir(parents=True)
        (out / "tmp" / "embed.weight" / "0" / "fp32.00").write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt  # stands for the process's death: nothing after this line runs

    checkpoint.subprocess.run = killed
    with pytest.raises(KeyboardInterrupt):
        checkpoint.convert_to_universal(folder)
    first = json.loads((folder / checkpoint.CONVERSION_ATTEMPTS).read_text())
    assert len(first) == 1 and first[0]["extract_workers"] >= 1
    assert (folder / ".universal.tmp").is_dir()  # left as it was, for a look at how far it got

    with pytest.raises(KeyboardInterrupt):  # the requeued job: says so, and starts over
        checkpoint.convert_to_universal(folder)
    (said,) = [w for w in warnings_logged if "interrupted" in w]
    assert first[0]["started"] in said and "starting over" in said and "1 time" in said, said

    checkpoint.subprocess.run = real_run  # the third job: refused, nothing started or deleted
    with pytest.raises(CheckpointError) as info:
        checkpoint.convert_to_universal(folder)
    message = str(info.value)
    assert "interrupted 2 times" in message and "python -m deepspeed.checkpoint.ds_to_universal" in message
    assert str(folder) in message and checkpoint.CONVERSION_ATTEMPTS in message  # how to let a job try again
    assert node["calls"] == [] and (folder / ".universal.tmp").is_dir()

    (folder / checkpoint.CONVERSION_ATTEMPTS).unlink()  # as the message says: a job may try again
    assert checkpoint.convert_to_universal(folder) == folder / "universal"


def test_a_conversion_killed_by_a_signal_counts_as_interrupted(tmp_path, node):
    """The job's time limit or scancel: SIGTERM reaches the conversion's process too."""
    folder = _checkpoint_folder(tmp_path, ranks=2, optim_bytes=GB, largest=1000)
    node["returncode"] = -15
    with pytest.raises(CheckpointError, match="killed by signal 15"):
        checkpoint.convert_to_universal(folder)
    assert len(json.loads((folder / checkpoint.CONVERSION_ATTEMPTS).read_text())) == 1
    assert not (folder / "universal").exists()


def test_a_failed_conversion_reports_its_reason_and_is_not_counted_as_interrupted(tmp_path, node):
    folder = _checkpoint_folder(tmp_path, ranks=2, optim_bytes=GB, largest=1000)
    node["returncode"] = 1
    with pytest.raises(CheckpointError, match="Unused patterns"):
        checkpoint.convert_to_universal(folder)
    assert not (folder / ".universal.tmp").exists() and not (folder / checkpoint.CONVERSION_ATTEMPTS).exists()
    assert not (folder / "universal").exists()
