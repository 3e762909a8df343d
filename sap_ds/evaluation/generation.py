"""Batched generation: left padding, the chat template's generation prompt, greedy by
default, stop at end-of-sequence, sharded over ranks.

Why left padding: every prompt then ends at the same column, so new tokens are appended
at the same position for the whole batch; with the attention mask (and the position ids
transformers derives from it) the padding is invisible, and a batched run gives the same
tokens as one prompt at a time (tests/test_eval_generation.py checks this in fp32).
Prompts are sorted by length inside a rank to waste little compute on padding; results
come back in the caller's order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sap_ds.data import ChatTokenizer
from sap_ds.evaluation.config import GenerationConfig
from sap_ds.evaluation.runtime import device, is_main, shard_map


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int  # generated tokens, end-of-sequence included, padding excluded


@dataclass
class GenerationStats:
    """Throughput of one ``generate`` call on this rank (tokens/s of the local share)."""

    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> Optional[float]:
        return self.tokens / self.seconds if self.seconds > 0 else None


def chat_prompts(tokenizer, prompts: Sequence[str], system_prompt: Optional[str] = None) -> list[str]:
    """Each user prompt rendered by the chat template, ending with the assistant header."""
    chat = ChatTokenizer(tokenizer, max_length=1 << 30, system_prompt=system_prompt)
    return [chat.prompt_text((("user", p),)) for p in prompts]


def eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, texts: Sequence[str], settings: GenerationConfig, *, seed: int = 0,
             max_new_tokens: Optional[int] = None, desc: str = "generate",
             stats: Optional[GenerationStats] = None) -> list[Generation]:
    """Completions of already-templated ``texts``, in order, on every rank."""
    new_tokens = max_new_tokens or settings.max_new_tokens
    return shard_map(texts, lambda mine: _generate_local(model, tokenizer, mine, settings, new_tokens, seed, desc, stats))


def _generate_local(model, tokenizer, texts, settings, max_new_tokens, seed, desc, stats) -> list[Generation]:
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    stops = eos_ids(model, tokenizer)
    sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=0) if settings.do_sample else {}
    torch.manual_seed(seed)
    out: list[Optional[Generation]] = [None] * len(texts)
    bar = tqdm(total=len(texts), desc=desc, disable=not is_main(), dynamic_ncols=True)
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        began = time.perf_counter()
        with torch.no_grad():
            generated = model.generate(
                input_ids=padded["input_ids"].to(device()), attention_mask=padded["attention_mask"].to(device()),
                max_new_tokens=max_new_tokens, do_sample=settings.do_sample, eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id, **sampling,
            )[:, padded["input_ids"].shape[1] :].cpu()
        for row, i in enumerate(batch):
            tokens = generated[row].tolist()
            end = next((k + 1 for k, tok in enumerate(tokens) if tok in stops), len(tokens))
            out[i] = Generation(tokenizer.decode(tokens[:end], skip_special_tokens=True).strip(), end)
        if stats is not None:
            stats.seconds += time.perf_counter() - began
            stats.tokens += sum(out[i].n_tokens for i in batch)
        bar.update(len(batch))
    bar.close()
    return out
