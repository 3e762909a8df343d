"""Tiny random moderation judges of the real interfaces, saved to a folder: a Llama
sequence classifier and a Llama causal LM whose output can be forced to one word.

A random generative judge writes noise; ``forced_judge`` makes it write one token at
every step through its weights (the last layer's MLP bias dominates the residual stream,
so the final norm's output is the same direction at every position, and only the target
token's lm_head row is non-zero): the whole path (template, generation, decoding,
parsing) then runs on a real model with a known verdict."""
from __future__ import annotations

import torch


def tiny_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **extra)


def save_sequence_classifier(folder, tokenizer, **extra) -> str:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_config(tokenizer, **extra)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def forced_judge(folder, tokenizer, word=None) -> str:
    """A tiny causal LM that writes ``word``'s single token at every step (None: random)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tokenizer, mlp_bias=True, tie_word_embeddings=False))
    if word is not None:
        (token,) = tokenizer(word, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.bias.zero_()[0] = 1e4
            model.lm_head.weight.zero_()[token, 0] = 1.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
