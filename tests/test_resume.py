"""Exact resume: a run stopped at step k and resumed ends bitwise where an uninterrupted
run ends (fp32, CPU), for SFT and SAP (probe, probe optimizer, direction, RNG, data order).

method safety_mix has no case of its own: its step is SFT's (SafetyMixMethod subclasses
SftMethod and keeps no state, tests/test_methods.py), and its refusal demonstrations are
rows of the cached training table, the same set in the same order for the same seed
(tests/test_data.py), so its checkpoint and resume are SFT's, tested here. Lisa's anchor
resume: tests/test_methods.py."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.launch import run_single
from tests.support.repo import REPO

STEPS = 4  # the world-size tests run STEPS - 1


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _run(out, method, extra=(), env=None, stop_after=None, expect=0):
    args = ["--config", "configs/tiny.yaml", f"output_dir={out}", f"method={method}", f"train.max_steps={STEPS}",
            "train.eval_every=0", "sap.probe_reset=false", "sap.safety_every=2", "sap.rho=0.05", *extra]
    proc = run_single(args, env=env, stop_after=stop_after)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def stopped_sap(tmp_path_factory):
    """A SAP run stopped after step 1 by its STOP file (what a preempted job leaves; exit code
    75, the file removed once honoured): the bitwise test resumes one copy, the
    changed-config test another."""
    from sap_ds.errors import EXIT_STOPPED_RESUMABLE

    out = tmp_path_factory.mktemp("stopped") / "run"
    proc = _run(out, "sap", stop_after=1, expect=EXIT_STOPPED_RESUMABLE)
    assert "stopped at step 1" in proc.stdout
    assert (out / "REQUEUE").exists() and not (out / "summary.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (out / "STOP").exists(), "the honoured stop file was left behind"
    return out


def _resumable_copy(source: Path, out: Path) -> Path:
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("tensorboard"))
    return out


def _method_tensors(run: Path, step: int) -> set[str]:
    """The names of the method's tensors in rank 0's file of checkpoint ``step``."""
    return set(load_file(str(run / "checkpoints" / f"step_{step:08d}" / "sap_ds_rank00000.safetensors")))


@pytest.mark.parametrize("variant", ["sft", "sap", "sap-safety_every1"])
def test_resume_after_stop_is_bitwise_identical(tmp_path, variant, request):
    """SAP resumes the run its STOP file stopped (safety_every 2: step 1 reuses the direction
    of step 0, so the checkpoint must hold it); SFT and SAP with safety_every 1 a copy of the
    straight run at its step-1 checkpoint (the same checkpoint code, one process fewer), which
    for safety_every 1 holds no direction: every probing step computes its own, here with the
    probe in the safety forward (``sap.probe_in_safety``), so the first resumed step's direction
    depends on the probe the checkpoint restored."""
    method = variant.split("-")[0]
    copied = ["train.save_every=1", f"train.save_total_limit={STEPS}"] if variant != "sap" else []
    if variant == "sap-safety_every1":
        copied += ["sap.safety_every=1", "sap.probe_in_safety=true"]
    straight = tmp_path / "straight"
    _run(straight, method, extra=copied)

    resumed = tmp_path / "resumed"
    if variant == "sap":
        _resumable_copy(request.getfixturevalue("stopped_sap"), resumed)
        assert "sap.direction.0" in _method_tensors(resumed, 1)
    else:
        _copy_run_at(straight, resumed, 1)
    if variant == "sap-safety_every1":
        assert "sap.probe" in _method_tensors(resumed, 1)
        assert not any(k.startswith("sap.direction.") for k in _method_tensors(resumed, 1)), _method_tensors(resumed, 1)
    _run(resumed, method, extra=copied)
    assert not (resumed / "REQUEUE").exists()
    assert not list(resumed.glob("config.before_step*")), "an unchanged config was reported as changed on resume"

    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["final_step"] == STEPS and summary["steps_this_run"] == STEPS - 1
    assert {k: v for k, v in _losses(resumed).items() if k > 1} == {k: v for k, v in _losses(straight).items() if k > 1}
    if variant == "sap":  # the stopped run's own metrics.jsonl: steps 0 and 1 too
        assert _losses(resumed) == _losses(straight)
    a = load_file(str(straight / "export" / "model" / "model.safetensors"))
    b = load_file(str(resumed / "export" / "model" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    if method == "sap":
        pa = load_file(str(straight / "export" / "probe.safetensors"))["probe"]
        pb = load_file(str(resumed / "export" / "probe.safetensors"))["probe"]
        assert pa.abs().max() > 0 and torch.equal(pa, pb)


def test_resume_under_changed_config_keeps_the_old_one_and_is_stale(tmp_path, stopped_sap):
    """A resume under another config goes on (a user may lengthen the schedule) but says
    which keys changed, keeps the config the first steps were trained with, and compare and
    sweep then refuse to reuse the run as if it had been trained under one config."""
    from sap_ds.config.run import load_config
    from sap_ds.experiments.runs import config_drift

    run_dir = _resumable_copy(stopped_sap, tmp_path / "run")
    proc = _run(run_dir, "sap", extra=["sap.temperature=2.0"])
    printed = proc.stdout + proc.stderr
    assert "resumed at step 1 under a config that differs" in printed and "\n  sap.temperature: 1.0 → 2.0" in printed
    assert json.loads((run_dir / "config.before_step1.json").read_text())["sap"]["temperature"] == 1.0
    assert json.loads((run_dir / "config.json").read_text())["sap"]["temperature"] == 2.0
    now = load_config("configs/tiny.yaml", [f"output_dir={run_dir}", "method=sap", f"train.max_steps={STEPS}", "train.eval_every=0",
                                            "sap.probe_reset=false", "sap.safety_every=2", "sap.rho=0.05", "sap.temperature=2.0"])
    assert config_drift(now, run_dir) == ["steps before 1 were trained under another config (config.before_step1.json)"]


# --------------------------------------------------------------------------- another number of ranks

# The same global batches on 1 and 2 ranks: the task batch is 1 x 2 = 2 x 1 examples, the
# safety batch 1 x 4 = 2 x 2 pairs. The task data is one example (its copies fill every
# batch), so a micro-batch of 2 has the loss of two micro-batches of 1 exactly (a token mean
# over copies); grad_accum stays 1 on both sides (SAP under grad_accum > 1 is issue 17's).
ON_RANKS = {1: ["train.micro_batch_size=2", "sap.safety_batch_size=4"],
            2: ["train.micro_batch_size=1", "sap.safety_batch_size=2"]}
# safety_every=1: the re-sharded run recomputes the direction at its first step, as the
# uninterrupted run does at every step; the Adam eps of the reference tests.
WORLD_RUN = ["method=sap", "sap.safety_every=1", "sap.rho=0.05", "train.eval_every=0", f"train.max_steps={STEPS - 1}",
             "train.adam_eps=1e-4", "sap.probe_adam_eps=1e-4", "data.train.0.limit=1"]


def _run_on(ranks, out, extra=(), expect=None):
    from tests.support.launch import launch

    args = ["--config", "configs/tiny.yaml", f"output_dir={out}", *WORLD_RUN, *ON_RANKS[ranks], *extra]
    extra_path = _wandb_dir()  # a private install (not the venv's): the subprocess needs it on its path
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), extra_path])} if extra_path and not extra_path.startswith(sys.prefix) else None
    proc = run_single(args, env=env) if ranks == 1 else launch(["sap_ds/train.py", *args])
    if expect is not None:  # the process itself, for its exit code and streams
        assert proc.returncode == expect, (proc.stdout + proc.stderr)[-4000:]
        return proc
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def _wandb_dir():
    """Where wandb is importable from, for the subprocess (None: not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("wandb")
    return str(Path(spec.origin).parents[1]) if spec and spec.origin else None


# W&B offline (no network) on the uninterrupted run when wandb is installed (the dev extra).
WANDB = ["logging.wandb.project=sap-ds-tests", "logging.wandb.mode=offline"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One rank, never stopped, W&B offline when wandb is installed (the dev extra). It keeps
    its step-1 checkpoint, which is what a 1-rank run stopped after step 1 leaves (the 1 -> 2
    test resumes from a copy of it instead of training that step again)."""
    out = tmp_path_factory.mktemp("world") / "straight"
    _run_on(1, out, extra=[*(WANDB if _wandb_dir() else []), "train.save_every=1", f"train.save_total_limit={STEPS}"])
    return out


def _copy_run_at(source: Path, out: Path, step: int) -> None:
    """``out``: what a run stopped after ``step`` leaves, from a run that saved every step
    (the checkpoint is the same; training that step again would only cost time)."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(source / "config.json", out / "config.json")
    tag = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / tag, out / "checkpoints" / tag, ignore=shutil.ignore_patterns("universal"))
    (out / "checkpoints" / "latest").write_text(tag + "\n")


def _assert_matches(run: Path, reference: Path) -> None:
    from tests.support.reference import RTOL, assert_matches_reference

    a = load_file(str(reference / "export" / "model" / "model.safetensors"))
    b = load_file(str(run / "export" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert_matches_reference(name, b[name], a[name], RTOL)
    pa = load_file(str(reference / "export" / "probe.safetensors"))["probe"]
    pb = load_file(str(run / "export" / "probe.safetensors"))["probe"]
    assert pa.abs().max() > 0
    assert_matches_reference("probe", pb, pa, RTOL)


def test_resume_on_another_world_size_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    """A ZeRO-3 checkpoint of 1 rank resumes on 2 ranks, and one of 2 ranks on 1 (through
    DeepSpeed's universal format, converted once into the checkpoint folder), and each ends
    where a run that was never interrupted ends, within the reference tests' tolerance
    (RTOL 1e-5 of each tensor's scale; measured: 2e-7 on the weights, 6e-7 on the probe).
    The 2-rank run resumes at step 1 and saves every step; the 1-rank one resumes from its
    step 2."""
    for first, then, step, source, out in ((1, 2, 1, uninterrupted, tmp_path / "one_two"),
                                          (2, 1, 2, tmp_path / "one_two", tmp_path / "two_one")):
        _copy_run_at(source, out, step)
        printed = _run_on(then, out, extra=["train.save_every=1", f"train.save_total_limit={STEPS}"])
        assert f"resumed from step_{step:08d} at step {step} (written on {first} ranks, re-sharded for {then})" in printed
        folder = out / "checkpoints" / f"step_{step:08d}"
        assert (folder / "universal" / "zero").is_dir(), "no universal copy in the checkpoint folder"
        assert json.loads((folder / "sap_ds_meta.json").read_text())["world_size"] == first
        final = json.loads((out / "checkpoints" / f"step_{STEPS - 1:08d}" / "sap_ds_meta.json").read_text())
        assert final["world_size"] == then and final["global_batch"] == 2
        _assert_matches(out, uninterrupted)


def test_a_resume_cannot_shorten_the_run_below_its_checkpoint(tmp_path, uninterrupted):
    """max_steps below the checkpoint's step: refused before any step (exit 2, naming the key),
    not a run that "finishes" past its schedule and exports the weights of the longer one."""
    out = tmp_path / "run"
    _copy_run_at(uninterrupted, out, 2)
    proc = _run_on(1, out, extra=["train.max_steps=1"], expect=2)
    assert "is at step 2, past this config's 1 steps" in proc.stderr and "train.max_steps >= 2" in proc.stderr
    assert not (out / "summary.json").exists() and not (out / "export").exists()


# --------------------------------------------------------------------------- re-running a finished run


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def test_a_finished_run_is_done_under_its_config_and_an_error_under_another(tmp_path, uninterrupted, capsys):
    """Re-launched unchanged, a finished run is done (exit 0, nothing trained or exported
    again); under another config it stops naming the changed keys and the two ways out,
    and leaves the folder as it was; train.resume=never starts it over from scratch.
    (The first two through sap_ds.train.main in this process: both end before any process
    group or model exists, which is part of what is tested.)"""
    from sap_ds.train import main

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = _snapshot(out)
    args = ["--config", "configs/tiny.yaml", f"output_dir={out}", *WORLD_RUN, *ON_RANKS[1]]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr()
    assert f"{out} holds this run, finished at step {STEPS - 1}" in printed.out and "== sap-ds summary ==" not in printed.out
    assert main([*args, "train.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    message = err[err.index("sap-ds: error:"):]
    for text in ("holds a finished run", "\n  train.lr: 0.003 → 0.001\n", "output_dir=", "train.resume=never"):
        assert text in message, message
    assert _snapshot(out) == before, "a re-run of a finished run changed it"
    import torch.distributed as dist

    assert not dist.is_initialized(), "a finished run started a process group"

    (out / "config.before_step9.json").write_text("{}")  # a leftover of an earlier resume
    over = _run_on(1, out, extra=["train.lr=1e-3", "train.resume=never", "train.max_steps=1", "export.enabled=false"])
    assert "train.resume=never: removed the earlier run's" in over
    assert json.loads((out / "summary.json").read_text())["final_step"] == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert not (out / "export").exists() and not list(out.glob("config.before_step*"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1, "the old run's metrics were kept"


def test_wandb_offline_writes_its_run_folder(uninterrupted):
    """logging.wandb with mode offline: the run is written under output_dir/wandb with no
    network, with the steps' metrics (MFU among them), ready for `wandb sync`."""
    if _wandb_dir() is None:
        pytest.skip("wandb is not installed (pip install 'sap-ds[dev]' installs it)")
    runs = list((uninterrupted / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((uninterrupted / "wandb").iterdir())
    run_id = (uninterrupted / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # the run's records (protobuf, JSON-encoded values): what `wandb sync` would upload
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for key in (b"loss", b"model_tflops_per_s", b"mfu", b"sap/probe_norm", b"final_train_loss"):
        assert key in records, f"{key} is not in the offline W&B run"
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert all(r["model_tflops_per_s"] > 0 and r["mfu"] > 0 for r in records), "MFU missing from a logged step"


def test_wandb_asked_for_but_not_installed_stops_before_step_1(monkeypatch):
    import importlib.util

    from sap_ds.config.run import load_config
    from sap_ds.errors import ConfigError
    from sap_ds.training.metrics import check_logging

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging.wandb.*project 'p'.*not installed.*sap-ds\[wandb\]"):
        check_logging(load_config("configs/tiny.yaml", ["logging.wandb.project=p"]))
    check_logging(load_config("configs/tiny.yaml", ["logging.wandb.project=p", "logging.wandb.mode=disabled"]))


def test_another_world_size_must_keep_the_global_batches():
    """The data is indexed by step and global batch: resuming on another number of ranks
    with another global batch would skip or repeat examples, so it stops, naming the fix."""
    from sap_ds.config.run import load_config
    from sap_ds.errors import ConfigError
    from sap_ds.training.resume import check_batch_on_new_world

    cfg = load_config("configs/tiny.yaml", ["method=sap"])  # micro-batch 2, safety batch 2 per rank
    folder = Path("runs/x/checkpoints/step_00000005")
    with pytest.raises(ConfigError) as info:
        check_batch_on_new_world({"world_size": 2, "global_batch": 8, "safety_global_batch": 4}, cfg, 1, folder)
    assert all(text in str(info.value) for text in (str(folder), "written on 2 ranks, resumed on 1",
                                                     "train.grad_accum=4", "sap.safety_batch_size=4"))
    with pytest.raises(ConfigError, match="8 examples do not split over 3 ranks"):
        check_batch_on_new_world({"world_size": 4, "global_batch": 8}, cfg, 3, folder)
    check_batch_on_new_world({"world_size": 1, "global_batch": 4, "safety_global_batch": 4}, cfg, 2, folder)


# --------------------------------------------------------------------------- changed optimizer settings

# A run resumed under changed optimizer settings steps with the run config's, not the ones
# the checkpoint restored (sap_ds/training/resume_optimizer.py). Before: tiny.yaml's lr 3e-3, cosine,
# 1 warm-up step, no weight decay, clipping 1.0, probe lr 0.05 (betas (0.9, 0.999); eps 1e-8
# for SFT, 1e-4 in WORLD_RUN). After: every kind changed at once, each test reads its own.
CHANGED = ["train.max_steps=6", "train.lr=1e-3", "train.lr_schedule=linear", "train.warmup_steps=4",
           "train.min_lr_ratio=0.1", "train.weight_decay=0.1", "train.adam_betas=[0.8,0.99]", "train.adam_eps=1e-6",
           "train.grad_clip=0.5", "sap.probe_lr=0.02", "sap.probe_adam_eps=1e-6"]
RUNNER = "tests/support/resume_settings_runner.py"


def _changed_lr(step: int) -> float:
    """The lr of 0-based step ``step`` under CHANGED, written out here (not trainer.lr_lambda):
    linear warm-up, (step + 1) / 4 x 1e-3 for steps 0-3, then linear decay from 1e-3 to
    min_lr_ratio 0.1 x 1e-3 over steps 4-6 of 6."""
    if step < 4:
        return 1e-3 * (step + 1) / 4
    return 1e-3 * (0.1 + 0.9 * (1 - min(1.0, (step - 4) / 2)))


def _record_run(out: Path, record: Path, args: list[str]) -> str:
    from tests.support.launch import launch

    proc = launch([RUNNER, "--record", str(record), "--config", "configs/tiny.yaml", f"output_dir={out}", *args])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module", params=["sft", "sap"])
def changed_settings(request, tmp_path_factory):
    """(method, run folder, settings each step used, printed output, resumed step): SFT
    trained 2 steps on 2 ranks and resumed there (DeepSpeed's per-rank checkpoint); SAP
    resumed on 2 ranks from the 1-rank run's step-1 checkpoint (the universal one). Both
    through the real launcher, their optimizers read by tests/support/resume_settings_runner.py."""
    method, root = request.param, tmp_path_factory.mktemp(f"changed_{request.param}")
    out = root / "run"
    if method == "sft":
        common = ["method=sft", "train.eval_every=0", "export.enabled=false"]
        _record_run(out, root / "before.json", [*common, "train.max_steps=2"])
        before = json.loads((root / "before.json").read_text())["weights"]
        assert [(r["lr"], r["weight_decay"], r["clip_grad"]) for r in before] == [(3e-3, 0.0, 1.0)] * 2
        (out / "summary.json").unlink()  # what a run stopped after step 2 leaves
        at, args = 2, common
    else:
        _copy_run_at(request.getfixturevalue("uninterrupted"), out, 1)
        at, args = 1, [*WORLD_RUN, *ON_RANKS[2], "export.enabled=false"]
    printed = _record_run(out, root / "after.json", [*args, *CHANGED])
    assert f"resumed from step_{at:08d} at step {at}" in printed
    return method, out, json.loads((root / "after.json").read_text()), printed, at


def test_resume_applies_a_changed_lr_and_schedule(changed_settings):
    """The lr the optimizer was given at every resumed step, and the lr metrics.jsonl logs
    (after each step: the next step's), are the changed lr on the changed schedule (warm-up,
    shape, floor, total steps), from the first resumed step on."""
    _, out, used, _, at = changed_settings
    assert [r["step"] for r in used["weights"]] == list(range(at, 6))
    for record in used["weights"]:
        assert record["lr"] == pytest.approx(_changed_lr(record["step"]), rel=1e-12), record
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if r["step"] > at and "lr" in r}  # SFT's folder has steps 1-2 too
    assert sorted(logged) == list(range(at + 1, 7))
    for step, lr in logged.items():
        assert lr == pytest.approx(_changed_lr(step), rel=1e-12), (step, lr)


def test_resume_applies_a_changed_weight_decay(changed_settings):
    _, _, used, _, _ = changed_settings
    assert {r["weight_decay"] for r in used["weights"]} == {0.1}


def test_resume_applies_changed_adam_betas_and_eps(changed_settings):
    _, _, used, _, _ = changed_settings
    assert {(tuple(r["betas"]), r["eps"]) for r in used["weights"]} == {((0.8, 0.99), 1e-6)}


def test_resume_applies_a_changed_gradient_clipping(changed_settings):
    _, _, used, _, _ = changed_settings
    assert {r["clip_grad"] for r in used["weights"]} == {0.5}


def test_resume_applies_a_changed_probe_lr(changed_settings):
    """SAP's probe AdamW: the checkpoint keeps its moments, the run config its lr and eps."""
    method, _, used, _, at = changed_settings
    if method != "sap":
        assert used["probe"] == []
        return
    assert [r["step"] for r in used["probe"]] == list(range(at, 6))
    assert {(r["lr"], r["eps"]) for r in used["probe"]} == {(0.02, 1e-6)}


def test_resume_names_the_applied_settings(changed_settings):
    """One line says which optimizer settings changed and are applied, old -> new."""
    method, _, _, printed, at = changed_settings
    line = next((x for x in printed.splitlines() if "optimizer settings changed since the checkpoint" in x), "")
    eps = "1e-08" if method == "sft" else "0.0001"
    for text in (f"applied from step {at + 1} on", "train.lr 0.003 -> 0.001", "train.weight_decay 0 -> 0.1",
                 "train.adam_betas (0.9, 0.999) -> (0.8, 0.99)", f"train.adam_eps {eps} -> 1e-06",
                 "train.lr_schedule 'cosine' -> 'linear'", "train.warmup_steps 1 -> 4", "train.min_lr_ratio 0 -> 0.1",
                 "train.grad_clip 1 -> 0.5", f"next step's lr {_changed_lr(at):g}"):
        assert text in line, (text, line)
    assert ("sap.probe_lr 0.05 -> 0.02" in line) == (method == "sap"), line


def test_the_resume_line_leaves_out_settings_without_effect():
    """The log line's list (no process): train.epochs under a fixed max_steps, and SAP's
    keys in an SFT run, change nothing the optimizers do and are not named; the other
    optimizer keys are, as old -> new."""
    from sap_ds.config.run import config_to_dict, load_config
    from sap_ds.training.resume_optimizer import changed_settings

    before = config_to_dict(load_config("configs/tiny.yaml", ["method=sft"]))
    now = load_config("configs/tiny.yaml", ["method=sft", "train.epochs=3", "sap.probe_lr=1", "train.grad_clip=0",
                                            "train.adam_betas=[0.9,0.99]", "train.save_every=1"])
    assert changed_settings(before, now, []) == ["train.adam_betas (0.9, 0.999) -> (0.9, 0.99)", "train.grad_clip 1 -> 0"]
    sap = load_config("configs/tiny.yaml", ["method=sap", "sap.probe_lr=1"])
    assert changed_settings({**before, "method": "sap"}, sap, ["train.lr 0.001 -> 0.003"]) == [
        "train.lr 0.001 -> 0.003", "sap.probe_lr 0.05 -> 1"]
    assert changed_settings(None, sap, []) == []
