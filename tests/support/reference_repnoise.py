"""Plain-PyTorch, single-process RepNoise: the independent reference for method repnoise.

Written from the authors' code, domenicrosati/representation-noising at commit 03689ff
(2024-12-12): ``rep_noise_loss``, ``MMD_loss`` and ``masked_token_ce_loss`` in
representation_noising/loss.py, transcribed below with their line numbers; the loop is the
demo notebook's (notebooks/repnoise_demo.ipynb cell 15: ``loss = rep_noise_loss(model,
harmful_batch, harmless_batch)``, ``loss.backward()``, AdamW, scheduler). No DeepSpeed and
none of sap-ds's training code: only its data pipeline (tested on its own), the batch order,
the noise seeds and the LR schedule.

Data parallelism as tests/support/reference.py reproduces it: the whole global batch of pairs
of every step is seen here; rank r's micro-batches are the ones the trainer gives that rank,
each gets the authors' loss, and gradients are averaged over ranks and micro-batches, then
clipped to train.grad_clip (sap-ds's; the notebook does not clip).

Where this follows sap-ds rather than the authors (each listed in docs/alignment_defences.md):
* the two sides of a micro-batch are padded to one width by ``collate_pairs`` (the authors:
  padding="max_length" 256, datasets.py:386-392, 434-440), and the pairs' order is sap-ds's
  (seed + 19; the authors: unshuffled loaders zipped, datasets.py:542-543);
* the Gaussian noise comes from a generator seeded per (seed, step, rank, micro-batch) and
  is drawn in fp32 (the authors: ``torch.randn_like(hiddens)``, the global RNG, the hidden
  states' dtype, loss.py:98);
* the hooks are removed after the forward (the authors' are never removed, loss.py:7-14);
* the CE is taken on fp32 logits (the authors: the model's dtype; these runs are fp32).
"""
from __future__ import annotations

import torch
from torch import nn

from sap_ds.data import collate_pairs, global_batch_indices
from sap_ds.methods.repnoise import PAIR_SEED_OFFSET, noise_seed
from tests.support.reference import finish_step, reference_setup, trained_params


def register_activation_hook(model, wanted):
    """loss.py:7-14, restricted to the modules whose names end in ``wanted`` (the authors hook
    every module and read back 'model.layers.{i}.mlp'; under peft the names gain a prefix);
    returns the dict and the handles (removed after the forward)."""
    activations, handles = {}, []
    for name, module in model.named_modules():
        suffix = next((w for w in wanted if name == w or name.endswith("." + w)), None)
        if suffix is None:
            continue

        def _hook(_module, __, val, key=suffix):
            activations[key] = val
        handles.append(module.register_forward_hook(_hook))
    return activations, handles


class MMD_loss(nn.Module):  # loss.py:17-49, verbatim but for the dtype (fp32 here)
    def __init__(self, kernel_mul=2.0, kernel_num=5):
        super().__init__()
        self.kernel_num = kernel_num
        self.kernel_mul = kernel_mul
        self.fix_sigma = None

    def guassian_kernel(self, source, target, kernel_mul=2.0, kernel_num=5, fix_sigma=None):
        n_samples = int(source.size()[0]) + int(target.size()[0])
        total = torch.cat([source, target], dim=0)
        total0 = total.unsqueeze(0).expand(int(total.size(0)), int(total.size(0)), int(total.size(1)))  # L29
        total1 = total.unsqueeze(1).expand(int(total.size(0)), int(total.size(0)), int(total.size(1)))  # L30
        L2_distance = ((total0 - total1) ** 2).sum(2)  # L31
        bandwidth = torch.sum(L2_distance.data) / (n_samples ** 2 - n_samples)  # L35
        bandwidth /= kernel_mul ** (kernel_num // 2)  # L36
        bandwidth_list = [bandwidth * (kernel_mul ** i) for i in range(kernel_num)]  # L37
        kernel_val = [torch.exp(-L2_distance / bandwidth_temp) for bandwidth_temp in bandwidth_list]  # L38
        return sum(kernel_val)

    def forward(self, source, target):
        batch_size = int(source.size()[0])
        kernels = self.guassian_kernel(source, target, kernel_mul=self.kernel_mul, kernel_num=self.kernel_num)
        XX = kernels[:batch_size, :batch_size]
        YY = kernels[batch_size:, batch_size:]
        XY = kernels[:batch_size, batch_size:]
        YX = kernels[batch_size:, :batch_size]
        return torch.mean(XX + YY - XY - YX)  # L48


def masked_token_ce_loss(logits, labels, mask):  # loss.py:52-71
    shift_logits = logits[..., :-1, :].contiguous().float()  # L58 (fp32 here)
    shift_labels = labels[..., 1:].contiguous()  # L59
    shift_logit_mask = mask[..., :-1].contiguous()  # L62
    expanded_mask = shift_logit_mask.unsqueeze(-1).expand(-1, -1, shift_logits.size(-1))  # L63
    shift_label_mask = mask[..., 1:].contiguous()  # L64
    shift_logits = shift_logits * expanded_mask  # L65
    shift_labels = shift_labels * shift_label_mask  # L66
    shift_labels[shift_labels == 0] = -100  # L67
    shift_labels = shift_labels.type(torch.LongTensor)  # L68
    loss_fct = torch.nn.CrossEntropyLoss()  # L69
    return loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))  # L70


def rep_noise_loss(model, harmful_batch, harmless_batch, beta, alpha, kernel_mul, kernel_num, generator, n_layers):
    """loss.py:74-130 (the decoder found as ``model.base_model.layers`` there: ``n_layers``)."""
    mmd_loss = MMD_loss(kernel_mul, kernel_num)  # L87
    activations, handles = register_activation_hook(model, [f"model.layers.{i}.mlp" for i in range(n_layers)])  # L88
    harmful_outputs = model(harmful_batch["input_ids"], attention_mask=harmful_batch["attention_mask"],
                            output_hidden_states=True)  # L89
    for h in handles:
        h.remove()
    harmful_activations = [activations[f"model.layers.{i}.mlp"] for i in range(n_layers)]  # L90-92
    mask = ~torch.eq(harmful_batch["input_ids"], harmless_batch["input_ids"])  # L93
    noise_loss = 0
    for hidden in harmful_activations:  # L95-99
        hiddens_mask = mask.unsqueeze(-1).expand(hidden.size())
        hiddens = hidden.float() * hiddens_mask
        gaussian = torch.randn(hiddens.shape, generator=generator, dtype=torch.float32) * hiddens_mask  # L98
        noise_loss += mmd_loss(hiddens.view(hiddens.size(0), -1), gaussian.view(gaussian.size(0), -1))
    noise_loss /= len(harmful_activations)  # L100

    mask = mask.float()  # L102
    harmful_outputs_loss = masked_token_ce_loss(harmful_outputs.logits, harmful_batch["input_ids"], mask)  # L103-107
    harmless_outputs = model(harmless_batch["input_ids"], attention_mask=harmless_batch["attention_mask"],
                             output_hidden_states=True)  # L108
    harmless_outputs_loss = masked_token_ce_loss(harmless_outputs.logits, harmless_batch["input_ids"], mask)  # L109-113
    harmless_losses = harmless_outputs_loss  # L115

    output_embeddings = model.get_output_embeddings()  # L117
    norm = model.base_model.norm if hasattr(model.base_model, "norm") else model.get_decoder().norm  # L118

    harmful_losses = harmful_outputs_loss  # L120
    for h in harmful_outputs.hidden_states:  # L121-127
        out = output_embeddings(norm(h))
        harmful_losses = harmful_losses + masked_token_ce_loss(out, harmful_batch["input_ids"], mask)
    harmful_losses = harmful_losses / len(harmful_outputs.hidden_states) + 1  # L128
    return harmless_losses + beta * noise_loss - alpha * torch.log(harmful_losses)  # L129


def run_repnoise_reference(cfg, world: int, steps: int) -> dict:
    tok, data, model, params, opt, sched = reference_setup(cfg, steps, need_safety=True)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # the CausalLM the authors call
    n_layers = hf.config.num_hidden_layers
    t, c = cfg.train, cfg.repnoise
    mb, gas = t.micro_batch_size, t.grad_accum
    gb = mb * gas * world
    pad = tok.pad_token_id
    losses = []
    for step in range(steps):
        idx = global_batch_indices(len(data.safety), gb, step, cfg.seed + PAIR_SEED_OFFSET)
        opt.zero_grad(set_to_none=True)
        step_losses = []
        for r in range(world):
            for m in range(gas):
                mine = idx[r * mb * gas + m * mb : r * mb * gas + (m + 1) * mb]
                both = collate_pairs([data.safety[i] for i in mine], pad)  # one width for both sides
                harmless = {k: v[:mb] for k, v in both.items()}
                harmful = {k: v[mb:] for k, v in both.items()}
                gen = torch.Generator().manual_seed(noise_seed(cfg.seed, step, r, m))
                loss = rep_noise_loss(hf, harmful, harmless, c.beta, c.alpha, c.kernel_mul, c.kernel_num, gen, n_layers)
                (loss / (world * gas)).backward()
                step_losses.append(loss.item())
        finish_step(params, opt, sched, t.grad_clip)
        losses.append(step_losses)
    return {"params": trained_params(model, params), "losses": losses}
