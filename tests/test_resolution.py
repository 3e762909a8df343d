"""Can bf16 working weights hold SAP's perturbation? (sap_ds/sap/resolution.py, docs/algorithm.md)

The figures come from an independent float64 computation of ``bf16(W + d) - bf16(W)``; the
check before step 1 stops a bf16 full fine-tuning run at the paper's rho (2 ranks, through
train.py) with a message naming sap.rho and the smallest rho that passes, and lets a run
at a representable rho go on, logging the three figures in metrics.jsonl."""
from __future__ import annotations

import json
import math
import re
import types

import pytest
import torch

from sap_ds.config.methods import SapConfig
from sap_ds.errors import ConfigError
from sap_ds.sap import resolution
from tests.support.launch import launch, run_single


def _weights(n=1 << 20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(n, generator=g), torch.randn(n, generator=g)


def _independent(w, g, rho, dtype):
    """ratio, cosine, changed fraction of the perturbation d = rho ||W|| g / ||g|| in dtype."""
    d = (rho * w.double().norm() / g.double().norm() * g.double()).float()
    r = (w + d).to(dtype).double() - w.to(dtype).double()
    d = d.double()
    return (r.norm() / d.norm()).item(), (r @ d / (r.norm() * d.norm())).item(), (r != 0).double().mean().item()


@pytest.mark.parametrize("rho", [2e-5, 1e-3, 0.05])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fidelity_matches_an_independent_computation(rho, dtype):
    w, g = _weights()
    got = resolution.perturbation_fidelity(w, g, rho, dtype)
    ratio, cosine, changed = _independent(w, g, rho, dtype)
    assert got.ratio == pytest.approx(ratio, rel=1e-5)
    assert got.cosine == pytest.approx(cosine, rel=1e-5, abs=1e-7)
    assert got.changed_fraction == pytest.approx(changed, rel=1e-6)


def test_verdicts_and_list_inputs():
    w, g = _weights()
    paper = resolution.perturbation_fidelity(w, g, 2e-5, torch.bfloat16)
    assert not paper.ok and paper.ratio > 5 and paper.cosine < 0.2  # bf16 cannot hold the paper's radius
    assert resolution.perturbation_fidelity(w, g, 0.05, torch.bfloat16).ok
    assert resolution.perturbation_fidelity(w, g, 2e-5, torch.float32).ok
    zero = resolution.perturbation_fidelity(w, g, 0.0, torch.bfloat16)
    assert zero.intended_zero and zero.ok and zero.changed_fraction == 0
    # shards as lists: global norms over all of them, the same figures as one tensor
    half = w.numel() // 3
    split = resolution.perturbation_fidelity([w[:half], w[half:]], [g[:half], g[half:]], 1e-3, torch.bfloat16)
    whole = resolution.perturbation_fidelity(w, g, 1e-3, torch.bfloat16)
    assert split.ratio == pytest.approx(whole.ratio, rel=1e-6) and split.cosine == pytest.approx(whole.cosine, rel=1e-6)


def test_bisection_finds_the_threshold_and_says_when_there_is_none():
    threshold = 37.0
    verdict = lambda m: types.SimpleNamespace(ok=m >= threshold)  # noqa: E731
    found = resolution.smallest_passing_multiplier(verdict, ceiling=1e4)
    assert threshold <= found <= threshold * 4 ** (1 / 2**resolution.BISECTION_STEPS)
    assert resolution.smallest_passing_multiplier(verdict, ceiling=30.0) is None
    assert resolution.round_up(0.012301) == pytest.approx(0.013) and resolution.round_up(0.012) == pytest.approx(0.012)


def _fake_run(w, g, rho, dtype):
    """What ``resolution.check`` reads: the shards (one group) and the SAP state."""
    group = types.SimpleNamespace(master=w, lp=torch.empty(w.numel(), dtype=dtype))
    shards = types.SimpleNamespace(groups=[group], trainable_numel=w.numel())
    scale = torch.tensor(rho * w.double().norm().item() / g.double().norm().item(), dtype=torch.float32)
    return shards, types.SimpleNamespace(direction=[g], scale=scale)


def test_check_names_the_key_the_figures_and_a_rho_that_passes(caplog):
    w, g = _weights()
    shards, state = _fake_run(w, g, 2e-5, torch.bfloat16)
    cfg = SapConfig(rho=2e-5, kernels="torch")
    with pytest.raises(ConfigError) as info:
        resolution.check(shards, state, cfg, "bf16")
    msg = str(info.value)
    assert "sap.rho=2e-05" in msg and "realised/intended norm" in msg and "cosine" in msg
    assert "sap.resolution_check=warn" in msg and "model.dtype=fp32" in msg
    suggested = float(re.search(r"the smallest sap.rho that meets it on these weights is about ([0-9.e+-]+?)\. ", msg)[1])
    assert resolution.perturbation_fidelity(w, g, suggested, torch.bfloat16).ok, suggested
    assert not resolution.perturbation_fidelity(w, g, suggested / 2, torch.bfloat16).ok, suggested
    cfg.resolution_check = "warn"
    with caplog.at_level("WARNING", logger="sap_ds"):
        measured = resolution.check(shards, state, cfg, "bf16")
    assert not measured.ok and "sap.rho=2e-05" in caplog.text
    for ok_case in [(2e-5, torch.float32), (0.05, torch.bfloat16)]:  # pass silently
        shards, state = _fake_run(w, g, *ok_case)
        assert resolution.check(shards, state, SapConfig(rho=ok_case[0], kernels="torch"), "x").ok


# --------------------------------------------------------------------------- through train.py

BF16_FULL = ["--config", "configs/tiny.yaml", "method=sap", "model.dtype=bf16", "data.max_length=64",
             "data.safety_max_length=48", "data.eval=[]", "train.max_steps=1", "export.enabled=false",
             "data.train=[{path: data/alpaca/seed_tasks.jsonl, format: alpaca_seed, limit: 8}]"]


def test_bf16_full_finetuning_at_the_papers_rho_stops_before_step_1(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "SENTINEL").write_text("keep\n")
    proc = launch(["sap_ds/train.py", *BF16_FULL, f"output_dir={out}", "sap.rho=2e-5"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sap-ds: error:")]
    assert errors and all("sap.rho=2e-05" in line and "smallest sap.rho" in line for line in errors), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # what was there is untouched, and nothing of a run was recorded (the metrics logger, opened
    # with the trainer, leaves an empty metrics.jsonl and an empty TensorBoard folder)
    assert (out / "SENTINEL").read_text() == "keep\n"
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""


def test_bf16_run_at_a_representable_rho_logs_the_realised_perturbation(tmp_path):
    out = tmp_path / "run"
    proc = run_single([*BF16_FULL, f"output_dir={out}", "sap.rho=0.05"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sap.rho" not in proc.stderr  # no warning
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    ratio, cosine = record["sap/perturb_realized_ratio"], record["sap/perturb_cosine"]
    assert abs(ratio - 1) <= resolution.RATIO_TOLERANCE and cosine >= resolution.COSINE_MIN, record
    assert record["sap/probe_signal_ratio"] >= resolution.PROBE_SIGNAL_MIN, record  # gV resolved too (bf16 only)
    # the embedding dominates the tiny model and most of its rows get no gradient: few elements move
    assert 0 < record["sap/perturb_changed_fraction"] <= 1 and math.isfinite(record["sap/safety_grad_norm"])


def test_loss_of_resolution_during_the_run_is_warned_once(caplog):
    """The check before step 1 sees only the first direction (LoRA: B = 0, always resolved);
    a logged step whose realised perturbation leaves the tolerance is warned about once."""
    from sap_ds.methods.sap import SapMethod

    method = SapMethod(types.SimpleNamespace(model=types.SimpleNamespace(dtype="bf16"), sap=SapConfig()))
    good = {"sap/perturb_realized_ratio": 1.01, "sap/perturb_cosine": 0.998, "sap/perturb_changed_fraction": 0.9}
    bad = {"sap/perturb_realized_ratio": 4.2, "sap/perturb_cosine": 0.31, "sap/perturb_changed_fraction": 0.02}
    with caplog.at_level("WARNING", logger="sap_ds"):
        method._watch_resolution(7, good)
        method._watch_resolution(7, {"sap/perturb_realized_ratio": float("nan"), "sap/perturb_cosine": float("nan")})
        assert not method._resolution_warned and not caplog.records
        method._watch_resolution(7, bad)
        method._watch_resolution(7, bad)
    assert method._resolution_warned
    assert len(caplog.records) == 1
    assert "step 7" in caplog.text and "sap.rho" in caplog.text and "cosine 0.31" in caplog.text
