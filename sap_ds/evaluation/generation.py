"""Prompts as every backend sees them, and batched transformers generation: left padding,
the chat template's generation prompt, greedy by default, stop at end-of-sequence,
ranks sharing the prompts.

Prompts are rendered by the model's chat template here (``chat_prompts``) and tokenized
here (``encode_prompts``), so the transformers and the vLLM backends receive the same
token ids: a difference between them is then the engine's, never the prompt's.

Why left padding: every prompt then ends at the same column, so new tokens are appended
at the same position for the whole batch; with the attention mask (and the position ids
transformers derives from it) the padding is invisible, and a batched run gives the same
tokens as one prompt at a time (tests/test_eval_generation.py checks this in fp32).

Length-sorted batches, sorted globally and then dealt to the ranks: the prompts are
sorted longest first over the whole set, and rank r takes sorted positions r, r+N, ...
Each rank's share is then itself sorted (its batches hold prompts of similar length, so
little compute goes to padding), and every rank gets the same number of prompts and
nearly the same number of prompt tokens (one of every N neighbours in length), which a
per-rank sort after a round-robin deal of the unsorted prompts gives only on average.
Longest first: a batch that does not fit in memory fails in the first minute, not the
last. Results come back in the caller's order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sap_ds.data import ChatTokenizer
from sap_ds.evaluation.config import GenerationConfig
from sap_ds.evaluation.runtime import is_main, shard_map


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


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of already-templated prompts (the template wrote the special tokens)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def eos_ids(generation_config, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (chat models
    often end a turn with a token other than the tokenizer's eos)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def longest_first(encoded: Sequence[Sequence[int]]) -> list[int]:
    """Indices of ``encoded`` sorted by length, longest first (ties in input order)."""
    return sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))


def finished(tokens: list[int], stops: Sequence[int]) -> list[int]:
    """The generated tokens up to and including the first end-of-sequence."""
    end = next((k + 1 for k, tok in enumerate(tokens) if tok in stops), len(tokens))
    return tokens[:end]


def generate(model, tokenizer, texts: Sequence[str], settings: GenerationConfig, *, seed: int = 0,
             max_new_tokens: Optional[int] = None, desc: str = "generate",
             stats: Optional[GenerationStats] = None) -> list[Generation]:
    """Completions of already-templated ``texts``, in order, on every rank."""
    new_tokens = max_new_tokens or settings.max_new_tokens
    encoded = encode_prompts(tokenizer, texts)
    order = longest_first(encoded)
    ordered = shard_map([encoded[i] for i in order],
                        lambda mine: _generate_local(model, tokenizer, mine, settings, new_tokens, seed, desc, stats))
    out: list[Optional[Generation]] = [None] * len(texts)
    for position, index in enumerate(order):
        out[index] = ordered[position]
    return out


def _generate_local(model, tokenizer, encoded, settings, max_new_tokens, seed, desc, stats) -> list[Generation]:
    """This rank's share, already longest first: consecutive prompts make a batch."""
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    stops = eos_ids(model.generation_config, tokenizer)
    sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=0) if settings.do_sample else {}
    torch.manual_seed(seed)
    out: list[Generation] = []
    bar = tqdm(total=len(encoded), desc=desc, disable=not is_main(), dynamic_ncols=True)
    for start in range(0, len(encoded), settings.batch_size):
        batch = encoded[start : start + settings.batch_size]
        padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        began = time.perf_counter()
        with torch.no_grad():
            generated = model.generate(
                input_ids=padded["input_ids"].to(model.device), attention_mask=padded["attention_mask"].to(model.device),
                max_new_tokens=max_new_tokens, do_sample=settings.do_sample, eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id, **sampling,
            )[:, padded["input_ids"].shape[1] :].cpu()
        done = [finished(row.tolist(), stops) for row in generated]
        out += [Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens)) for tokens in done]
        if stats is not None:
            stats.seconds += time.perf_counter() - began
            stats.tokens += sum(len(tokens) for tokens in done)
        bar.update(len(batch))
    bar.close()
    return out
