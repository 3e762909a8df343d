"""Reliability: numerical guards, atomic checkpoints under SIGKILL, bad checkpoints,
cross-rank consistency, and the export's logits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.support.launch import free_port, run_single
from tests.support.repo import REPO

BASE = ["--config", "configs/tiny.yaml", "train.eval_every=0"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


NAN_AFTER_FIRST_STEP = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import sap_ds.training.trainer as trainer
    from sap_ds.train import main

    task_loss, calls = trainer.task_loss, []

    def poisoned(logits, labels):  # step 1 trains normally; every later loss is NaN
        calls.append(1)
        loss = task_loss(logits, labels)
        return loss if len(calls) == 1 else loss * float("nan")

    trainer.task_loss = poisoned
    sys.exit(main(sys.argv[2:]))
    """
)


def test_non_finite_steps_are_skipped_then_stop_the_run_with_a_checkpoint(tmp_path):
    script = tmp_path / "nan_train.py"
    script.write_text(NAN_AFTER_FIRST_STEP)
    out = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(script), str(REPO), *BASE, f"output_dir={out}", "train.max_steps=20",
                           "train.max_bad_steps=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 non-finite steps in a row" in proc.stderr and "checkpoint saved at step 4" in proc.stderr
    assert "Traceback" not in proc.stderr
    records = _records(out)
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3]
    assert all(r["loss"] == records[0]["loss"] for r in records), "a skipped step must not change the reported loss"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.parametrize("g2", [0.0, float("nan"), float("inf")])
def test_zero_or_non_finite_safety_gradient_means_no_perturbation(g2):
    from sap_ds.sap.step import direction_scale

    scale, ok = direction_scale(torch.tensor(g2, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64), rho=0.1)
    assert scale.item() == 0.0 and not ok.item()
    scale, ok = direction_scale(torch.tensor(16.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64), rho=0.1)
    assert scale.item() == pytest.approx(0.1 * 2.0 / 4.0) and ok.item()


class _SlowEngine:
    """Writes its shards the way DeepSpeed does: several files, one by one."""

    def save_checkpoint(self, save_dir, tag, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            (folder / f"shard_{i}.pt").write_bytes(b"x" * 200_000)
            time.sleep(0.01)


def _save_forever(root: Path, start: int) -> None:
    from sap_ds.training import checkpoint

    for step in range(start, start + 1000):
        checkpoint.save(_SlowEngine(), root, step, {"method": "sft"}, {"w": torch.full((1000,), float(step))}, keep=2)


def _complete(folder):
    return (all((folder / f"shard_{i}.pt").stat().st_size == 200_000 for i in range(4))
            and json.loads((folder / "sap_ds_meta.json").read_text())["step"] >= 0
            and (folder / "sap_ds_rank00000.safetensors").is_file())


def test_sigkill_at_20_moments_during_saving_never_loses_a_checkpoint(tmp_path):
    """A forked child saves checkpoints in a loop (staging, rename, pointer, pruning) and is
    SIGKILLed at 20 different moments; each time ``latest`` must name a complete
    checkpoint no older than the last one seen."""
    from sap_ds.training.checkpoint import latest_tag

    root = tmp_path / "ckpt"
    last_step, start = -1, 0
    for kill in range(20):
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery, just the save loop
            try:
                _save_forever(root, start)
            finally:
                os._exit(0)
        time.sleep(0.02 + 0.013 * kill)  # 20 different moments inside the save loop
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        tag = latest_tag(root)
        if tag is None:  # killed before the first checkpoint completed
            assert last_step == -1
            continue
        folder = root / tag
        assert _complete(folder), f"kill {kill}: latest points at an incomplete checkpoint {tag}"
        step = int(tag.split("_")[1])
        assert step >= last_step, "a newer complete checkpoint was lost"
        last_step, start = step, step + 1
    assert last_step >= 0, "no checkpoint ever completed"


def test_corrupt_checkpoint_and_checkpoints_of_another_model_or_method_are_refused(tmp_path, monkeypatch, capsys):
    """Another method or LoRA setting is refused before the model loads (sap_ds.train.fail_fast:
    here through sap_ds.train.main in this process, which returns before any process group
    exists), another trainable-parameter count once the engine exists, and a damaged
    checkpoint when it is loaded; none of them touches the checkpoint."""
    from sap_ds.errors import CheckpointError
    from sap_ds.train import main
    from sap_ds.training.checkpoint import check_identity

    out = tmp_path / "run"
    out.mkdir()
    # an unfinished run, stopped after step 1 (a finished one is refused earlier: tests/test_resume.py)
    assert run_single([*BASE, f"output_dir={out}", "train.max_steps=2", "export.enabled=false"], stop_after=1).returncode == 75
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    before = sorted(p.name for p in latest.iterdir())

    monkeypatch.chdir(REPO)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)  # what prepare_environment would set, undone after the test
    capsys.readouterr()
    assert main([*BASE, f"output_dir={out}", "train.max_steps=2", "lora.enabled=true"]) == 2
    err = capsys.readouterr().err
    assert str(latest) in err and "lora=False" in err and "lora=True" in err and "train.resume=never" in err
    assert main([*BASE, f"output_dir={out}", "train.max_steps=2", "method=sap"]) == 2
    assert "method='sft'" in capsys.readouterr().err
    import torch.distributed as dist

    assert not dist.is_initialized(), "refused after a process group started"
    meta = json.loads((latest / "sap_ds_meta.json").read_text())
    with pytest.raises(CheckpointError, match=r"trainable_params=\d+, this run has trainable_params=7"):
        check_identity(latest, meta, {**{k: meta[k] for k in ("method", "model_path", "lora")}, "trainable_params": 7})

    (latest / "sap_ds_rank00000.safetensors").write_bytes(b"not a safetensors file")
    corrupt = run_single([*BASE, f"output_dir={out}", "train.max_steps=2"])
    assert corrupt.returncode == 2 and "cannot load checkpoint" in corrupt.stderr and str(latest.name) in corrupt.stderr
    assert sorted(p.name for p in latest.iterdir()) == before, "a failed resume must not touch the checkpoint"


def _consistency_worker(rank, port, diverge, results):
    import types

    import torch.distributed as dist

    from sap_ds.methods.sap import SapMethod
    from sap_ds.training.trainer import Trainer

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    probe = types.SimpleNamespace(vectors=torch.ones(2, 4) + (1e-7 if diverge and rank == 1 else 0.0))
    method = SapMethod(None)  # its replicated values: the probe and the direction scale
    method.state = types.SimpleNamespace(probe=probe, scale=torch.tensor(0.5))
    fake = types.SimpleNamespace(world=2, rank=rank, step=5, device=torch.device("cpu"), method=method)
    try:
        Trainer.check_rank_consistency(fake)
        results[rank] = "ok"
    except RuntimeError as exc:
        results[rank] = str(exc)
    dist.destroy_process_group()


@pytest.mark.parametrize("diverge", [False, True])
def test_rank_consistency_check_fails_loudly_when_ranks_disagree(diverge):
    manager = torch.multiprocessing.Manager()
    results = manager.dict()
    torch.multiprocessing.spawn(_consistency_worker, args=(free_port(), diverge, results), nprocs=2)
    if diverge:
        assert all("ranks disagree at step 5" in results[r] for r in range(2))
    else:
        assert dict(results) == {0: "ok", 1: "ok"}
