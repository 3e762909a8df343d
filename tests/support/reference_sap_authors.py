"""SAP as the authors' code runs it: ChengcanWu/SAP ``SAPcode/`` (``train.py``, ``utils.py``,
``model.py``), transcribed line by line into plain PyTorch, independent of ``sap_ds.sap``
and of ``tests/support/reference.py`` (which is written from docs/algorithm.md and so shares
sap-ds's reading of it). File:line citations are to that repository's ``SAPcode/``.

Kept literal on purpose: the probe is a real ``mlp.down_proj.bias`` parameter of the probe
layers (``model.py:16-18``), trained by its own AdamW; which gradients flow is decided by
toggling ``requires_grad`` (``utils.py:3-5``), so the safety forward runs with the previous
step's probe in it and only the probe's own gradient is stopped (``train.py:47-48``); the
perturbation is added and then subtracted (``utils.py:54-62``), not restored from a copy;
the probe is zeroed and then stepped (``train.py:77-78``).

What is ours, and why (each is a documented difference of sap-ds or a test setting):

- the safety loss: the authors' ``compute_contrastive_gradients`` (``train.py:6-38``) compares
  ``logits[t]`` with ``labels[t]`` (no shift) on prompt-only inputs; this uses the response
  log-probability with the one-token shift on prompt + response, sap-ds's form (docs/algorithm.md,
  "Differences from the authors' code", first row). Only the loss changes: the forward, the
  backward and what is done with the gradient are theirs;
- fp32 throughout (their ``autocast(dtype=torch.bfloat16)``, ``train.py:13,62,71``, is left
  out: the comparison is at fp32 rounding), no dropout (their LoRA dropout 0.1 draws fresh
  masks per pass, sap-ds replays them; with 0 both are the same);
- the model, its LoRA initialisation, the data and the batches are sap-ds's (``load_model``,
  ``apply_lora`` after ``torch.manual_seed(seed)``, ``build_run_data``, ``global_batch_indices``
  on one rank), so that the two runs start from the same point and see the same examples;
- the optimizers' lr, eps and the weights' weight decay come from the run config (the
  authors' ``AdamW(params, lr=...)``, ``model.py:25-28``, has torch's defaults: the caller sets
  ``train.weight_decay`` to torch's 0.01; eps is raised in the tests for the reason
  tests/test_zero3_reference.py gives). The probe's AdamW keeps torch's weight decay: it acts
  on a probe just zeroed (``train.py:77``), so it changes nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sap_ds.config.run import RunConfig
from sap_ds.data import build_run_data, collate, collate_pairs, global_batch_indices
from sap_ds.model.loading import apply_lora, load_model, load_tokenizer, resolve_model_path


# --------------------------------------------------------------------------- utils.py, literally


def set_optimizer(optimizer, requires_grad):  # utils.py:3-5
    for param in optimizer.param_groups[0]['params']:
        param.requires_grad = requires_grad


def zero_params(optimizer):  # utils.py:7-10
    for param_group in optimizer.param_groups:
        for param in param_group['params']:
            param.data.zero_()


def get_lora_grads(model):  # utils.py:12-17
    lora_grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            lora_grads[name] = param.grad
    return lora_grads


def get_lora_params(model, norm_only=False):  # utils.py:19-27
    lora_params = {}
    for name, param in model.named_parameters():
        if 'lora_A' in name.split('.') or 'lora_B' in name.split('.'):
            lora_params[name] = param.clone()
    if norm_only:
        return flatten_parameters(lora_params).norm(p=2, dim=-1, keepdim=True)
    return lora_params


def safe_normalize(vector, eps=1e-8):  # utils.py:29-31
    norm = vector.norm(p=2, dim=-1, keepdim=True)
    return vector / (norm + eps)


def flatten_parameters(params_dict, return_shape=False):  # utils.py:33-39
    shapes = {name: param.shape for name, param in params_dict.items()}
    flat_vector = torch.cat([param.flatten() for param in params_dict.values()])
    if return_shape:
        return flat_vector, shapes
    return flat_vector


def unflatten_parameters(flat_vector, shapes):  # utils.py:41-48
    params_dict = {}
    start = 0
    for name, shape in shapes.items():
        end = start + torch.prod(torch.tensor(shape)).item()
        params_dict[name] = flat_vector[start:end].reshape(shape)
        start = end
    return params_dict


def normalize_dict(paras_dict):  # utils.py:50-52
    paras_vector, shapes = flatten_parameters(paras_dict, return_shape=True)
    return unflatten_parameters(safe_normalize(paras_vector), shapes)


def merge_lora_parameters(model, updated_lora_params, update_rate):  # utils.py:54-62
    for name, param in model.named_parameters():
        if name in updated_lora_params:
            param.data.copy_(param.data + update_rate * updated_lora_params[name])


# --------------------------------------------------------------------------- train.py


def _seq_logp(logits, labels):
    """sap-ds's response log-probability (the documented difference; see the module docstring)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1)


def compute_contrastive_gradients(model, batch, temperature=1.0):  # train.py:6-38
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # train.py:14
    logits = outputs.logits
    lp = _seq_logp(logits, batch["labels"])  # train.py:18-28, in sap-ds's form: safe pairs, then harmful
    half = lp.shape[0] // 2
    log_ratio = (lp[:half] - lp[half:]) / temperature  # train.py:31
    loss = -F.logsigmoid(log_ratio).mean()  # train.py:32
    loss.backward()  # train.py:33
    with torch.inference_mode():  # train.py:35-36
        gradient = get_lora_grads(model)
    return gradient


def train_step(model, batch, safety_batch, lora_optimizer, bias_optimizer, grad_rate):  # train.py:45-80, one batch
    set_optimizer(bias_optimizer, False)  # train.py:47: the probe stays in the model, its gradient is stopped
    harmful_gradient = compute_contrastive_gradients(model, safety_batch, temperature=1.0)  # train.py:48
    harmful_gradient = normalize_dict(harmful_gradient)  # train.py:49
    lora_norm = get_lora_params(model, norm_only=True)  # train.py:50
    lora_optimizer.zero_grad()  # train.py:51

    with torch.inference_mode():  # train.py:53-54
        merge_lora_parameters(model, harmful_gradient, grad_rate * lora_norm)

    set_optimizer(bias_optimizer, True)  # train.py:60-65: -L(W', V), gradient to V only
    set_optimizer(lora_optimizer, False)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    loss = -outputs.loss
    loss.backward()

    with torch.inference_mode():  # train.py:67-68
        merge_lora_parameters(model, harmful_gradient, -grad_rate * lora_norm)

    set_optimizer(lora_optimizer, True)  # train.py:70-80: +L(W, V) to W and V; W steps; V <- 0, then steps
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    loss = outputs.loss
    loss.backward()
    lora_optimizer.step()
    zero_params(bias_optimizer)
    bias_optimizer.step()
    lora_optimizer.zero_grad()
    bias_optimizer.zero_grad()
    return loss.item()


# --------------------------------------------------------------------------- model.py and the loop


def run_authors(cfg: RunConfig, steps: int) -> dict:
    """``steps`` steps of the authors' loop on one process, with sap-ds's model, LoRA start and
    batches (one rank, one micro-batch per step). Returns the LoRA tensors before and after
    (named as sap-ds names its trainable parameters), the probe (rows in layer order, as
    ``sap_ds.sap.probe.Probe`` keeps them) and the losses of the main passes."""
    s, t = cfg.sap, cfg.train
    assert cfg.lora.enabled and t.grad_accum == 1 and cfg.method == "sap", "the authors' loop: LoRA, one batch per step"
    torch.manual_seed(cfg.seed)
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    data = build_run_data(cfg.data, tok, cfg.seed, need_safety=True)
    model = load_model(cfg.model, path)
    torch.manual_seed(cfg.seed)
    model = apply_lora(model, cfg.lora)
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    for v in sorted(s.probe_layers):  # model.py:16-18
        layer = model.base_model.model.model.layers[v]
        layer.mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(layer.mlp.down_proj.out_features))
    lora_params = [p for n, p in model.named_parameters() if "lora" in n]  # model.py:20-21
    bias_params = [p for n, p in model.named_parameters() if 'mlp.down_proj.bias' in n]
    # model.py:25-28 (lr, eps and the weights' decay from the config: see the module docstring)
    lora_optimizer = torch.optim.AdamW(lora_params, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                                       weight_decay=t.weight_decay)
    bias_optimizer = torch.optim.AdamW(bias_params, lr=s.probe_lr, eps=s.probe_adam_eps)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}

    pad, gb = tok.pad_token_id, t.micro_batch_size
    losses = []
    for step in range(steps):
        idx = global_batch_indices(len(data.train), gb, step, cfg.seed, cfg.data.shuffle)
        batch = collate([data.train[i] for i in idx], pad)
        sidx = global_batch_indices(len(data.safety), s.safety_batch_size, step // s.safety_every, cfg.seed + 7)
        safety_batch = collate_pairs([data.safety[i] for i in sidx], pad)
        losses.append(train_step(model, batch, safety_batch, lora_optimizer, bias_optimizer, s.rho))
    after = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    return {"before": before, "after": after, "probe": torch.stack([b.detach().clone() for b in bias_params]),
            "losses": losses}
