"""Tiny random decoder models of several architectures (fp32, seeded), for tests that need a
real transformers model but no training: the probe's layer finding, its hooks."""
from __future__ import annotations

import torch
from torch import nn

HIDDEN, VOCAB = 32, 64
CPU = torch.device("cpu")


def tiny_config(arch: str, layers: int = 2, tie: bool = True):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, tie_word_embeddings=tie)
    if arch == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "mistral":
        return T.MistralConfig(num_key_value_heads=2, **common)
    if arch == "gemma":
        return T.GemmaConfig(num_key_value_heads=2, head_dim=8, **common)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**common)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    raise ValueError(arch)


def tiny_model(arch: str, layers: int = 2, tie: bool = True, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, layers, tie), dtype=torch.float32).eval()
