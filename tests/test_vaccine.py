"""Vaccine (method vaccine) without a launch: its config's bad input, the check before step 1
on a bf16 model, and the perturbation of one micro-batch against the authors' mechanism
(tests/support/reference_vaccine.py's hooks). The 2-rank ZeRO-3 runs against the reference
are in tests/test_zero3_reference.py's shared launch (VACCINE_VARIANTS).
"""
from __future__ import annotations

import logging
import math
import types

import pytest
import torch

from sap_ds.config.methods import NORMAL_RANGE
from sap_ds.config.run import load_config
from sap_ds.data import build_run_data, collate
from sap_ds.errors import ConfigError
from sap_ds.methods import build_method
from sap_ds.methods.vaccine import VaccineMethod, _Hooks, perturbed_modules
from sap_ds.model.loading import load_model, resolve_model_path
from sap_ds.model.losses import forward_logits, task_loss
from tests.support.repo import REPO

TINY = REPO / "configs/tiny.yaml"


def test_normal_range_is_the_dtypes():
    """The config's table (no torch there) is each dtype's smallest normal and largest finite."""
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        assert NORMAL_RANGE[name] == (torch.finfo(dtype).tiny, torch.finfo(dtype).max)


@pytest.mark.parametrize("rho,dtype,message", [
    ("0", "bf16", "key 'vaccine.rho': Input should be greater than 0"),
    ("-1", "fp32", "key 'vaccine.rho': Input should be greater than 0"),
    ("inf", "bf16", "vaccine.rho"),
    ("nan", "fp32", "vaccine.rho"),
    ("1e-39", "bf16", r"vaccine.rho 1e-39 cannot be represented in the working dtype \(model.dtype bf16"),
    ("3.39e38", "bf16", r"vaccine.rho 3.39e\+38 cannot be represented in the working dtype \(model.dtype bf16"),
])
def test_rho_must_be_a_positive_normal_number_of_the_working_dtype(rho, dtype, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, ["method=vaccine", f"vaccine.rho={rho}", f"model.dtype={dtype}"])


def test_defaults_are_the_authors_and_other_methods_ignore_the_section():
    cfg = load_config(TINY, ["method=vaccine"])
    assert cfg.vaccine.rho == 2.0 and cfg.vaccine.modules == "attention"  # Vaccine.sh: rho 2; trainer.py:47
    assert cfg.method_section.relative_step_cost == 2.0
    load_config(TINY, ["method=sft", "vaccine.rho=1e-39"])  # not this run's method: not checked
    method = build_method(cfg)
    assert isinstance(method, VaccineMethod) and not method.needs_safety
    assert method.phases[-1] == "main" and method.nominal_passes().probe == 1.0


@pytest.fixture(scope="module")
def bf16_setup(tokenizer):
    """The tiny Llama in bf16 and a batch of two tiny.yaml examples."""
    cfg = load_config(TINY, ["method=vaccine", "model.dtype=bf16"])
    data = build_run_data(cfg.data, tokenizer, cfg.seed, need_safety=False)
    batch = collate([data.train[0], data.train[1]], tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = load_model(cfg.model, resolve_model_path(cfg.model))
    model.train()
    return model, batch


def _preflight(model, batch, overrides):
    cfg = load_config(TINY, ["method=vaccine", "model.dtype=bf16", *overrides])
    method = VaccineMethod(cfg)
    method.hooks = _Hooks(perturbed_modules(model, cfg.vaccine.modules))
    trainer = types.SimpleNamespace(engine=model, task_micro_batches=lambda step: [batch])
    try:
        method.preflight(trainer)
    finally:
        method.close()
    return method


def test_check_before_step_1_refuses_a_rho_bf16_cannot_hold(bf16_setup, caplog):
    """A rho whose eps is below half an ulp of the bf16 activations: ConfigError naming
    vaccine.rho and a rho that passes, which then passes; the authors' rho 2 passes on the
    tiny model; 'warn' logs instead, 'off' measures nothing. The model is left as found."""
    model, batch = bf16_setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=r"vaccine.rho 1e-06: the bf16 activations do not hold Vaccine's "
                                          r"perturbation .* the smallest vaccine.rho that meets it on this batch is "
                                          r"about (\S+)\.") as err:
        _preflight(model, batch, ["vaccine.rho=1e-6"])
    suggested = float(str(err.value).split("is about ")[1].split(". ")[0])
    assert 1e-6 < suggested < 2.0
    _preflight(model, batch, [f"vaccine.rho={suggested}"])
    _preflight(model, batch, [])
    with caplog.at_level(logging.WARNING, logger="sap_ds"):
        _preflight(model, batch, ["vaccine.rho=1e-6", "vaccine.resolution_check=warn"])
    assert "vaccine.rho 1e-06" in caplog.text
    _preflight(model, batch, ["vaccine.rho=1e-6", "vaccine.resolution_check='off'"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters()), "the check left weight gradients"


@pytest.mark.parametrize("modules", ["attention", "decoder_layer"])
def test_one_micro_batch_matches_the_authors_hooks(bf16_setup, modules):
    """fp32, one micro-batch: the loss at a + eps from the method's hooks (autograd.grad on the
    captured outputs, eps added in the forward) equals the loss the authors' mechanism gives
    (a backward hook storing grad_output[0], ``output[0].data = output[0] + e_r``), and the
    weight gradient through the perturbed forward is the same; rho changes the loss."""
    from tests.support.reference_vaccine import _first, _modules

    _, batch = bf16_setup
    cfg = load_config(TINY, ["method=vaccine", f"vaccine.modules={modules}"])
    torch.manual_seed(0)
    model = load_model(cfg.model, resolve_model_path(cfg.model))
    model.train()
    method = VaccineMethod(cfg)
    method.hooks = _Hooks(perturbed_modules(model, modules))
    trainer = types.SimpleNamespace(engine=model)
    method.set_perturbation(method.activation_gradient(trainer, batch, grad_accum=1))
    assert all(p.grad is None for p in model.parameters()), "the first pass computed weight gradients"
    method.hooks.mode = "perturb"
    ours = task_loss(forward_logits(model, batch), batch["labels"])
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    method.close()
    model.zero_grad(set_to_none=True)

    layers, store = _modules(model, modules), {}
    hooks = [m.register_backward_hook(lambda mod, gi, go: store.__setitem__(mod, go[0].detach().clone())) for m in layers]
    task_loss(forward_logits(model, batch), batch["labels"]).backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    norm = torch.norm(torch.stack([store[m].norm(p=2) for m in layers]), p=2)
    assert math.isclose(norm.item(), method.stats["activation_grad_norm"].item(), rel_tol=1e-5)

    def perturb(mod, inputs, output):
        _first(output).data = _first(output) + store[mod] * (cfg.vaccine.rho / (norm + 1e-7))
        return output

    hooks = [m.register_forward_hook(perturb) for m in layers]
    theirs = task_loss(forward_logits(model, batch), batch["labels"])
    theirs.backward()
    for h in hooks:
        h.remove()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    unperturbed = method.stats["loss_unperturbed"].item()
    assert ours.item() > unperturbed * (1 + 1e-3), "rho 2 did not raise the loss: the test cannot see eps"
    for ours_g, p in zip(ours_grads, model.parameters()):
        assert torch.allclose(ours_g, p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max().item())


def test_gradient_checkpointing_gives_the_same_perturbed_step(bf16_setup):
    """model.gradient_checkpointing (non-reentrant): the first pass reaches the captured outputs
    through the checkpointed blocks, and the hooks fire again in the recomputation with the same
    mode, so the perturbed loss and every weight gradient are those without checkpointing."""
    _, batch = bf16_setup
    cfg = load_config(TINY, ["method=vaccine"])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_model(cfg.model, resolve_model_path(cfg.model))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        method = VaccineMethod(cfg)
        method.hooks = _Hooks(perturbed_modules(model, "attention"))
        method.set_perturbation(method.activation_gradient(types.SimpleNamespace(engine=model), batch, grad_accum=1))
        method.hooks.mode = "perturb"
        loss = task_loss(forward_logits(model, batch), batch["labels"])
        loss.backward()
        method.close()
        results.append((loss.item(), [p.grad for p in model.parameters()]))
    (plain, plain_grads), (checkpointed, grads) = results
    assert checkpointed == pytest.approx(plain, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(plain_grads, grads))
