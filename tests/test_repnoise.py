"""RepNoise's config, its data demands and its loss against the authors' code, without a
launch (its 2-rank ZeRO-3 runs against the reference: tests/test_zero3_reference.py,
``test_zero3_repnoise_matches_reference``)."""
from __future__ import annotations

import types

import pytest
import torch

from sap_ds.config.run import load_config
from sap_ds.data import build_run_data, collate_pairs
from sap_ds.errors import ConfigError, DataError
from sap_ds.methods import METHODS
from sap_ds.methods.repnoise import RepNoiseMethod, masked_token_ce, mmd, noise_seed
from sap_ds.model.loading import load_model, resolve_model_path
from tests.support import reference_repnoise as ref
from tests.support.repo import REPO

TINY = REPO / "configs/tiny.yaml"


def test_defaults_are_the_authors():
    """alpha 1, beta 0.001 (loss.py:76, the demo notebook), MMD kernels 2.0 x 5 (loss.py:18)."""
    c = load_config(TINY, ["method=repnoise"]).repnoise
    assert (c.alpha, c.beta, c.kernel_mul, c.kernel_num) == (1.0, 0.001, 2.0, 5)
    assert METHODS["repnoise"] is RepNoiseMethod


def test_missing_pairs_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"method 'repnoise' trains on pairs .* set data.safety"):
        load_config(TINY, ["method=repnoise", "data.safety=[]"])


def test_epochs_without_max_steps_is_an_error_naming_the_key():
    """train.epochs counts data.train's examples, which RepNoise does not train on."""
    with pytest.raises(ConfigError, match=r"set train.max_steps"):
        load_config(TINY, ["method=repnoise", "train.max_steps=null"])


def test_safety_data_that_are_not_pairs_is_an_error_naming_the_key(tokenizer):
    """data.safety in a format without a safe and a harmful answer to one prompt fails when the
    data are built (before the model loads), naming data.safety."""
    cfg = load_config(TINY, ["method=repnoise", "data.safety=[{path: ../data/gsm8k/train.jsonl, format: gsm8k, "
                                                "limit: 4}]"])
    with pytest.raises(DataError, match=r"data.safety needs a safety format"):
        build_run_data(cfg.data, tokenizer, cfg.seed, need_safety=RepNoiseMethod(cfg).needs_safety)


@pytest.mark.parametrize("key,value", [("repnoise.alpha", "-1"), ("repnoise.beta", "-0.1"),
                                       ("repnoise.kernel_num", "0")])
def test_out_of_range_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(TINY, ["method=repnoise", f"{key}={value}"])


def test_mmd_and_masked_ce_are_the_authors():
    """The Gram-matrix MMD equals the authors' difference-tensor MMD_loss; the masked CE equals
    masked_token_ce_loss (zeroed logits, ignored label id 0 included)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 50, generator=g) * 4 + 1, torch.randn(3, 50, generator=g)
    assert mmd(x, y, 2.0, 5).item() == pytest.approx(ref.MMD_loss(2.0, 5)(x, y).item(), rel=1e-5)
    logits = torch.randn(2, 7, 11, generator=g)
    ids = torch.randint(0, 11, (2, 7), generator=g)
    ids[0, 3] = 0  # a real token id 0: the authors ignore it (loss.py:67)
    mask = torch.rand(2, 7, generator=g) > 0.3
    assert masked_token_ce(logits, ids, mask).item() == pytest.approx(
        ref.masked_token_ce_loss(logits, ids, mask.float()).item(), rel=1e-6)


def test_loss_and_gradient_equal_the_authors_rep_noise_loss(tokenizer):
    """One micro-batch of tiny-model pairs, plain PyTorch: the method's loss (one forward for
    both sides, Gram MMD, checkpointed logit lens) and its gradient against the reference's
    transcription of loss.py:74-130 (two forwards, the authors' MMD, the lens unchunked). A
    large beta and the lens's weight alpha make each term visible in the gradient."""
    cfg = load_config(TINY, ["method=repnoise", "repnoise.beta=5.0", "repnoise.alpha=2.0"])
    data = build_run_data(cfg.data, tokenizer, cfg.seed, need_safety=True)
    model = load_model(cfg.model, resolve_model_path(cfg.model))
    model.train()
    batch = collate_pairs([data.safety[i] for i in range(3)], tokenizer.pad_token_id)
    trainer = types.SimpleNamespace(engine=model, rank=1)
    method = RepNoiseMethod(cfg)
    method.setup(trainer)
    got = method.loss(trainer, 4, 1, batch)
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    harmless = {k: v[:3] for k, v in batch.items()}
    harmful = {k: v[3:] for k, v in batch.items()}
    gen = torch.Generator().manual_seed(noise_seed(cfg.seed, 4, 1, 1))
    c = cfg.repnoise
    want = ref.rep_noise_loss(model, harmful, harmless, c.beta, c.alpha, c.kernel_mul, c.kernel_num, gen,
                              model.config.num_hidden_layers)
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    stats = method.log_stats(trainer)
    assert stats["repnoise/noise_loss"] > 0 and stats["repnoise/harmful_loss"] > 0
    for (name, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)
    # each term matters: without the MMD, or without the log term, the gradient is another one
    for off in ("repnoise.beta=0", "repnoise.alpha=0"):
        other = RepNoiseMethod(load_config(TINY, ["method=repnoise", "repnoise.beta=5.0", "repnoise.alpha=2.0", off]))
        other.setup(trainer)
        grads = torch.autograd.grad(other.loss(trainer, 4, 1, batch), list(model.parameters()), allow_unused=True)
        moved = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads, want_grads)
                    if a is not None and b is not None and b.abs().max() > 0)
        assert moved > 1e-2, f"{off} changes the gradient by only {moved:.1e} of scale"


def test_bench_compare_and_plan_pick_repnoise_up(tokenizer):
    """sap-ds bench times it by default (its steps train on the pairs: both sides' tokens, the
    same count the trainer's throughput uses); compare orders it as ~3 SFT steps; sap-ds plan
    gives it its own column (tests/test_plan_defences.py computes it by hand)."""
    from sap_ds.cost import plan as P
    from sap_ds.data.packing import sequence_lengths
    from sap_ds.experiments.bench_runs import BenchSection
    from sap_ds.methods import build_method

    assert {v.name: v.overrides for v in BenchSection().variants}["repnoise"] == ["method=repnoise"]
    cfg = load_config(TINY, ["method=repnoise", "train.grad_accum=2"])
    assert cfg.repnoise.relative_step_cost == 3.0
    method = build_method(cfg)
    assert method.needs_safety and method.nominal_passes() is None and method.trains_on(5) == "alignment"
    data = build_run_data(cfg.data, tokenizer, cfg.seed, need_safety=True)
    world = 2
    lengths = []
    for rank in range(world):
        trainer = types.SimpleNamespace(data=data, rank=rank, tokenizer=tokenizer, _to_device=lambda b: b,
                                        global_batch=cfg.train.micro_batch_size * cfg.train.grad_accum * world)
        batches = method.trained_micro_batches(trainer, 3)
        assert len(batches) == 2 and all(b["input_ids"].shape[0] == 2 * cfg.train.micro_batch_size for b in batches)
        lengths += [n for b in batches for n in sequence_lengths(b)]
    assert sorted(lengths) == sorted(method.trained_lengths(trainer, 3))
    result = P.plan(P.PlanInputs(model="llama2-7b", method="repnoise"))
    assert P.headline_column(result.inputs) == "repnoise" and any(a.startswith("RepNoise: trains on pairs")
                                                                   for a in result.assumptions)
