"""Plain-PyTorch, single-process Booster: the independent reference for method booster.

Written from the authors' code, git-disl/Booster at commit 6421918 (2024-09-14):
``BoosterAlignmentTrainer.training_step`` (trainer.py:272-389) on the HF Trainer, which after
``training_step`` clips the gradient to ``max_grad_norm`` (1.0 by default; no script
changes it) and steps AdamW and the scheduler. No DeepSpeed and none of sap-ds's training
code: only its data pipeline (tested on its own), the batch order and the LR schedule.

Data parallelism as tests/support/reference.py reproduces it: the whole global batch of
every step is seen here; rank r's slices are the ones the trainer gives that rank, each
loss is a token mean over its batch, and gradients are averaged over ranks (and over the
micro-batches of the alignment batch).

Where this follows sap-ds rather than the authors (each listed in docs/alignment_defences.md):
* the weights are restored by copying the saved values back, not by adding the step back
  (trainer.py:316-319), which in bf16 is not exact;
* the harmful batch is one per optimizer step, ``booster.harmful_batch_size`` per rank, drawn
  in an order of its own (seed + 17) from the harmful responses of data.safety (the authors:
  a RandomSampler over their harmful set, batch 10, trainer.py:146-180);
* with grad_accum > 1 the alignment gradient is the mean over the micro-batches (the
  authors' ``model.zero_grad()`` calls, trainer.py:291 and 313, would wipe the micro-batches
  already accumulated; every authors' script runs gradient_accumulation_steps 1).
"""
from __future__ import annotations

import torch

from sap_ds.data import collate, global_batch_indices
from tests.support.reference import _ce, _micro_batch, finish_step, reference_setup, trained_params

HARMFUL_SEED_OFFSET = 17  # the harmful batches' order (sap_ds/methods/booster.py), not part of the algorithm


def _loss(model, batch):
    """``self.compute_loss(model, inputs)``: the HF causal-LM loss, a token mean of the
    next-token cross-entropy over the labelled (response) tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _ce(logits, batch["labels"])


def _grad_norm(grads):
    """``BoosterAlignmentTrainer._grad_norm`` (trainer.py:257-270): the 2-norm of the stack of
    every tensor's 2-norm, i.e. the global norm over all trainable parameters."""
    return torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)


def run_booster_reference(cfg, world: int, steps: int) -> dict:
    tok, data, model, params, opt, sched = reference_setup(cfg, steps, need_safety=True)
    t, b = cfg.train, cfg.booster
    mb, gas = t.micro_batch_size, t.grad_accum
    gb, hb = mb * gas * world, b.harmful_batch_size
    pad = tok.pad_token_id
    losses, harmful_losses = [], []

    def harmful_gradient(batches):
        """Forward/backward of the harmful loss (trainer.py:282-288), averaged over the ranks;
        then ``stored_grads = {... param.grad.data.clone()}`` (L290 / L310) and
        ``model.zero_grad()`` (L291 / L313)."""
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            loss = _loss(model, batch)
            (loss / world).backward()
            total += loss.item() / world
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        opt.zero_grad(set_to_none=True)
        return grads, total

    for step in range(steps):
        idx = global_batch_indices(len(data.train), gb, step, cfg.seed, cfg.data.shuffle)
        micro = [[_micro_batch(data, idx[r * mb * gas + m * mb : r * mb * gas + (m + 1) * mb], pad) for m in range(gas)]
                 for r in range(world)]
        step_harmful = []
        if b.lamb > 0:
            # trainer.py:278: harmful_inputs = self.sample_from_harmful(), one batch per training_step
            hidx = global_batch_indices(len(data.safety), hb * world, step, cfg.seed + HARMFUL_SEED_OFFSET)
            harmful = [collate([data.safety[i].harmful for i in hidx[r * hb : (r + 1) * hb]], pad) for r in range(world)]
            stored_grads, loss = harmful_gradient(harmful)  # L282-291
            step_harmful.append(loss)
            with torch.no_grad():
                grad_norm = _grad_norm(stored_grads) + 1e-7  # L294-295
            saved = [p.detach().clone() for p in params]  # (sap-ds restores by copy; the authors add back)
            with torch.no_grad():
                for p, g in zip(params, stored_grads):  # L297-300: param.data -= alpha * stored_grads / grad_norm
                    p.data -= b.alpha * g / grad_norm
            perturb_grads, loss2 = harmful_gradient(harmful)  # L303-313
            step_harmful.append(loss2)
            with torch.no_grad():
                for p, w in zip(params, saved):  # L316-319 (the authors: param.data += alpha * stored / norm)
                    p.copy_(w)
        # L364-370: the alignment loss on the Trainer's batch (here: the mean over ranks and micro-batches)
        opt.zero_grad(set_to_none=True)
        step_losses = []
        for r in range(world):
            for batch in micro[r]:
                loss3 = _loss(model, batch)
                (loss3 / (world * gas)).backward()
                step_losses.append(loss3.item())
        if b.lamb > 0:
            for p, s, q in zip(params, stored_grads, perturb_grads):  # L373-375
                p.grad.data = p.grad.data + b.lamb * s - b.lamb * q
        # HF Trainer after training_step: clip to max_grad_norm, optimizer.step(), lr_scheduler.step()
        finish_step(params, opt, sched, t.grad_clip)
        losses.append(step_losses)
        harmful_losses.append(step_harmful)
    return {"params": trained_params(model, params), "losses": losses,
            "harmful_losses": harmful_losses}
