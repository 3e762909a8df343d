"""RepNoise (Rosati et al., "Representation Noising: A Defence Mechanism Against Harmful
Finetuning", NeurIPS 2024), after the authors' ``rep_noise_loss`` in
representation_noising/loss.py of github.com/domenicrosati/representation-noising (commit
03689ff; the repo has no training script: the loop is its demo notebook's, one loss, one
backward, AdamW). docs/alignment_defences.md lists every difference.

An alignment-stage defence on pairs of a refusal and a harmful answer to the same prompt
(data.safety's pairs). For a micro-batch of B pairs, with M the positions where the two
sides' token ids differ (loss.py:93; both sides padded to one width):

    loss = CE_M(refusals)
           + beta  * (1/L) sum_l MMD(M * mlp_l(harmful), M * N(0, I))
           - alpha * log((CE_M(harmful output) + sum_{j=0..L} CE_M(lm_head(norm(h_j(harmful))))) / (L+1) + 1)

mlp_l the output of decoder layer l's MLP (before the residual add), h_j the j-th hidden
state (0: the embeddings), CE_M the authors' ``masked_token_ce_loss`` (loss.py:52-71) and
the MMD a sum of ``kernel_num`` Gaussian kernels whose bandwidths come from the batch
(loss.py:17-49). Descending it learns the refusals, pushes the harmful representations
toward noise and raises the harmful loss at every layer, the ascent fading as that loss grows
(the log).

A step is the trainer's main pass over ``train.grad_accum`` micro-batches of
``train.micro_batch_size`` pairs per rank (the pairs' order: seed + 19, by step, as Lisa's
alignment batches), each micro-batch's loss the one above (``Trainer.main_pass(loss_fn=)``):
one forward of the refusals and harmful answers together (the authors run two; the rows do
not interact), one backward, DeepSpeed's reduction, clipping and AdamW. Under ZeRO-3 the
logit lens calls the final norm and the LM head as modules (their hooks gather the weights),
one layer at a time under non-reentrant checkpointing, so that one layer's [B, T, vocab]
logits are alive at a time instead of L+1 of them (the same values and gradients). The
Gaussian noise is drawn from a generator seeded by (seed, step, rank, micro-batch), so a
resumed run draws what an uninterrupted one would, and the reference can draw it too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sap_ds.data import collate_pairs, global_batch_indices
from sap_ds.errors import ConfigError
from sap_ds.methods.base import ExtraPasses, Method
from sap_ds.model.loading import unwrap_model
from sap_ds.sap.probe import find_decoder_layers

PAIR_SEED_OFFSET = 19  # the pairs' order: (seed + 19, epoch), apart from task, SAP, Lisa, mix and Booster draws
NOISE_SEED_OFFSET = 23  # the Gaussian noise's generator


def noise_seed(seed: int, step: int, rank: int, micro_batch: int) -> int:
    """The seed of the noise drawn for one micro-batch: a pure function of where it is in the
    run (a resumed run, and the reference, draw the same noise)."""
    return ((seed + NOISE_SEED_OFFSET) * 1_000_003 + step) * 65_537 + rank * 1_024 + micro_batch


def differing_mask(safe_ids: torch.Tensor, harmful_ids: torch.Tensor) -> torch.Tensor:
    """``mask = ~torch.eq(harmful_batch['input_ids'], harmless_batch['input_ids'])`` (loss.py:93):
    the positions where the two sides differ (the shared prompt and common padding are out)."""
    return safe_ids != harmful_ids


def masked_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The authors' ``masked_token_ce_loss`` (loss.py:52-71): next-token CE with labels =
    input ids, logits zeroed where ``mask[t]`` is 0 (L62-65), labels where ``mask[t+1]`` is 0
    or whose id is 0 ignored (L66-67), a token mean. In fp32 (the authors: the model's dtype)."""
    mask = mask.to(logits.dtype)
    shift_logits = logits[:, :-1].float() * mask[:, :-1, None].float()
    labels = ids[:, 1:] * mask[:, 1:].long()
    labels = labels.masked_fill(labels == 0, -100)
    return F.cross_entropy(shift_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float, kernel_num: int) -> torch.Tensor:
    """``MMD_loss.forward`` (loss.py:17-49) between the rows of x and y ([B, N] each), in fp32:
    squared distances of all 2B rows, bandwidth = their mean off the diagonal (detached, L35)
    / kernel_mul**(kernel_num // 2) (L36), kernels at bandwidth * kernel_mul**i (L37-39),
    mean(K_XX + K_YY - K_XY - K_YX) (L44-48). The distances come from the Gram matrix of the
    centred rows rather than the authors' [2B, 2B, N] difference tensor (L29-31): the same
    values, without a tensor of 2B x 2B x T x d elements per layer."""
    total = torch.cat([x, y]).float()
    total = total - total.mean(0, keepdim=True).detach()  # distances are unchanged; the Gram form cancels less
    n = total.shape[0]
    sq = total.square().sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * total @ total.T).clamp_min(0.0)
    bandwidth = dist.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    kernels = sum(torch.exp(-dist / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
    b = x.shape[0]
    return (kernels[:b, :b] + kernels[b:, b:] - kernels[:b, b:] - kernels[b:, :b]).mean()


class RepNoiseMethod(Method):
    name = "repnoise"
    needs_safety = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.stats: list[dict] = []  # the last step's per-micro-batch terms (device tensors)

    def setup(self, trainer) -> None:
        """The modules the loss reads: every decoder layer's MLP (hooked during the forward),
        the final norm and the LM head (the logit lens)."""
        base = unwrap_model(trainer.engine)
        layers = find_decoder_layers(trainer.engine)
        self.mlps = [getattr(layer, "mlp", None) for layer in layers]
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        self.norm = getattr(decoder, "norm", None)
        self.lm_head = base.get_output_embeddings()
        if any(m is None for m in self.mlps) or self.norm is None or self.lm_head is None:
            raise ConfigError(f"method repnoise needs each decoder layer's 'mlp', the decoder's final 'norm' and the "
                              f"output embeddings, as Llama/Qwen-style models have them; {type(base).__name__} lacks "
                              f"one (the authors' loss.py:90-92, 117-118 reads the same modules)")

    # ------------------------------------------------------------------ the pairs

    def pair_indices(self, trainer, step: int) -> list[int]:
        """The global batch of pairs of step ``step``: the task batch's size, drawn from data.safety."""
        return global_batch_indices(len(trainer.data.safety), trainer.global_batch, step, self.cfg.seed + PAIR_SEED_OFFSET)

    def pair_micro_batches(self, trainer, step: int) -> list[dict]:
        """This rank's micro-batches of pairs, refusals first and harmful answers second, both
        padded to one width (``collate_pairs``; the mask compares them position by position)."""
        t = self.cfg.train
        per_rank = t.micro_batch_size * t.grad_accum
        mine = self.pair_indices(trainer, step)[trainer.rank * per_rank : (trainer.rank + 1) * per_rank]
        pad = trainer.tokenizer.pad_token_id
        return [trainer._to_device(collate_pairs([trainer.data.safety[i] for i in
                                                  mine[m * t.micro_batch_size : (m + 1) * t.micro_batch_size]], pad))
                for m in range(t.grad_accum)]

    # ------------------------------------------------------------------ the loss

    def loss(self, trainer, step: int, micro_batch: int, batch: dict) -> torch.Tensor:
        """``rep_noise_loss`` (loss.py:74-130) on one micro-batch of pairs."""
        c = self.cfg.repnoise
        ids = batch["input_ids"]
        b = ids.shape[0] // 2
        safe_ids, harmful_ids = ids[:b], ids[b:]
        mask = differing_mask(safe_ids, harmful_ids)
        captured: list[torch.Tensor] = []
        handles = [mlp.register_forward_hook(lambda _m, _i, out: captured.append(out)) for mlp in self.mlps] \
            if c.beta > 0 else []
        try:  # one forward for both sides (the authors: two, loss.py:89 and 108)
            out = trainer.engine(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False,
                                 output_hidden_states=c.alpha > 0)
        finally:
            for h in handles:  # removed every step (the authors' hooks are never removed: loss.py:7-14)
                h.remove()
        harmless = masked_token_ce(out.logits[:b], safe_ids, mask)  # L108-115: the same mask M
        loss = harmless
        stats = {"harmless_loss": harmless.detach()}
        if c.beta > 0:
            gen = torch.Generator(device=ids.device)
            gen.manual_seed(noise_seed(self.cfg.seed, step, trainer.rank, micro_batch))
            noise = 0.0
            for z in captured:  # L94-100
                z = z[b:].float() * mask[..., None]
                gaussian = torch.randn(z.shape, generator=gen, device=z.device, dtype=torch.float32) * mask[..., None]
                noise = noise + mmd(z.flatten(1), gaussian.flatten(1), c.kernel_mul, c.kernel_num)
            noise = noise / len(captured)
            loss = loss + c.beta * noise
            stats["noise_loss"] = noise.detach()
        if c.alpha > 0:
            harmful = masked_token_ce(out.logits[b:], harmful_ids, mask)  # L102-107
            stats["harmful_output_loss"] = harmful.detach()
            for h in out.hidden_states:  # L117-127: every hidden state, the embeddings' included, through norm and head
                harmful = harmful + checkpoint(self._lens_ce, h[b:], harmful_ids, mask, use_reentrant=False,
                                               determinism_check="none")
            harmful = harmful / len(out.hidden_states) + 1  # L128: L+2 terms over L+1
            loss = loss - c.alpha * torch.log(harmful)  # L129
            stats["harmful_loss"] = (harmful - 1).detach()
        self.stats.append(stats)
        return loss

    def _lens_ce(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``masked_token_ce_loss(output_embeddings(norm(h)), ...)`` (loss.py:122-126) for one hidden state."""
        return masked_token_ce(self.lm_head(self.norm(hidden)), ids, mask)

    def step(self, trainer, step: int, micro_batches: list[dict]) -> list[float]:
        self.stats = []
        batches = self.pair_micro_batches(trainer, step)
        with trainer.timer("main"):
            return trainer.main_pass(batches, loss_fn=lambda m, batch: self.loss(trainer, step, m, batch))

    # ------------------------------------------------------------------ what the tools read

    def trains_on(self, step: int) -> str:
        return "alignment"

    def trained_micro_batches(self, trainer, step: int) -> list[dict]:
        return self.pair_micro_batches(trainer, step)

    def trained_lengths(self, trainer, step: int) -> list[int]:
        """Both sides of every pair of the global batch: one forward and backward each (the
        logit lens on top: ``extra_passes``)."""
        pairs = [trainer.data.safety[i] for i in self.pair_indices(trainer, step)]
        return [len(t.input_ids) for p in pairs for t in (p.safe, p.harmful)]

    def extra_passes(self, trainer, step: int) -> ExtraPasses:
        """The logit lens (with ``alpha`` > 0): every hidden state of the harmful sides, the
        embeddings' included, through norm and LM head, forward and backward."""
        if self.cfg.repnoise.alpha <= 0:
            return ExtraPasses()
        pairs = [trainer.data.safety[i] for i in self.pair_indices(trainer, step)]
        return ExtraPasses(lens_lengths=tuple(len(p.harmful.input_ids) for p in pairs),
                           lens_states=len(self.mlps) + 1)  # hidden_states: embeddings + every layer

    def log_stats(self, trainer) -> dict:
        """The last step's terms, each the mean over this rank's micro-batches: the refusal CE,
        the MMD (before beta), the harmful CE at the output and the layer mean inside the log
        (before +1), in one device-to-host read."""
        if not self.stats:
            return {}
        keys = list(self.stats[0])
        values = torch.stack([torch.stack([s[k].float().reshape(()) for s in self.stats]).mean() for k in keys]).tolist()
        return {f"repnoise/{k}": v for k, v in zip(keys, values)}

    def bench_settings(self, trainer) -> dict:
        c = self.cfg.repnoise
        return {"alpha": c.alpha, "beta": c.beta, "safety_max_length": self.cfg.data.safety_max_length}
