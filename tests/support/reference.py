"""Plain-PyTorch, single-process SFT, SAP, Lisa and safety-data mixing: the independent reference.

Written from docs/algorithm.md ("One step"), with no DeepSpeed and none of sap-ds's training code
(only its data pipeline, which has tests of its own, and the LR schedule). It sees the
whole global batch of every step and reproduces what data parallelism means: rank r's
micro-batch m is the same slice the trainer gives that rank, each micro-batch loss is a
token mean, and gradients are averaged over ranks and micro-batches.

With ``data.packing`` the units of a batch are packs, but the reference never runs a packed
row: it collates each micro-batch's examples unpacked (padded, with a padding mask), so the
token mean over the same response tokens checks the trainer's packed attention too.

SAP's two forms of the probe step (docs/algorithm.md): ``sap.probe_timing: next_step`` is the
authors' order (the probe's gradient from this step's passes, used in the next step's main
pass); ``same_step`` follows SafeTune's ``SAPTrainer._sap_training_step`` (Lexsi-Labs/SafeTune,
``src/safetune/interventions/harden/sap.py``, the paper's Algorithm 1): V <- 0; the gradient
of ``-L(W + dW, V)`` and then of ``+L(W, V)`` accumulated into ``V.grad`` by ``backward()``
(the second also fills the weights' gradients, which are thrown away, as SafeTune does); V
updated; then the main pass at W with that V. ``sap.probe_update: gradient`` is SafeTune's
``v.data.add_(v.grad, alpha=-v_update_step)``, with ``probe_lr`` as the step.

Lisa follows the authors' ``LisaTrainer`` (git-disl/Lisa, ``trainer.py``) line by line: a
status and a clock switched by ``check_mode``, both phases' weights kept as in
``switch_model``, and the proximal term added to the loss, not to the gradient.

Safety-data mixing (``method: safety_mix``) is SFT on the task data with the refusal
demonstrations added by the data pipeline (whose mix tests/test_data.py recomputes from the
raw rows); ``examples_trained`` says which examples each step saw, so a test can check that
the steps it compares trained on demonstrations at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sap_ds.config.run import RunConfig
from sap_ds.data import build_run_data, collate, collate_pairs, global_batch_indices
from sap_ds.model.loading import apply_lora, load_model, load_tokenizer, resolve_model_path
from sap_ds.training.trainer import lr_lambda


def _ce(logits, labels):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _seq_logp(logits, labels):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1)


def _micro_batch(data, indices, pad):
    items = [data.train[i] for i in indices]
    if data.packed:  # a pack's examples, unpacked
        items = [member for unit in items for member in unit.members]
    return collate(items, pad)


def _safety(model, batch, form, temperature):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    half = logits.shape[0] // 2
    if form == "contrastive":
        lp = _seq_logp(logits, batch["labels"])
        return -F.logsigmoid((lp[:half] - lp[half:]) / temperature).mean()
    return _ce(logits[:half], batch["labels"][:half]) - _ce(logits[half:], batch["labels"][half:])


class _RefProbe:
    """V added to the output of decoder blocks, by forward hooks on the plain model."""

    def __init__(self, model, layers, hidden):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        blocks = base.model.layers
        self.v = torch.zeros(len(layers), hidden, requires_grad=True)
        self.on = True
        self.norms = torch.zeros(len(layers))  # mean per-token ||h|| before V, last forward
        for i, layer in enumerate(sorted(layers)):
            blocks[layer].register_forward_hook(self._hook(i))

    def _hook(self, i):
        def hook(module, inputs, output):
            if not self.on:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            self.norms[i] = hidden.detach().float().norm(dim=-1).mean()
            if isinstance(output, tuple):
                return (output[0] + self.v[i], *output[1:])
            return output + self.v[i]

        return hook


class _RefLisa:
    """The authors' phase bookkeeping: ``init``, ``check_mode`` and ``switch_model``."""

    def __init__(self, cfg, params):
        self.a, self.f = cfg.lisa.align_steps, cfg.lisa.finetune_steps
        self.status = "alignment" if self.a != 0 else "finetune"
        self.alignment_weights = [p.detach().clone() for p in params]
        self.finetune_weights = [p.detach().clone() for p in params]
        self.clock = 0
        self.aligned = 0  # alignment batches drawn so far

    def check_mode(self, steps: int, params) -> bool:
        """Switch the status where the authors' code does; True on an alignment step."""
        if self.status == "alignment":
            if self.clock % self.a == 0 and steps != 0 and self.f != 0:
                self.status = "finetune"
                self.alignment_weights = [p.detach().clone() for p in params]
                self.clock = 0
        elif self.clock % self.f == 0 and steps != 0 and self.a != 0:
            self.status = "alignment"
            self.finetune_weights = [p.detach().clone() for p in params]
            self.clock = 0
        self.clock += 1
        return self.status == "alignment"


def _update_probe(probe, probe_opt, s, lr):
    """One update from ``probe.v.grad``: the probe's AdamW, or the plain step."""
    if s.probe_update == "gradient":
        with torch.no_grad():
            probe.v.add_(probe.v.grad, alpha=-lr)  # SafeTune line 436
    else:
        probe_opt.param_groups[0]["lr"] = lr
        probe_opt.step()
    probe.v.grad = None


def _rescale(probe, s, rank_norms):
    """``probe_scale``: V_i to probe_scale * mean ||h|| at layer i (mean over the ranks' last micro-batches)."""
    if s.probe_scale is not None and s.probe_enabled:
        target = s.probe_scale * torch.stack(rank_norms).mean(0)
        with torch.no_grad():
            n = probe.v.norm(dim=-1)
            probe.v.mul_(torch.where(n > 0, target / n.clamp_min(1e-30), torch.zeros_like(n)).unsqueeze(-1))


def reference_setup(cfg: RunConfig, steps: int, need_safety: bool, safety_mix: float = 0.0):
    """What every reference starts with, in the trainer's order (the seed, the data, the
    model, LoRA re-seeded as sap_ds.model.loading does, AdamW and the schedule):
    (tokenizer, data, model, trainable params, optimizer, scheduler)."""
    torch.manual_seed(cfg.seed)
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    data = build_run_data(cfg.data, tok, cfg.seed, need_safety=need_safety, safety_mix=safety_mix)
    model = load_model(cfg.model, path)
    if cfg.lora.enabled:
        torch.manual_seed(cfg.seed)
        model = apply_lora(model, cfg.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))
    return tok, data, model, params, opt, sched


def run_reference(cfg: RunConfig, world: int, steps: int) -> dict:
    mix = cfg.safety_mix.ratio if cfg.method == "safety_mix" else 0.0
    tok, data, model, params, opt, sched = reference_setup(cfg, steps, cfg.method in ("sap", "lisa"), mix)
    t = cfg.train
    s = cfg.sap
    sap = cfg.method == "sap"
    probe = _RefProbe(model, s.probe_layers, model.config.hidden_size) if sap else None
    if probe is not None:
        probe.on = s.probe_enabled
        if s.probe_init == "random":  # same draw as sap_ds.sap.probe.Probe.init_random
            values = torch.randn(probe.v.shape, generator=torch.Generator().manual_seed(cfg.seed))
            with torch.no_grad():
                probe.v.copy_(values / values.norm(dim=-1, keepdim=True) * s.probe_init_norm)
        probe_opt = torch.optim.AdamW([probe.v], lr=s.probe_lr, eps=s.probe_adam_eps, weight_decay=0.0)
    same_step = sap and s.probe_timing == "same_step"
    mb, gas = t.micro_batch_size, t.grad_accum
    k = gas if s.probe_micro_batches is None else s.probe_micro_batches  # the probe passes' micro-batches
    gb = mb * gas * world
    pad = tok.pad_token_id
    losses = []
    direction = None
    lisa = _RefLisa(cfg, params) if cfg.method == "lisa" else None
    examples_trained = []  # per step: the indices in data.examples of its task batch (a pack's members)
    for step in range(steps):
        idx = global_batch_indices(len(data.train), gb, step, cfg.seed, cfg.data.shuffle)
        examples_trained.append([j for i in idx for j in (data.train.members[i] if data.packed else [i])])
        micro = [
            [_micro_batch(data, idx[r * mb * gas + m * mb : r * mb * gas + (m + 1) * mb], pad) for m in range(gas)]
            for r in range(world)
        ]
        if lisa is not None and lisa.check_mode(step, params):  # an alignment batch replaces the task batch
            aidx = global_batch_indices(len(data.safety), gb, lisa.aligned, cfg.seed + 11)
            lisa.aligned += 1
            micro = [[collate([data.safety[i].safe for i in aidx[r * mb * gas + m * mb : r * mb * gas + (m + 1) * mb]], pad)
                      for m in range(gas)] for r in range(world)]
        gv = None
        probing = sap and s.probe_enabled and s.probe_train
        probe_lr = s.probe_lr * (lr_lambda(cfg, steps)(step) if s.probe_lr_schedule == "follow" else 1.0)
        if same_step and probing and s.probe_reset:
            with torch.no_grad():
                probe.v.zero_()  # SafeTune line 404: self._probe.reset()
        if probing:
            if step % s.safety_every == 0 or direction is None:
                # 1. safety gradient, averaged over ranks (each rank: mean over its pairs)
                sidx = global_batch_indices(len(data.safety), s.safety_batch_size * world, step // s.safety_every, cfg.seed + 7)
                # sap.probe_in_safety: the current V stays in the forward (the authors' code, where
                # it is a down_proj bias; its gradient here is discarded below)
                probe.on = s.probe_in_safety
                opt.zero_grad(set_to_none=True)
                for r in range(world):
                    batch = collate_pairs([data.safety[i] for i in sidx[r * s.safety_batch_size : (r + 1) * s.safety_batch_size]], pad)
                    (_safety(model, batch, s.safety_loss, s.temperature) / world).backward()
                probe.on = True
                probe.v.grad = None
                g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
                opt.zero_grad(set_to_none=True)
                if s.perturb_norm == "global":
                    gn = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
                    wn = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))
                    scale = (s.rho * wn / gn).float() if gn > 0 else torch.tensor(0.0)
                    direction = [scale * x for x in g]
                else:
                    direction = []
                    for p, x in zip(params, g):
                        gn, wn = x.double().norm(), p.detach().double().norm()
                        direction.append(((s.rho * wn / gn).float() if gn > 0 else torch.tensor(0.0)) * x)
            # 2. perturb, 3. probe gradient at W', 4. restore
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(d)
            gv = torch.zeros_like(probe.v)
            for r in range(world):
                gr = torch.zeros_like(probe.v)
                for batch in micro[r][:k]:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    (grad,) = torch.autograd.grad(-_ce(logits, batch["labels"]) / k, [probe.v])
                    gr += grad
                gv += gr / world
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            if k < gas and not same_step:
                # sap.probe_micro_batches: the W side on the same k micro-batches, here a pass
                # of its own at W (sap_ds reads it off the main pass instead)
                for r in range(world):
                    for batch in micro[r][:k]:
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                        (grad,) = torch.autograd.grad(_ce(logits, batch["labels"]) / (k * world), [probe.v])
                        gv += grad
        if same_step and probing:
            # SafeTune lines 423-436: backward of +L(W, V) at W adds into the probe's gradient
            # (and fills the weights' gradients, dropped below); then V <- V - beta * V.grad.
            probe.v.grad = gv.clone()
            opt.zero_grad(set_to_none=True)
            clean_norms = []
            for r in range(world):
                for batch in micro[r][:k]:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    (_ce(logits, batch["labels"]) / (world * k)).backward()
                clean_norms.append(probe.norms.clone())
            opt.zero_grad(set_to_none=True)
            _update_probe(probe, probe_opt, s, probe_lr)
            _rescale(probe, s, clean_norms)
        # 5. main pass at W (probe active for SAP)
        opt.zero_grad(set_to_none=True)
        if probe is not None:
            probe.v.grad = None
        step_losses = []
        rank_norms = []  # per rank: the hidden-state norms of its last micro-batch
        for r in range(world):
            for batch in micro[r]:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = _ce(logits, batch["labels"])
                (loss / (world * gas)).backward()
                step_losses.append(loss.item())
            if probe is not None:
                rank_norms.append(probe.norms.clone())
        losses.append(step_losses)
        if lisa is not None and step > cfg.lisa.proximal_after * steps and cfg.lisa.rho > 0:
            anchor = lisa.finetune_weights if lisa.status == "alignment" else lisa.alignment_weights
            (cfg.lisa.rho / 2 * sum(torch.norm(p - a) ** 2 for p, a in zip(params, anchor))).backward()
        finish_step(params, opt, sched, t.grad_clip)
        if probing and not same_step:
            total = gv + probe.v.grad if k == gas else gv  # k < gas: gv holds both sides already
            if s.probe_reset:
                with torch.no_grad():
                    probe.v.zero_()
            probe.v.grad = total
            _update_probe(probe, probe_opt, s, probe_lr)
        if probe is not None:
            probe.v.grad = None
            if not (same_step and probing):
                _rescale(probe, s, rank_norms)
    return {
        "params": trained_params(model, params),
        "probe": probe.v.detach().clone() if probe is not None else None,
        "losses": losses,
        "examples_trained": examples_trained,
        "safety_mix_rows": data.safety_mix_rows,
    }


def finish_step(params, opt, sched, grad_clip: float) -> None:
    """The end of every reference's step, after its backward passes, in HF Trainer's order
    (the authors' trainers and sap-ds's engine alike): clip to ``grad_clip``, the
    optimizer's step, the schedule's step."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()


def trained_params(model, params) -> dict:
    """The trained parameters by name (``params``: the model's trainable ones, in order), as
    every reference returns them for the comparison with the engine's."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: p.detach().clone() for n, p in zip(names, params)}


RTOL = 1e-5  # the tolerance of a 2-rank ZeRO-3 run against the reference (fp32)


def assert_matches_reference(name, got, ref, rtol=RTOL):
    """Every element within 10 x RTOL of the tensor's scale, and 99.9 % within RTOL.

    Adam divides by sqrt(v) + eps, so an element whose gradient is near zero can turn
    reduction-order noise into a visibly different update (seen: 1 element in 3.1M at
    2e-5 after 3 SAP steps, everything else under 7e-6); a real bug moves thousands of
    elements by 1e-3 or more.
    """
    err = (got - ref).abs().flatten()
    scale = ref.abs().max().item() + 1e-12
    worst = err.max().item() / scale
    q999 = torch.quantile(err[: 2**24].double(), 0.999).item() / scale if err.numel() > 1 else worst
    assert worst <= 10 * rtol, f"{name}: max |zero3 - reference| = {worst:.2e} of scale > {10 * rtol:.0e}"
    assert q999 <= rtol, f"{name}: 99.9th percentile error {q999:.2e} of scale > {rtol:.0e}"
