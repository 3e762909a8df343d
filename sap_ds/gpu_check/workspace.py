"""What the GPU check runs on, with no download: model folders built from shipped configs,
a word-level tokenizer, data files it writes itself, and run configs.

* ``configs/models/<name>/``: a Llama ``config.json`` (random weights, ``model.from_config``)
  and the word-level tokenizer below; small JSON files only. ``write_model_folder`` makes
  them; they are committed so ``configs/bench_gpu_1b.yaml`` runs as is.
* The tokenizer: one token per lowercase word or punctuation mark, over the 4,000 most
  frequent words of the repository's GSM8K and AdvBench files, with a ChatML template. One
  token per word is close to a BPE's token count on English text (~1.3 per word), which is
  what throughput figures depend on; the GPU image has no tokenizer of its own to offer.
* Data: a JSONL task file whose every example has the same number of prompt and response
  tokens (so one micro-batch of 2 and two of 1 have the same mean loss: the grad-accum
  check), and a JSONL safety-pair file.
* ``datasets`` is required: training reads, tokenizes and caches its data through it
  (load_dataset, Dataset.map, save_to_disk), so every engine step needs it. Where it does
  not import (an image without it, or with a pyarrow older than it needs),
  ``datasets_missing`` says so, with what to install, before any engine is built.
"""
from __future__ import annotations

import collections
import importlib.metadata
import json
import random
import re
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "configs" / "models"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB_WORDS = 4000
CORPUS = ("data/gsm8k/train.jsonl", "data/advbench/harmful_behaviors.csv")

# Llama shapes. llama-0.5b: 28 layers of h 1024 (16 heads / 8 KV), MLP 4096: 0.51B with
# untied 32,000-token embeddings. llama-1b: TinyLlama-1.1B's shape (22 x h 2048, 32 / 4
# heads, MLP 5632). llama-tiny: the CPU mode's (h 64, 4 layers), vocabulary = the tokenizer.
SHAPES = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=None),
    "llama-0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
}


def corpus_words() -> list[str]:
    counts: collections.Counter = collections.Counter()
    for name in CORPUS:
        counts.update(re.findall(r"[a-z]+", (REPO / name).read_text(encoding="utf-8").lower()))
    return [w for w, _ in counts.most_common(VOCAB_WORDS)]


def build_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    punctuation = list("0123456789.,;:!?'\"()[]{}<>+-*/=%$#@&_^~`|\\")
    roles = ["system", "user", "assistant"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIALS + roles + punctuation + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_model_folder(name: str, target: Path = None) -> Path:
    """``configs/models/<name>/``: config.json (LlamaForCausalLM, bf16) and the tokenizer."""
    from transformers import LlamaConfig

    target = Path(target or MODELS / name)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus_words())
    shape = dict(SHAPES[name])
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def model_dir(name: str) -> Path:
    return MODELS / name


# --------------------------------------------------------------------------- data


def write_data(folder: Path, words: list[str], n_task: int = 64, n_safety: int = 32, prompt_words: int = 12,
               response_words: int = 20, seed: int = 0) -> dict[str, Path]:
    """Task and safety files of plain lowercase vocabulary words: every example has exactly
    ``prompt_words`` prompt and ``response_words`` response tokens (one token per word)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pool = [w for w in words if w.isalpha()][:1000]
    sentence = lambda k: " ".join(rng.choice(pool) for _ in range(k))  # noqa: E731
    task, safety = folder / "task.jsonl", folder / "safety.jsonl"
    task.write_text("".join(json.dumps({"prompt": sentence(prompt_words), "response": sentence(response_words)}) + "\n"
                            for _ in range(n_task)), encoding="utf-8")
    safety.write_text("".join(json.dumps({"prompt": sentence(prompt_words), "safe_response": sentence(response_words),
                                          "harmful_response": sentence(response_words)}) + "\n"
                              for _ in range(n_safety)), encoding="utf-8")
    return {"task": task, "safety": safety}


def unmet_requirements(distribution: str) -> list[str]:
    """The installed ``distribution``'s own requirements (no extras) that this environment
    does not satisfy, e.g. ``pyarrow>=24.0.0 (found 21.0.0)``: why an installed package fails
    to import on an image whose versions are older or newer than it was released against."""
    from packaging.requirements import Requirement

    unmet = []
    for line in importlib.metadata.requires(distribution) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            found = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(found, prereleases=True):
            unmet.append(f"{req} (found {found})")
    return unmet


def datasets_missing() -> Optional[str]:
    """None when ``datasets`` imports; else why not and what to install ("datasets required")."""
    try:
        import datasets  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an old pyarrow raises more than ImportError
        why = f"{type(exc).__name__}: {exc}"
    else:
        return None
    try:
        installed = f"datasets {importlib.metadata.version('datasets')} is installed"
        unmet = unmet_requirements("datasets")
        if unmet:
            installed += " but needs " + ", ".join(unmet)
    except importlib.metadata.PackageNotFoundError:
        installed = "datasets is not installed"
    return (f"datasets required: every engine step trains, and training reads, tokenizes and caches its data "
            f"through datasets; it does not import here ({why}; {installed}). Build the wheel folder with "
            f"scripts/build_gpu_wheels.sh where the package registry is reachable, carry .whl/ along, and "
            f"scripts/gpu_check.sh installs datasets, dill and multiprocess from it (the image must provide "
            f"the pyarrow, fsspec and huggingface-hub versions datasets asks for), or pip install datasets")


# --------------------------------------------------------------------------- configs


def run_tree(out: Path, name: str, model_name: str, files: dict, cpu: bool, **sections) -> dict:
    """A run config for one engine of the check; ``sections`` are merged into the defaults."""
    tree = {
        "run_name": name, "output_dir": str(out / "runs" / name), "seed": 0, "method": "sap",
        "deepspeed_config": "ds_configs/zero3_cpu.json" if cpu else "ds_configs/zero3_bf16_1gpu.json",
        "model": {"path": str(model_dir(model_name)), "from_config": True, "dtype": "bf16"},
        "data": {"train": [{"path": str(files["task"]), "format": "instruction"}],
                 "safety": [{"path": str(files["safety"]), "format": "safety_pairs"}],
                 "max_length": 64, "safety_max_length": 64, "shuffle": False},
        "train": {"micro_batch_size": 2, "grad_accum": 1, "max_steps": 1, "lr": 1e-4, "warmup_steps": 0,
                  "lr_schedule": "constant", "grad_clip": 1.0, "resume": "never", "log_every": 1},
        "sap": {"rho": 0.05, "probe_layers": [1, 2] if cpu else [3, 9], "kernels": "triton", "safety_batch_size": 2,
                "probe_lr": 0.05},
        "export": {"enabled": False},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return tree


if __name__ == "__main__":  # python -m sap_ds.gpu_check.workspace: rewrite configs/models/*
    for model_name in SHAPES:
        print(write_model_folder(model_name))
