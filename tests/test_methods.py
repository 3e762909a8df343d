"""The method interface (sap_ds/methods/), Lisa against the authors' algorithm, and the
config of safety-data mixing (its data: tests/test_data.py; its 2-rank run against the
reference: tests/test_zero3_reference.py, in that module's shared launch).

The 2-rank test runs Lisa on ZeRO-3 for full fine-tuning and for LoRA in one launch and
compares every trainable parameter with the plain-PyTorch reference (tests/support/reference.py,
the authors' LisaTrainer bookkeeping), at the tolerances of tests/test_zero3_reference.py
(fp32, Adam eps 1e-4; LoRA see RTOL_LORA). Full fine-tuning runs on ZeRO-Offload with 2
micro-batches per rank, LoRA on the default engine. Five steps with lisa.align_steps =
finetune_steps = 2 (phases A A F F A) cover two phase switches (steps 2 and 4), the first
step without the proximal term (proximal_after 0.1 of 5 steps) and the rest with it, and
gradient clipping of the total gradient. The LoRA run is checkpointed after step 3 (inside
a fine-tuning phase, whose anchor is not the initial weights) and resumed in a new
Trainer. A bf16 LoRA run is compared with the fp32 reference at bf16's resolution. rho is raised to 20 so that the proximal term moves the weights far beyond the
tolerance (checked on LoRA: the reference with rho = 0 is ~1 of scale away).
"""
from __future__ import annotations

import json
import typing

import pytest
from safetensors.torch import load_file

from sap_ds.config.run import RunConfig, load_config
from sap_ds.errors import ConfigError
from sap_ds.methods import METHODS
from sap_ds.methods.lisa import LisaMethod
from tests.support.launch import launch
from tests.support.reference import _RefLisa, run_reference
from tests.support.repo import REPO

STEPS = 5
COMMON = ["train.adam_eps=1e-4", "method=lisa", "lisa.align_steps=2", "lisa.finetune_steps=2", "lisa.rho=20",
          "export.enabled=false"]
LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj,down_proj]"]
RTOL = 1e-5  # as tests/test_zero3_reference.py
# LoRA at 5e-5. Measured 99.9th percentiles (max): every tensor under 1e-5 except q_proj's
# lora_B, 1.6e-5 (2.0e-5) in layers 0 and 3, the same with and without the resume; at
# rho = 0 every LoRA tensor is under 2e-6. q_proj's task gradient is the smallest in this
# random model, so its update is mostly the proximal term, whose w - anchor is itself the
# sum of a few such updates: reduction-order noise is amplified, as SAP's is with LoRA
# (tests/test_zero3_reference.py, RTOL_SAP). A wrong term moves them by ~1 of scale.
RTOL_LORA = 5e-5
# Full fine-tuning on ZeRO-Offload (the gradient in the offloaded fp32 buffer, clipping from
# the per-parameter norms DeepSpeed keeps, which add_proximal_gradient must update) with 2
# micro-batches per rank; LoRA on the default engine (the flat gradient buffer).
OFFLOAD = ["deepspeed_config={tmp}/offload.json", "train.offload_adam=torch", "train.grad_accum=2"]
# bf16 (the GPU path: bf16 weights and gradients, fp32 master and anchor) against the fp32
# reference: agreement up to bf16's resolution, which must stay far below what the proximal
# term moves (checked: the rho = 0 reference is ~1 of scale away). bf16 matmuls are ~100x
# slower than fp32 on CPUs without AMX: short sequences, 8 examples.
BF16 = ["model.dtype=bf16", "data.max_length=64", "data.safety_max_length=48", "data.eval=[]",
        "data.train=[{path: data/alpaca/seed_tasks.jsonl, format: alpaca_seed, limit: 8}]"]
BF16_TENSOR, BF16_ALL = 0.3, 0.1  # measured: 0.18 (worst tensor) and 0.042 (all), see below
VARIANTS = [{"name": "full", "overrides": OFFLOAD, "rtol": RTOL},
            {"name": "lora", "overrides": LORA, "resume_at": 3, "rtol": RTOL_LORA, "check_rho_matters": True},
            {"name": "lora-bf16", "overrides": [*LORA, *BF16], "reference": ["model.dtype=fp32"], "bf16": True}]


def _relative_errors(got, ref):
    import torch

    err = (got - ref).abs().flatten()
    scale = ref.abs().max().item() + 1e-12
    q999 = torch.quantile(err.double(), 0.999).item() if err.numel() > 1 else err.max().item()
    return err.max().item() / scale, q999 / scale


def _variants(tmp):
    return [{**v, "overrides": [o.replace("{tmp}", str(tmp)) for o in v["overrides"]]} for v in VARIANTS]


@pytest.fixture(scope="module")
def lisa_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("lisa")
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (out / "offload.json").write_text(json.dumps(ds))
    proc = launch(["tests/support/lisa_runner.py", "--config", "configs/tiny.yaml", "--steps", str(STEPS), "--out", str(out),
                   "--variants", json.dumps(_variants(out)), *COMMON])
    assert proc.returncode == 0, "2-rank Lisa run failed (output above)"
    return out, {v["name"]: (json.loads((out / v["name"] / "result.json").read_text()),
                             load_file(str(out / v["name"] / "params.safetensors"))) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS, ids=[v["name"] for v in VARIANTS])
def test_zero3_lisa_matches_reference(lisa_runs, variant):
    tmp, runs = lisa_runs
    result, params = runs[variant["name"]]
    variant = next(v for v in _variants(tmp) if v["name"] == variant["name"])
    if "resume_at" in variant:
        assert result["resumed_at"] == variant["resume_at"], "the run did not resume from its checkpoint"
    # the proximal term went through the per-group gradient views, not parameter by parameter
    assert result["grads_per_group"], "the proximal gradient was added through DeepSpeed's per-parameter accessors"
    overrides = COMMON + variant["overrides"] + variant.get("reference", []) + [f"train.max_steps={STEPS}"]
    ref = run_reference(load_config(REPO / "configs/tiny.yaml", overrides), world=2, steps=STEPS)
    assert set(params) == set(ref["params"]), "different trainable parameter sets"
    if variant.get("bf16"):
        return _check_bf16_follows_the_reference(params, ref, result, overrides)
    for name, tensor in ref["params"].items():
        worst, q999 = _relative_errors(params[name], tensor)
        rtol = variant["rtol"]
        assert worst <= 10 * rtol and q999 <= rtol, f"{name}: |zero3 - reference| max {worst:.2e}, q99.9 {q999:.2e}"
    for step, (got, want) in enumerate(zip(result["losses"], ref["losses"])):
        assert got == pytest.approx(want, rel=1e-5), f"step {step} losses differ"
    if not variant.get("check_rho_matters"):
        return
    # The comparison can fail: without the proximal term the weights end far from these.
    plain = run_reference(load_config(REPO / "configs/tiny.yaml", overrides + ["lisa.rho=0"]), world=2, steps=STEPS)
    moved = max(_relative_errors(params[n], t)[0] for n, t in plain["params"].items())
    assert moved > 1e3 * RTOL, f"rho=20 moved the weights by only {moved:.1e} of scale: the test cannot see the term"


def _check_bf16_follows_the_reference(params, ref, result, overrides):
    """bf16 against the fp32 reference. Element-wise bounds mean nothing here: a LoRA B
    tensor starts at zero and its smallest elements carry bf16's rounding of tiny gradients
    (measured: up to 0.7 of the tensor's largest element). What must hold is that the run
    follows Lisa's dynamics: every tensor ends much closer to the rho = 20 reference than the
    rho = 0 reference does (the distance the proximal term makes). Measured: at most 0.18 of
    it for a tensor (v_proj A of layer 3), 0.042 over all of them; a missing term gives ~1,
    a wrong sign ~2."""
    import torch

    plain = run_reference(load_config(REPO / "configs/tiny.yaml", overrides + ["lisa.rho=0"]), world=2, steps=STEPS)
    names = sorted(ref["params"])
    for name in names:
        off = (params[name].double() - ref["params"][name].double()).norm()
        term = (plain["params"][name].double() - ref["params"][name].double()).norm()
        assert off <= BF16_TENSOR * term, f"{name}: bf16 is {off / term:.2f} of the proximal term's distance from the reference"
    flat = lambda d: torch.cat([d[n].double().flatten() for n in names])  # noqa: E731
    off, term = (flat(params) - flat(ref["params"])).norm(), (flat(plain["params"]) - flat(ref["params"])).norm()
    assert off <= BF16_ALL * term, f"all tensors: bf16 is {off / term:.3f} of the proximal term's distance"
    for step, (got, want) in enumerate(zip(result["losses"], ref["losses"])):
        assert got == pytest.approx(want, rel=2e-2), f"step {step}: bf16 loss {got} vs fp32 reference {want}"


# --------------------------------------------------------------------------- no launch


def test_registry_is_the_configs_method_names():
    """One registry (sap_ds.config.methods.METHOD_SECTIONS): the config's method: values, each
    section's name and its Method's agree."""
    from sap_ds.config.methods import METHOD_SECTIONS

    assert list(METHODS) == list(typing.get_args(RunConfig.model_fields["method"].annotation)) == list(METHOD_SECTIONS)
    for name, section in METHOD_SECTIONS.items():
        assert section.name == METHODS[name].name == name
        if section.model_fields:  # a method with knobs has its section under its name
            assert RunConfig.model_fields[name].annotation is section


@pytest.mark.parametrize("align,finetune", [(2, 3), (1, 1), (3, 0), (0, 4), (100, 900)])
def test_lisa_schedule_is_the_authors(align, finetune):
    """The phase of each step and the switches, against the authors' check_mode."""
    cfg = load_config(REPO / "configs/tiny.yaml", ["method=lisa", f"lisa.align_steps={align}",
                                                   f"lisa.finetune_steps={finetune}"])
    method, ref = LisaMethod(cfg), _RefLisa(cfg, [])
    switches = []
    for step in range(2 * (align + finetune) + 3):
        before = ref.status
        assert method.aligning(step) == ref.check_mode(step, []), f"step {step}"
        switches.append(ref.status != before and step > 0)
        assert method.alignment_steps_before(step) == sum(method.aligning(s) for s in range(step))
    assert [method.switches_at(s) for s in range(len(switches))] == switches


def test_lisa_config_errors():
    with pytest.raises(ConfigError, match="lisa.align_steps and lisa.finetune_steps are both 0"):
        load_config(REPO / "configs/tiny.yaml", ["method=lisa", "lisa.align_steps=0", "lisa.finetune_steps=0"])
    with pytest.raises(ConfigError, match="method 'lisa' aligns on the safe responses of data.safety"):
        load_config(REPO / "configs/tiny.yaml", ["method=lisa", "data.safety=[]"])
    with pytest.raises(ConfigError, match="lisa"):
        load_config(REPO / "configs/tiny.yaml", ["method=dpo"])


def test_lisa_anchor_resumes_on_another_world_size_only_at_a_switch():
    from sap_ds.errors import CheckpointError

    cfg = load_config(REPO / "configs/tiny.yaml", ["method=lisa", "lisa.align_steps=2", "lisa.finetune_steps=3"])
    method = LisaMethod(cfg)
    method.load_state_dict({"meta": {"step": 2}, "tensors": {}}, resharded=True)  # a switch: the anchor is renewed
    with pytest.raises(CheckpointError, match="step 3 is not a phase switch"):
        method.load_state_dict({"meta": {"step": 3}, "tensors": {}}, resharded=True)


def test_lisa_keys_do_not_change_other_methods_runs():
    """A run saved before the lisa section existed (no lisa.* keys) is the same SFT/SAP run;
    for a Lisa run, a changed lisa key is a change."""
    from sap_ds.config.run import config_changes, config_to_dict

    for method in ("sft", "sap"):
        cfg = load_config(REPO / "configs/tiny.yaml", [f"method={method}"])
        saved = {k: v for k, v in config_to_dict(cfg).items() if k != "lisa"}
        assert config_changes(saved, cfg) == []
    cfg = load_config(REPO / "configs/tiny.yaml", ["method=lisa"])
    saved = config_to_dict(load_config(REPO / "configs/tiny.yaml", ["method=lisa", "lisa.rho=0.1"]))
    assert config_changes(saved, cfg) == ["lisa.rho: 0.1 → 1.0"]


def test_safety_mix_is_sft_on_mixed_data():
    """method safety_mix: SFT's step, no pair table or state; its ratio reaches the data
    pipeline (Method.safety_mix), every other method's is 0 whatever safety_mix.ratio says."""
    from sap_ds.methods import build_method
    from sap_ds.methods.safety_mix import SafetyMixMethod
    from sap_ds.methods.sft import SftMethod

    method = build_method(load_config(REPO / "configs/tiny.yaml", ["method=safety_mix", "safety_mix.ratio=0.1"]))
    assert isinstance(method, SafetyMixMethod) and method.step.__func__ is SftMethod.step
    assert method.safety_mix == 0.1 and not method.needs_safety and method.state_dict() == {"meta": {}, "tensors": {}}
    assert load_config(REPO / "configs/tiny.yaml", ["method=safety_mix"]).safety_mix.ratio == 0.03  # SafeInstr's 3 %
    for other in ("sft", "sap", "lisa"):
        assert build_method(load_config(REPO / "configs/tiny.yaml", [f"method={other}", "safety_mix.ratio=0.5"])).safety_mix == 0


def test_safety_mix_config_errors():
    with pytest.raises(ConfigError, match="method 'safety_mix' adds refusal demonstrations .*set data.safety"):
        load_config(REPO / "configs/tiny.yaml", ["method=safety_mix", "data.safety=[]"])
    for bad in ("0", "-0.1"):
        with pytest.raises(ConfigError, match="key 'safety_mix.ratio': Input should be greater than 0"):
            load_config(REPO / "configs/tiny.yaml", ["method=safety_mix", f"safety_mix.ratio={bad}"])


def test_safety_mix_keys_do_not_change_other_methods_runs():
    """A run saved before the safety_mix section existed is the same SFT/SAP/Lisa run, and so is
    one whose unread safety_mix.ratio changed; for a safety_mix run, a changed ratio is a change."""
    from sap_ds.config.run import config_changes, config_to_dict

    for method in ("sft", "sap", "lisa"):
        cfg = load_config(REPO / "configs/tiny.yaml", [f"method={method}"])
        saved = config_to_dict(cfg)
        assert config_changes({k: v for k, v in saved.items() if k != "safety_mix"}, cfg) == []
        assert config_changes(saved, load_config(REPO / "configs/tiny.yaml", [f"method={method}", "safety_mix.ratio=0.5"])) == []
    cfg = load_config(REPO / "configs/tiny.yaml", ["method=safety_mix"])
    saved = config_to_dict(load_config(REPO / "configs/tiny.yaml", ["method=safety_mix", "safety_mix.ratio=0.1"]))
    assert config_changes(saved, cfg) == ["safety_mix.ratio: 0.1 → 0.03"]
    assert config_changes(config_to_dict(load_config(REPO / "configs/tiny.yaml", ["method=sft"])), cfg) == \
        ["method: 'sft' → 'safety_mix'"]


def test_sap_export_transform_is_keep_probe():
    """SAP's export hook writes the probe into the model only with export.keep_probe."""
    import types

    from sap_ds.methods.sap import SapMethod
    from sap_ds.sap.probe import Probe
    from tests.support.tiny_models import CPU, HIDDEN, tiny_model

    model = tiny_model("llama", layers=3)
    probe = Probe(model, [0, 2], HIDDEN, CPU)
    probe.init_random(3.0, seed=0)
    probe.remove()
    for keep in (False, True):
        method = SapMethod(load_config(REPO / "configs/tiny.yaml", ["method=sap", f"export.keep_probe={str(keep).lower()}"]))
        method.state = types.SimpleNamespace(probe=probe)
        out = method.export_transform(None, model)
        assert (out is model) != keep
        if keep:
            assert out.model.layers[2].mlp.down_proj.bias.equal(probe.vectors[1].detach())
