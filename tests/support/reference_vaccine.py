"""Plain-PyTorch, single-process Vaccine: the independent reference for method vaccine.

Written from the authors' code, git-disl/Vaccine at commit 8937f68 (2024-11-17):
``VaccineTrainer.training_step`` (trainer.py:54-89) and its helpers (L92-181) on the HF
Trainer, which after ``training_step`` clips the gradient to ``max_grad_norm`` (1.0 by
default; no script changes it) and steps AdamW and the scheduler. The mechanism is theirs,
not sap-ds's: a (deprecated, non-full) ``register_backward_hook`` stores ``grad_output[0]``
during a full backward of the first pass, and the second pass's forward hook writes
``output[0].data = output[0] + perturbation``. No DeepSpeed and none of sap-ds's training
code: only its data pipeline (tested on its own), the batch order and the LR schedule.

Data parallelism as tests/support/reference.py reproduces it: the whole global batch of
every step is seen here; rank r's slices are the ones the trainer gives that rank, each
loss is a token mean over its micro-batch, and the second passes' gradients are averaged
over ranks and micro-batches. The perturbation of each micro-batch is its own, as on one of
the authors' devices.

Where this follows sap-ds rather than the authors (each listed in docs/alignment_defences.md):
* with grad_accum > 1 or several ranks the first pass's weight gradients are dropped without
  dropping those of earlier micro-batches (the authors' ``model.zero_grad()``, L85, would
  wipe them; every authors' script runs one GPU with gradient_accumulation_steps 1);
* ``vaccine.modules: decoder_layer`` hooks the decoder blocks instead of the attention
  modules (the authors' ``get_leaf_modules_with_grad``, L36-50, picks LlamaAttention); a
  block returns a tensor, not a tuple, so the hook perturbs the tensor itself.
"""
from __future__ import annotations

import torch

from tests.support.reference import _ce, _micro_batch, finish_step, reference_setup, trained_params


def _loss(model, batch):
    """``self.compute_loss(model, inputs)`` (L65): the HF causal-LM loss, a token mean of the
    next-token cross-entropy over the labelled (response) tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _ce(logits, batch["labels"])


def _modules(model, which):
    """``get_leaf_modules_with_grad`` (L36-50): every LlamaAttention (``attention``); the
    decoder blocks for ``decoder_layer``."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

    kind = LlamaAttention if which == "attention" else LlamaDecoderLayer
    return [m for m in model.modules() if isinstance(m, kind)]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def run_vaccine_reference(cfg, world: int, steps: int) -> dict:
    tok, data, model, params, opt, sched = reference_setup(cfg, steps, need_safety=False)
    t, rho = cfg.train, cfg.vaccine.rho
    mb, gas = t.micro_batch_size, t.grad_accum
    gb = mb * gas * world
    pad = tok.pad_token_id
    layers = _modules(model, cfg.vaccine.modules)
    losses, unperturbed, norms = [], [], []

    from sap_ds.data import global_batch_indices

    for step in range(steps):
        idx = global_batch_indices(len(data.train), gb, step, cfg.seed, cfg.data.shuffle)
        micro = [[_micro_batch(data, idx[r * mb * gas + m * mb : r * mb * gas + (m + 1) * mb], pad) for m in range(gas)]
                 for r in range(world)]
        opt.zero_grad(set_to_none=True)
        step_losses, step_unperturbed, step_norms = [], [], []
        for r in range(world):
            for batch in micro[r]:
                kept = [None if p.grad is None else p.grad.clone() for p in params]
                # pre_first_step (L92-106): a backward hook per module storing grad_output[0] / GA (L95)
                gradient = {}

                def track_gradient_hook(module, grad_input, grad_output):
                    gradient[module] = grad_output[0].detach().clone() / gas

                hooks = [m.register_backward_hook(track_gradient_hook) for m in layers]
                loss = _loss(model, batch)  # step() (L59-77): compute_loss, then backward
                loss.backward()
                step_unperturbed.append(loss.item())
                # after_first_step (L137-153): hooks off, one norm over all modules (_grad_norm, L168-181),
                # e_r = grad * rho / (grad_norm + 1e-7)
                for h in hooks:
                    h.remove()
                with torch.no_grad():
                    grad_norm = torch.norm(torch.stack([gradient[m].norm(p=2) for m in layers]), p=2)
                    perturbation = {m: gradient[m] * (rho / (grad_norm + 1e-7)) for m in layers}
                step_norms.append(grad_norm.item())
                # model.zero_grad() (L85): the first pass's weight gradients are discarded (here only
                # theirs: the earlier micro-batches' are kept, see the module docstring)
                for p, g in zip(params, kept):
                    p.grad = g

                # pre_second_step (L110-134): output[0].data = output[0] + perturbation (L118)
                def purturbation_hook(module, inputs, output):
                    _first(output).data = _first(output) + perturbation[module]
                    return output

                hooks = [m.register_forward_hook(purturbation_hook) for m in layers]
                loss2 = _loss(model, batch)  # the second step() (L86-87)
                (loss2 / (world * gas)).backward()
                for h in hooks:  # after_second_step (L156-163)
                    h.remove()
                step_losses.append(loss2.item())
        # HF Trainer after training_step: clip to max_grad_norm, optimizer.step(), lr_scheduler.step()
        finish_step(params, opt, sched, t.grad_clip)
        losses.append(step_losses)
        unperturbed.append(step_unperturbed)
        norms.append(step_norms)
    return {"params": trained_params(model, params), "losses": losses,
            "unperturbed_losses": unperturbed, "grad_norms": norms}
