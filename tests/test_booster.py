"""Booster's config, its check before step 1 and what the tools read of it, without a launch
(its 2-rank run against the authors' algorithm: tests/test_booster_reference.py)."""
from __future__ import annotations

import logging
import re
import types
from pathlib import Path

import pytest
import torch

from sap_ds.config.run import config_to_dict, load_config
from sap_ds.errors import ConfigError
from tests.support.repo import REPO

TINY = REPO / "configs/tiny.yaml"


def test_defaults_are_the_authors():
    """lamb 5, alpha 0.1 (script/alignment/smooth_align.sh:14-15), harmful batch 10 (trainer.py:149)."""
    b = load_config(TINY, ["method=booster"]).booster
    assert (b.lamb, b.alpha, b.harmful_batch_size) == (5.0, 0.1, 10)


def test_missing_harmful_set_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"method 'booster' needs a harmful set: set data.safety"):
        load_config(TINY, ["method=booster", "data.safety=[]"])
    assert not load_config(TINY, ["method=booster", "data.safety=[]", "booster.lamb=0"]).data.safety  # plain SFT


@pytest.mark.parametrize("key,value", [("booster.alpha", "-0.1"), ("booster.lamb", "-1"),
                                       ("booster.harmful_batch_size", "0")])
def test_out_of_range_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(TINY, ["method=booster", f"{key}={value}"])


def _shards(n: int = 200_000, seed: int = 0):
    """One flat group of ``n`` bf16 working weights ~ N(0, 0.02) with their fp32 master (a
    ZeRO-3 rank's shard as check_alpha reads it), and a dense harmful gradient."""
    gen = torch.Generator().manual_seed(seed)
    master = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16).float()
    group = types.SimpleNamespace(master=master, lp=master.to(torch.bfloat16))
    return types.SimpleNamespace(groups=[group], trainable_numel=n), torch.randn(n, generator=gen)


def _method_with_direction(overrides, shards, grad):
    from sap_ds.methods.booster import BoosterMethod
    from sap_ds.sap.step import SapState

    method = BoosterMethod(load_config(TINY, ["method=booster", *overrides]))
    method.buffers = SapState(probe=None, probe_optimizer=None, direction=[grad.clone()], scale=torch.zeros(()))
    method._set_scale(grad.double().square().sum(), method.cfg.booster.alpha)
    return method


def test_alpha_the_bf16_weights_cannot_hold_is_an_error_naming_the_key():
    """alpha 1e-4 spread over 200k weights of ~0.02 is ~2e-7 per element, far below half a
    bf16 ulp (~4e-5): cast(W - alpha g/||g||) = cast(W), so the second harmful pass would run
    at W. The error names booster.alpha and an alpha that passes, and that alpha does pass."""
    from sap_ds.methods.booster import check_alpha

    shards, grad = _shards()
    method = _method_with_direction(["booster.alpha=1e-4"], shards, grad)
    with pytest.raises(ConfigError, match=r"booster.alpha=0.0001 is below what the bf16 working weights can represent"
                                          r".*the smallest booster.alpha that meets it on these weights is about") as err:
        check_alpha(shards, method.buffers, method.cfg.booster, "bf16")
    suggested = float(re.search(r"is about ([0-9.e+-]+?)\.? Set", str(err.value)).group(1))
    assert 1e-4 < suggested < 10
    ok = _method_with_direction([f"booster.alpha={suggested}"], shards, grad)
    assert check_alpha(shards, ok.buffers, ok.cfg.booster, "bf16").ok


def test_authors_alpha_on_held_weights_passes_and_warn_only_warns(caplog):
    from sap_ds.methods.booster import check_alpha

    shards, grad = _shards()
    method = _method_with_direction(["booster.alpha=1.0"], shards, grad)
    assert check_alpha(shards, method.buffers, method.cfg.booster, "bf16").ok
    weak = _method_with_direction(["booster.alpha=1e-4", "booster.resolution_check=warn"], shards, grad)
    with caplog.at_level(logging.WARNING, logger="sap_ds"):
        measured = check_alpha(shards, weak.buffers, weak.cfg.booster, "bf16")
    assert not measured.ok and "booster.alpha=0.0001" in caplog.text


def test_the_scale_is_the_authors_and_a_nan_gradient_perturbs_nothing():
    """scale = -alpha / (||g|| + 1e-7) (trainer.py:295-300); a non-finite ||g|| gives 0 and no NaN in d."""
    shards, grad = _shards(1000)
    method = _method_with_direction(["booster.alpha=0.1"], shards, grad)
    assert method.buffers.scale.item() == pytest.approx(-0.1 / (grad.double().norm().item() + 1e-7), rel=1e-6)
    method.buffers.direction[0][3] = float("nan")
    ok = method._set_scale(torch.tensor(float("nan"), dtype=torch.float64), 0.1)
    assert not ok and method.buffers.scale.item() == 0 and torch.isfinite(method.buffers.direction[0]).all()


def test_lamb_zero_is_sft():
    from sap_ds.methods import build_method

    method = build_method(load_config(TINY, ["method=booster", "booster.lamb=0"]))
    assert not method.needs_safety and not method.active and method.nominal_passes() is None
    assert load_config(TINY, ["method=booster", "booster.lamb=0"]).booster.relative_step_cost == 1.0


def test_bench_and_compare_pick_booster_up_from_the_registry():
    """sap-ds bench times every registered method by default; compare orders it as ~3 SFT
    steps; its FLOPs are SFT's plus two training passes on the harmful batch: on harmful
    batches as long as the task batch, a third of SFT's throughput in full fine-tuning."""
    from sap_ds.cost import flops
    from sap_ds.cost.model_spec import ModelSpec
    from sap_ds.experiments.bench_runs import BenchSection
    from sap_ds.methods import build_method

    variants = {v.name: v.overrides for v in BenchSection().variants}
    assert variants["booster"] == ["method=booster"]
    cfg = load_config(TINY, ["method=booster"])
    assert cfg.booster.relative_step_cost == 3.0
    nominal = build_method(cfg).nominal_passes()
    assert (nominal.safety, nominal.probe) == (2.0, 0.0)
    spec = ModelSpec(name="t", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=256, vocab_size=1000)
    lengths = [50, 70]
    ratio = flops.ideal_ratio(flops.FlopsModel(spec), lengths, lengths, safety=nominal.safety, probe=nominal.probe)
    assert ratio == pytest.approx(1 / 3)


def test_booster_refuses_the_engine_settings_sap_refuses():
    from sap_ds.config.methods import BoosterConfig

    with pytest.raises(ConfigError, match="which method booster cannot honour: ZeRO\\+\\+ hpZ.*second harmful pass"):
        BoosterConfig().check_engine({"zero_hpz_partition_size": 8}, [], Path("ds.json"))
    BoosterConfig(lamb=0).check_engine({"zero_hpz_partition_size": 8}, [], Path("ds.json"))  # SFT's step


def test_booster_keys_do_not_change_other_methods_runs():
    """A run saved before the booster section existed is the same run of another method; for a
    Booster run a changed booster key is a change."""
    from sap_ds.config.run import config_changes

    for method in ("sft", "sap", "lisa"):
        cfg = load_config(TINY, [f"method={method}"])
        saved = config_to_dict(cfg)
        assert config_changes({k: v for k, v in saved.items() if k != "booster"}, cfg) == []
        assert config_changes(saved, load_config(TINY, [f"method={method}", "booster.alpha=0.5"])) == []
    cfg = load_config(TINY, ["method=booster"])
    saved = config_to_dict(load_config(TINY, ["method=booster", "booster.alpha=0.5"]))
    assert config_changes(saved, cfg) == ["booster.alpha: 0.5 → 0.1"]


def test_example_config_loads():
    cfg = load_config(REPO / "configs/booster_align.yaml")
    assert cfg.method == "booster" and cfg.data.safety and cfg.booster.lamb == 5.0 and cfg.booster.alpha == 0.1
