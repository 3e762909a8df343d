"""SAP on ZeRO-3 against the authors' own code (tests/support/reference_sap_authors.py, a
line-by-line transcription of ChengcanWu/SAP's ``SAPcode/``), not against sap-ds's reading of it.

One ZeRO-3 rank (the authors' loop is single-process: one batch, no rank average), LoRA on
q_proj/v_proj as the authors', fp32, 3 steps, the same batches. The authors' safety forward
runs with the previous step's probe in the model (it is a ``down_proj`` bias there), so step 1
cannot tell the two readings apart and steps 2 and 3 can: ``sap.probe_in_safety: true`` must
follow the authors' code, and ``false`` (sap-ds's default, the paper's ``L_safe(W)``) must not.

The weights are compared by their change over the 3 steps (LoRA's A is dominated by its
random start, against which a wrong update would look small), each tensor within
``RTOL_SAP`` of its change's scale as tests/test_zero3_reference.py compares SAP.
"""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from sap_ds.config.run import load_config
from tests.support.launch import launch
from tests.support.reference import assert_matches_reference
from tests.support.reference_sap_authors import run_authors
from tests.support.repo import REPO

STEPS = 3
RTOL_SAP = 2e-4  # tests/test_zero3_reference.py: SAP's tolerance against a plain-PyTorch run, and why
# The authors' optimizers are torch's AdamW with its defaults (weight decay 0.01); eps raised for
# both, as in tests/test_zero3_reference.py. LoRA as the authors' model.py:9-13 (r 8, q_proj and
# v_proj; their alpha is peft's default 8), without dropout (see the reference's docstring).
AUTHORS = ["method=sap", "train.adam_eps=1e-4", "sap.probe_adam_eps=1e-4", "train.weight_decay=0.01",
           "train.grad_clip=0", "train.warmup_steps=0", "train.lr_schedule=constant", "train.micro_batch_size=4",
           "lora.enabled=true", "lora.r=8", "lora.alpha=8", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]",
           "sap.rho=0.05", "sap.probe_lr=0.1", "sap.safety_batch_size=4", "data.eval=[]"]
VARIANTS = {"in_safety": ["sap.probe_in_safety=true"], "off_in_safety": ["sap.probe_in_safety=false"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both settings in one single-rank ZeRO-3 launch (tests/support/zero3_runner.py)."""
    tmp = tmp_path_factory.mktemp("authors")
    variants = [{"name": name, "overrides": overrides} for name, overrides in VARIANTS.items()]
    proc = launch(["tests/support/zero3_runner.py", "--config", "configs/tiny.yaml", "--steps", str(STEPS),
                   "--out", str(tmp), "--variants", json.dumps(variants), *AUTHORS], nproc=1, timeout=900)
    assert proc.returncode == 0, "the ZeRO-3 run failed (output above)"
    return {name: (json.loads((tmp / name / "result.json").read_text()), load_file(str(tmp / name / "params.safetensors")),
                   load_file(str(tmp / name / "probe_rank0.safetensors"))["probe"]) for name in VARIANTS}


@pytest.fixture(scope="module")
def authors():
    cfg = load_config(REPO / "configs/tiny.yaml", AUTHORS + [f"train.max_steps={STEPS}"])
    return run_authors(cfg, STEPS)


def _changes(params, ref):
    assert set(params) == set(ref["after"]), "different trainable parameter sets"
    return {n: (params[n] - ref["before"][n], ref["after"][n] - ref["before"][n]) for n in ref["after"]}


def test_probe_in_safety_follows_the_authors_code(runs, authors):
    """``sap.probe_in_safety: true`` on ZeRO-3: every LoRA tensor's change, the probe and the
    losses of the 3 steps as the authors' loop gives them."""
    result, params, probe = runs["in_safety"]
    assert authors["probe"].abs().max() > 0, "the authors' probe never moved: the test would not see the difference"
    for name, (got, want) in _changes(params, authors).items():
        assert want.abs().max() > 0, f"{name} did not train"
        assert_matches_reference(f"{name} (change)", got, want, RTOL_SAP)
    assert_matches_reference("probe", probe, authors["probe"], RTOL_SAP)
    for step, (got, want) in enumerate(zip(result["losses"], authors["losses"])):
        assert sum(got) / len(got) == pytest.approx(want, rel=1e-5), f"step {step} losses differ"


def test_probe_off_in_safety_differs_from_the_authors_code(runs, authors):
    """``false`` (the probe off in the safety forward) matches the authors' loss of step 1,
    where their probe is still zero, and then departs from them by far more than the
    tolerance: the test above would see the option ignored."""
    result, params, probe = runs["off_in_safety"]
    assert sum(result["losses"][0]) / len(result["losses"][0]) == pytest.approx(authors["losses"][0], rel=1e-5)
    worst = max(((got - want).abs().max() / want.abs().max()).item() for got, want in _changes(params, authors).values())
    probe_off = ((probe - authors["probe"]).abs().max() / authors["probe"].abs().max()).item()
    assert max(worst, probe_off) > 100 * RTOL_SAP, f"probe off in the safety forward is only {worst:.1e} (weights), " \
                                                   f"{probe_off:.1e} (probe) from the authors' code"
