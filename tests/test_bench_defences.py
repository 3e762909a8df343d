"""sap-ds bench and the alignment-stage defences Vaccine and RepNoise, without a launch: the
bench picks them up from the method registry (as it does Booster: tests/test_booster.py),
configs/bench_cpu.yaml's variants of them validate, and the FLOPs the bench divides by are
what their steps compute (sap_ds/cost/flops.py)."""
from __future__ import annotations

import pytest

from sap_ds.config.run import load_config
from sap_ds.cost import flops
from sap_ds.cost.model_spec import ModelSpec
from sap_ds.methods.base import ExtraPasses
from tests.support.repo import REPO

TINY = REPO / "configs/tiny.yaml"
SPEC = ModelSpec(name="t", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=256, vocab_size=1000)


def test_bench_times_vaccine_and_repnoise_by_default_and_in_the_cpu_config():
    """A bench config without variants times every registered method; configs/bench_cpu.yaml
    lists Booster, Vaccine and RepNoise, and each variant builds a valid run config (the
    bench checks them all before any rank starts)."""
    from sap_ds.experiments.bench_runs import BenchSection, load_bench_config

    variants = {v.name: v.overrides for v in BenchSection().variants}
    assert variants["vaccine"] == ["method=vaccine"] and variants["repnoise"] == ["method=repnoise"]
    bench, _, _ = load_bench_config(str(REPO / "configs/bench_cpu.yaml"), [])
    methods = {v.name: v.overrides[0] for v in bench.variants}
    assert {methods[n] for n in ("booster", "vaccine", "repnoise")} == {"method=booster", "method=vaccine", "method=repnoise"}


def test_vaccine_bench_flops_add_a_forward_and_an_activation_backward_to_layer_0():
    """Vaccine's first pass is SAP's probe pass with the probe at block 0: a forward and an
    activation-only backward over the same batch, every step; compare orders it as 2 SFT steps."""
    from sap_ds.methods import build_method

    cfg = load_config(TINY, ["method=vaccine"])
    assert cfg.vaccine.relative_step_cost == 2.0
    nominal = build_method(cfg).nominal_passes()
    assert (nominal.safety, nominal.probe, nominal.probe_passes, nominal.lowest_probe_layer) == (0.0, 1.0, 1.0, 0)
    fm, lengths = flops.FlopsModel(SPEC), [50, 70]
    sft = fm.step(lengths).total
    step = fm.step(lengths, probe=nominal.probe, lowest_probe_layer=0, probe_passes=nominal.probe_passes).total
    assert step == sft + fm.forward(lengths) + fm.probe_backward(lengths, 0)
    assert 1 / 2 < sft / step < 3 / 4  # 3F over 3F + F + (a little under F)


def test_repnoise_bench_counts_its_pairs_as_an_sft_step():
    """RepNoise's step is one forward and backward over its pairs plus the logit lens
    (extra_passes, below; nominal_passes None: the lens depends on the lengths); the bench
    counts its pairs' tokens as what it trained on (trains_on 'alignment', so its
    task_tokens_per_s is 0: read tokens_per_s)."""
    from sap_ds.methods import build_method

    cfg = load_config(TINY, ["method=repnoise", "train.max_steps=4"])
    method = build_method(cfg)
    assert method.nominal_passes() is None and method.trains_on(0) == "alignment"
    assert cfg.repnoise.relative_step_cost == pytest.approx(3.0)


def test_repnoise_flops_add_its_logit_lens_on_the_harmful_sides():
    """The lens: each of the L + 1 hidden states of every harmful side through the LM head, a
    forward (H per token) and a backward (H with LoRA, 2H in full fine-tuning), counted from
    the step's own pairs; none with alpha 0. Checked against the count written out by hand."""
    from types import SimpleNamespace

    from sap_ds.methods import build_method

    cfg = load_config(TINY, ["method=repnoise", "train.max_steps=4"])
    method = build_method(cfg)
    method.mlps = [object()] * SPEC.num_hidden_layers
    pair = lambda safe, harmful: SimpleNamespace(safe=SimpleNamespace(input_ids=[0] * safe),  # noqa: E731
                                                 harmful=SimpleNamespace(input_ids=[0] * harmful))
    trainer = SimpleNamespace(data=SimpleNamespace(safety=[pair(10 + i, 20 + 3 * i) for i in range(8)]), global_batch=4)
    extra = method.extra_passes(trainer, 1)
    harmful = [len(trainer.data.safety[i].harmful.input_ids) for i in method.pair_indices(trainer, 1)]
    assert extra.lens_states == SPEC.num_hidden_layers + 1 and sorted(extra.lens_lengths) == sorted(harmful)
    lengths = method.trained_lengths(trainer, 1)
    head = 2 * SPEC.vocab_size * SPEC.hidden_size
    for fm, backward in ((flops.FlopsModel(SPEC), 2), (flops.FlopsModel(SPEC, 4, ("q_proj",)), 1)):
        step = fm.step(lengths, lens_lengths=extra.lens_lengths, lens_states=extra.lens_states)
        lens = (SPEC.num_hidden_layers + 1) * sum(harmful) * head
        assert step.parts["lens_forward"] == lens and step.parts["lens_backward"] == backward * lens
        assert step.total == fm.step(lengths).total + (1 + backward) * lens
    off = build_method(load_config(TINY, ["method=repnoise", "train.max_steps=4", "repnoise.alpha=0"]))
    assert off.extra_passes(trainer, 1) == ExtraPasses()
