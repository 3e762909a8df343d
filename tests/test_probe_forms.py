"""The two forms of SAP's probe step (docs/algorithm.md, "Two forms of the probe step"),
without a launch: the config keys and their refusals, layer bands and the depth check
before the model loads, the FLOPs model's extra pass, the probe update rules and the
checkpoint state of each. The forms' training against the reference is in
tests/test_zero3_reference.py (``FORM_VARIANTS``)."""
from __future__ import annotations

import json

import pytest
import torch

from sap_ds.config.methods import parse_layer_band
from sap_ds.config.run import config_changes, config_to_dict, load_config
from sap_ds.errors import ConfigError
from tests.support.repo import REPO

TINY = REPO / "configs" / "tiny.yaml"
PAPER = ["method=sap", "sap.probe_update=gradient", "sap.probe_timing=same_step"]


def _error(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, list(overrides))
    return str(info.value)


# --------------------------------------------------------------------------- config


def test_defaults_are_the_authors_form():
    cfg = load_config(TINY, ["method=sap"])
    assert (cfg.sap.probe_update, cfg.sap.probe_timing, cfg.sap.probe_passes) == ("adam", "next_step", 1)
    paper = load_config(TINY, PAPER)
    assert paper.sap.probe_passes == 2
    # no Adam: its eps cannot change the run; V is zeroed right before the safety pass
    assert paper.sap.unused_keys() == {"probe_adam_eps", "resolution_check", "probe_in_safety"}
    fixed = load_config(TINY, ["method=sap", "sap.probe_train=false", "sap.probe_init=random"])
    assert {"probe_update", "probe_timing"} <= fixed.sap.unused_keys()


def test_wrong_choices_name_the_key_and_the_valid_values():
    msg = _error(["method=sap", "sap.probe_update=sgd"])
    assert "sap.probe_update" in msg and "'adam' or 'gradient'" in msg
    msg = _error(["method=sap", "sap.probe_timing=now"])
    assert "sap.probe_timing" in msg and "'next_step' or 'same_step'" in msg


def test_a_random_start_that_same_step_would_zero_is_refused():
    """same_step with probe_reset zeroes V before every probe pass: a random initial probe
    would never be used, so the combination is refused naming all three keys; without the
    reset (the probe starts there and keeps its updates) it is accepted."""
    msg = _error([*PAPER, "sap.probe_init=random"])
    for key in ("sap.probe_init", "sap.probe_timing", "sap.probe_reset"):
        assert key in msg, msg
    assert load_config(TINY, [*PAPER, "sap.probe_init=random", "sap.probe_reset=false"]).sap.probe_init == "random"
    assert load_config(TINY, ["method=sap", "sap.probe_init=random"]).sap.probe_timing == "next_step"  # next_step uses it once


def test_layer_bands():
    assert parse_layer_band("11-20") == list(range(11, 21))
    assert parse_layer_band(" 3 - 3 ") == [3]
    cfg = load_config(TINY, ["method=sap", "sap.probe_layers=1-3"])
    assert cfg.sap.probe_layers == [1, 2, 3]
    assert config_to_dict(cfg)["sap"]["probe_layers"] == [1, 2, 3]  # config.json records the layers themselves
    assert load_config(TINY, ["method=sap", "sap.probe_layers=[0, 3]"]).sap.probe_layers == [0, 3]  # the list form
    for bad in ("20-11", "a-b", "3-", "-3", "3"):
        msg = _error(["method=sap", f"sap.probe_layers='{bad}'"])
        assert "sap.probe_layers" in msg and "'11-20'" in msg and "[3, 9]" in msg, msg
    assert "valid list" in _error(["sap.probe_layers=3"])  # an int is still not a list


def test_config_changes_read_runs_recorded_before_the_keys_existed():
    """A run's config.json from before probe_update / probe_timing existed was trained with
    adam / next_step: resuming or comparing it under the defaults is not a config change."""
    cfg = load_config(TINY, ["method=sap"])
    saved = config_to_dict(cfg)
    for key in ("probe_update", "probe_timing", "probe_in_safety"):
        saved["sap"].pop(key)
    assert config_changes(saved, cfg) == []
    assert config_changes(saved, load_config(TINY, ["method=sap", "sap.probe_timing=same_step"])) == [
        "sap.probe_timing: 'next_step' → 'same_step'"]
    assert config_changes(saved, load_config(TINY, ["method=sap", "sap.probe_in_safety=true"])) == [
        "sap.probe_in_safety: False → True"]


def test_probe_in_safety_is_off_by_default_and_on_where_a_config_claims_the_authors_form():
    """The safety forward without the probe is sap-ds's default (the paper's L_safe(W)); the
    configs that say they run the authors' code set their value, the probe in that forward
    (docs/algorithm.md, "Differences from the authors' code"). A value that is not a boolean
    names the key; where no non-zero probe can reach the safety forward the key is unused."""
    import yaml

    assert load_config(TINY, ["method=sap"]).sap.probe_in_safety is False
    assert load_config(REPO / "configs" / "paper_llama2_7b_lora.yaml", []).sap.probe_in_safety is True
    points = yaml.safe_load((REPO / "configs" / "sweeps" / "defences.yaml").read_text())["points"]
    assert "sap.probe_in_safety=true" in points["sap_authors"]
    assert "sap.probe_in_safety=false" in points["sap_authors_probe_off"]
    msg = _error(["method=sap", "sap.probe_in_safety=maybe"])
    assert "sap.probe_in_safety" in msg, msg
    assert "probe_in_safety" not in load_config(TINY, ["method=sap"]).sap.unused_keys()
    for overrides in (["sap.direction=random"], ["sap.probe_train=false", "sap.probe_init=random"], PAPER[1:]):
        assert "probe_in_safety" in load_config(TINY, ["method=sap", *overrides]).sap.unused_keys(), overrides


def test_probe_layers_are_checked_against_the_depth_before_the_model_loads(tiny_model_path, tmp_path):
    """sap_ds.train.fail_fast reads the depth from config.json (SapMethod.check_model_config):
    the paper's band on the 4-layer test model fails in seconds, naming the key, the depth
    and what is valid."""
    from sap_ds.errors import ProbeError
    from sap_ds.sap.probe import check_layers_from_config
    from sap_ds.train import check_model_config

    with pytest.raises(ProbeError) as info:
        check_model_config(load_config(TINY, ["method=sap", "sap.probe_layers=11-20"]))
    msg = str(info.value)
    assert "sap.probe_layers" in msg and "4 decoder layers" in msg and "0..3" in msg and "[11, 12," in msg
    check_model_config(load_config(TINY, ["method=sap", "sap.probe_layers=0-3"]))
    check_model_config(load_config(TINY, ["method=sft", "sap.probe_layers=11-20"]))  # SFT has no probe
    gpt2 = tmp_path / "config.json"
    gpt2.write_text(json.dumps({"n_layer": 2}))
    with pytest.raises(ProbeError, match="2 decoder layers"):
        check_layers_from_config([2], gpt2)
    gpt2.write_text(json.dumps({"hidden_size": 8}))  # no depth declared: left to the check on the model
    check_layers_from_config([99], gpt2)


# --------------------------------------------------------------------------- FLOPs


def test_flops_count_the_extra_probe_pass_of_same_step():
    from sap_ds.cost import flops
    from sap_ds.cost.model_spec import ModelSpec

    spec = ModelSpec("hand", hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=32)
    task, safety = [3, 5], [4, 4]
    for fm in (flops.FlopsModel(spec), flops.FlopsModel(spec, 2, ("q_proj", "v_proj"))):
        one = fm.step(task, safety, safety=1, probe=1, lowest_probe_layer=1)
        two = fm.step(task, safety, safety=1, probe=1, lowest_probe_layer=1, probe_passes=2)
        extra = fm.forward(task) + fm.probe_backward(task, 1)  # the pass at W: forward + probe backward
        assert two.total == one.total + extra
        assert two.parts["probe_forward"] == 2 * fm.forward(task)
        half = fm.step(task, safety, safety=1, probe=0.5, lowest_probe_layer=1, probe_passes=2)
        assert half.total == pytest.approx(fm.step(task, safety, safety=1).total + extra)
        assert flops.ideal_ratio(fm, task, safety, lowest_probe_layer=1, probe_passes=2) == pytest.approx(
            fm.step(task).total / two.total)
    # deep limit (probe at the bottom, attention and lm_head negligible): 3F/10F and 2F/8F
    deep = ModelSpec("deep", 4096, 11008, 4000, 32, 32, 8)
    assert flops.ideal_ratio(flops.FlopsModel(deep), [8], [8], probe_passes=2) == pytest.approx(0.3, abs=2e-3)
    assert flops.ideal_ratio(flops.FlopsModel(deep, 8, ("q_proj", "v_proj")), [8], [8],
                             probe_passes=2) == pytest.approx(0.25, abs=2e-3)
    from sap_ds.cost.model_spec import NAMED_MODELS  # docs/benchmarks.md: Llama-2-70B, probe from layer 3, 128 tokens

    spec70, lengths = NAMED_MODELS["llama2-70b"], [128] * 8
    assert flops.ideal_ratio(flops.FlopsModel(spec70), lengths, lengths, lowest_probe_layer=3,
                             probe_passes=2) == pytest.approx(0.303, abs=5e-4)
    assert flops.ideal_ratio(flops.FlopsModel(spec70, 8, ("q_proj", "v_proj")), lengths, lengths, lowest_probe_layer=3,
                             probe_passes=2) == pytest.approx(0.253, abs=5e-4)
    assert "same_step" in flops.FORMULA


def test_trainer_throughput_counts_the_passes_the_step_ran():
    """The per-step TFLOP/s (sap_ds/cost/throughput.py) count the passes the method says the
    step ran (``SapMethod.extra_passes``, from the step's ``ran`` record: sap_step sets
    ``probe_passes`` 2 under same_step, 0 without a probe pass; the safety batch it draws)."""
    import types

    from sap_ds.cost import flops
    from sap_ds.cost.model_spec import ModelSpec
    from sap_ds.cost.throughput import Throughput
    from sap_ds.methods.base import NO_EXTRA_PASSES
    from sap_ds.methods.sap import SapMethod

    fm = flops.FlopsModel(ModelSpec("hand", 8, 16, 4, 2, 1, 32))
    meter = Throughput.__new__(Throughput)  # no peak measurement: only the FLOPs are checked
    meter.flops_model, meter.note, meter.peak, meter.flops, meter.seconds = fm, None, {"total": None}, 0.0, 0.0
    method = SapMethod(load_config(TINY, ["method=sap", "sap.probe_layers=[2, 1]"]))  # 2 safety pairs per rank
    pair = types.SimpleNamespace(safe=types.SimpleNamespace(input_ids=[0] * 4),
                                 harmful=types.SimpleNamespace(input_ids=[0] * 4))
    trainer = types.SimpleNamespace(data=types.SimpleNamespace(safety=[pair, pair]))
    task, safety = [3, 5], [4, 4, 4, 4]
    for ran, passes in (({"safety": True, "probe": True, "probe_passes": 2}, 2),
                        ({"safety": True, "probe": True, "probe_passes": 1}, 1), ({"safety": True, "probe": True}, 1)):
        method.state = types.SimpleNamespace(ran=ran, probe=types.SimpleNamespace(layers=[2, 1]))
        got = meter.step(task, method.extra_passes(trainer, 0), seconds=1.0)["model_tflops_per_s"]
        want = fm.step(task, safety, safety=1, probe=1, lowest_probe_layer=1, probe_passes=passes).total / 1e12
        assert got == pytest.approx(want)
    method.state.ran = {"safety": False, "probe": False, "probe_passes": 0}
    skipped = meter.step(task, method.extra_passes(trainer, 1), seconds=1.0)
    assert skipped["model_tflops_per_s"] == pytest.approx(fm.step(task).total / 1e12)
    assert meter.step(task, NO_EXTRA_PASSES, seconds=1.0) == skipped  # SFT's step


# --------------------------------------------------------------------------- the update rules


def _state(overrides):
    from transformers import AutoModelForCausalLM

    from sap_ds.model.embedded import tiny_model_dir
    from sap_ds.sap.probe import Probe
    from sap_ds.sap.probe_update import make_optimizer
    from sap_ds.sap.step import SapState

    cfg = load_config(TINY, ["method=sap", *overrides])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    probe = Probe(model, cfg.sap.probe_layers, model.config.hidden_size, torch.device("cpu"))
    return cfg, SapState(probe, make_optimizer(probe, cfg.sap), [], torch.zeros(()))


def test_gradient_update_is_a_plain_step_with_no_state():
    """V <- V - probe_lr * gV (SafeTune's v.data.add_(v.grad, alpha=-beta)); next_step with
    probe_reset zeroes V first (it was the previous step's), same_step leaves that to
    sap_step (before the probe passes); follow scales the step with the task lr."""
    from sap_ds.sap.probe_update import update_probe

    grad = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    cfg, st = _state(["sap.probe_update=gradient", "sap.probe_lr=0.05"])
    assert st.probe_optimizer is None
    with torch.no_grad():
        st.probe.vectors.fill_(1.0)
    update_probe(st, grad, cfg.sap)
    torch.testing.assert_close(st.probe.vectors.detach(), -0.05 * grad, rtol=0, atol=0)  # reset, then one step
    assert st.probe.vectors.grad is None and st.stats["probe_update_skipped"] is False
    cfg, st = _state(["sap.probe_update=gradient", "sap.probe_lr=0.05", "sap.probe_reset=false",
                      "sap.probe_lr_schedule=follow"])
    with torch.no_grad():
        st.probe.vectors.fill_(1.0)
    update_probe(st, grad, cfg.sap, lr_factor=0.5)
    torch.testing.assert_close(st.probe.vectors.detach(), 1.0 - 0.025 * grad)
    before = st.probe.vectors.detach().clone()
    update_probe(st, torch.full_like(grad, float("nan")), cfg.sap)  # non-finite: no update
    assert st.stats["probe_update_skipped"] and torch.equal(st.probe.vectors.detach(), before)
    cfg, st = _state([*PAPER[1:], "sap.probe_lr=0.05"])
    with torch.no_grad():
        st.probe.vectors.fill_(1.0)  # same_step: whatever V holds here is what the gradient was taken at
    update_probe(st, grad, cfg.sap)
    torch.testing.assert_close(st.probe.vectors.detach(), 1.0 - 0.05 * grad)


def test_adam_update_is_unchanged():
    """The authors' form: reset, then one AdamW step (its first step moves every element by
    about lr against the gradient's sign)."""
    from sap_ds.sap.probe_update import update_probe

    grad = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    cfg, st = _state(["sap.probe_lr=0.05"])
    update_probe(st, grad, cfg.sap)
    torch.testing.assert_close(st.probe.vectors.detach(), -0.05 * grad.sign(), rtol=1e-4, atol=1e-6)
    assert set(st.probe_optimizer.state[st.probe.vectors]) == {"step", "exp_avg", "exp_avg_sq"}


def test_checkpoint_state_of_each_update_rule():
    """gradient: no sap.opt.* tensors (there is no optimizer); an Adam checkpoint resumed
    under gradient (a logged config change) loads its probe and ignores the moments; a
    gradient checkpoint resumed under adam starts the moments afresh."""
    from sap_ds.methods.sap import SapMethod
    from sap_ds.sap.probe_update import update_probe

    grad = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    methods = {}
    for form in ("adam", "gradient"):
        cfg, st = _state([f"sap.probe_update={form}"])
        update_probe(st, grad, cfg.sap)
        method = SapMethod(cfg)
        method.state = st
        methods[form] = method
    saved = {form: m.state_dict() for form, m in methods.items()}
    assert not [k for k in saved["gradient"]["tensors"] if k.startswith("sap.opt.")]
    assert {"sap.opt.exp_avg", "sap.opt.exp_avg_sq", "sap.opt.step"} <= set(saved["adam"]["tensors"])
    meta = {**saved["adam"]["meta"], "step": 1}
    methods["gradient"].load_state_dict({"tensors": saved["adam"]["tensors"], "meta": meta}, resharded=False)
    assert torch.equal(methods["gradient"].state.probe.vectors.detach(), saved["adam"]["tensors"]["sap.probe"])
    _, fresh = _state(["sap.probe_update=adam"])
    methods["adam"].state = fresh
    methods["adam"].load_state_dict({"tensors": saved["gradient"]["tensors"], "meta": meta}, resharded=False)
    assert fresh.probe_optimizer.state == {} and torch.equal(fresh.probe.vectors.detach(), saved["gradient"]["tensors"]["sap.probe"])


# --------------------------------------------------------------------------- probe on k micro-batches


def test_probe_micro_batches_is_checked_against_grad_accum():
    """sap.probe_micro_batches k: at most the step's train.grad_accum micro-batches (the
    error names both keys and the valid range); the FLOPs model's weight is k / grad_accum
    of a whole-batch probe pass, times 2 under same_step."""
    msg = _error(["method=sap", "train.grad_accum=2", "sap.probe_micro_batches=3"])
    assert "sap.probe_micro_batches 3" in msg and "train.grad_accum 2" in msg and "1..2" in msg
    assert "greater than 0" in _error(["method=sap", "sap.probe_micro_batches=0"])
    cfg = load_config(TINY, ["method=sap", "train.grad_accum=4", "sap.probe_micro_batches=1"])
    assert cfg.sap.probed_micro_batches(4) == 1 and cfg.sap.probe_share(4) == 0.25
    assert load_config(TINY, ["method=sap", "train.grad_accum=4"]).sap.probe_share(4) == 1.0
    paper = load_config(TINY, [*PAPER, "train.grad_accum=4", "sap.probe_micro_batches=2"])
    assert paper.sap.probe_share(4) == 1.0  # two passes on half the micro-batches
    assert "probe_micro_batches" in load_config(TINY, ["method=sap", "sap.probe_train=false",
                                                       "sap.probe_init=random"]).sap.unused_keys()


def test_plan_counts_the_probe_on_k_micro_batches():
    """plan --probe-micro-batches k: the probe passes' compute and gathers are k / grad_accum
    of probing every micro-batch; SFT's column and the safety pass do not change."""
    from sap_ds.cost import model_spec
    from sap_ds.cost import plan as P

    common = dict(model="llama2-7b", nodes=2, gpus_per_node=8, seq_len=1024, micro_batch=2, grad_accum=4)
    every, one = P.plan(P.PlanInputs(**common)), P.plan(P.PlanInputs(**common, probe_micro_batches=1))
    sft_flops = every.sft.flops_per_step_per_gpu
    assert one.sft == every.sft
    # the probe part of the step (SAP minus SFT minus the safety pass) shrinks to a quarter
    safety = P.plan(P.PlanInputs(**common, probe_fraction=1e-9)).sap.flops_per_step_per_gpu - sft_flops
    assert one.sap.flops_per_step_per_gpu - sft_flops - safety == pytest.approx(
        (every.sap.flops_per_step_per_gpu - sft_flops - safety) / 4, rel=1e-6)
    assert one.sap_over_sft_throughput > every.sap_over_sft_throughput
    with pytest.raises(model_spec.PlanError, match="--probe-micro-batches 5"):
        P.plan(P.PlanInputs(**common, probe_micro_batches=5))
