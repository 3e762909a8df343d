"""Backends of `sap-ds eval`: which one runs when (a pure function of sizes and packages),
the memory estimate against the model's own parameter count, and the three backends
giving the same answers and test loss on the tiny model: hf, device_map (on CPU: the
sharded path on one device, the only smoke test a CPU machine allows) and vLLM through a
stand-in ``vllm`` module (vLLM needs CUDA; the stand-in records the arguments the
backend passes and answers with the transformers model, so any mix-up of prompts,
outputs, stop tokens or prompt log-probabilities changes the result)."""
import sys
import types
from pathlib import Path

import pytest
import torch

from sap_ds.errors import ConfigError
from sap_ds.evaluation.backends import GIB, choose_backend, estimate_memory

TINY_EVAL = {
    "harmful": [{"name": "advbench", "path": "data/advbench/harmful_behaviors.csv", "offset": 300, "limit": 3}],
    "benign": [{"name": "harmless", "path": "data/adversariallm/refusal_direction/harmless_val.json", "limit": 2}],
    "generation": {"max_new_tokens": 6, "batch_size": 2},
    "tasks": [{"kind": "test_loss", "name": "loss", "path": "data/gsm8k/test.jsonl", "format": "gsm8k", "limit": 3,
               "max_length": 96}],
}


def _choose(asked="auto", need=10 * GIB, free=80 * GIB, world=1, vllm=True, accelerate=True):
    return choose_backend(asked, need=need, free=free, world=world, vllm_available=lambda: vllm,
                          accelerate_available=lambda: accelerate).backend


def test_backend_choice():
    assert _choose(free=None) == "hf"  # CPU
    assert _choose(need=70 * GIB, free=80 * GIB) == "hf"  # fits one GPU: data parallel
    assert _choose(need=70 * GIB, free=80 * GIB, world=8) == "hf"
    assert _choose(need=140 * GIB) == "vllm"
    assert _choose(need=140 * GIB, vllm=False) == "device_map"
    assert _choose(need=None) == "hf"  # size unknown: assumed to fit, and the reason says so
    for asked in ("hf", "device_map", "vllm"):
        assert _choose(asked, need=1, free=None) == asked  # explicit choices are honoured, even on CPU
    with pytest.raises(ConfigError, match="without deepspeed/torchrun"):
        _choose(need=140 * GIB, world=4)  # must be split, but launched data parallel
    with pytest.raises(ConfigError, match="backend 'device_map' runs in one process"):
        _choose("device_map", world=2)
    with pytest.raises(ConfigError, match=r"pip install 'sap-ds\[vllm\]'"):
        _choose("vllm", vllm=False)
    with pytest.raises(ConfigError, match="needs the accelerate package"):
        _choose("device_map", accelerate=False)
    with pytest.raises(ConfigError, match="neither vllm"):
        _choose(need=140 * GIB, vllm=False, accelerate=False)


def test_memory_estimate(tiny_model_path, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sap_ds.evaluation.backends import parameter_count

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    cfg = AutoConfig.from_pretrained(tiny_model_path)
    fp32, bf16 = (estimate_memory(Path(tiny_model_path), d, batch_size=4, new_tokens=64) for d in ("fp32", "bf16"))
    assert fp32.weights == 4 * params and bf16.weights == 2 * params
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert bf16.kv_cache == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * 4 * (1024 + 64)
    assert fp32.total == fp32.weights + fp32.kv_cache + fp32.logits + fp32.reserve
    # a sharded folder is counted through its index, not every *.safetensors beside it
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "sharded" / "consolidated.safetensors").write_bytes((Path(tiny_model_path) / "model.safetensors").read_bytes())
    assert parameter_count(tmp_path / "sharded") == params


class _FakeOutput:
    def __init__(self, token_ids, prompt_logprobs=None):
        self.outputs = [types.SimpleNamespace(token_ids=token_ids)]
        self.prompt_logprobs = prompt_logprobs


def _fake_vllm(calls: dict) -> types.ModuleType:
    """A stand-in for vllm's documented offline API, answering with the transformers
    model of the folder it is given (greedy, one prompt at a time)."""
    from transformers import AutoModelForCausalLM

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            calls.setdefault("sampling", []).append(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs
            self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"], dtype=torch.float32).eval()

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            calls.setdefault("prompts", []).append([p["prompt_token_ids"] for p in prompts])
            calls["lora_request"] = lora_request
            return [self._one(p["prompt_token_ids"], params.kwargs) for p in prompts]

        def _one(self, ids, kwargs):
            ids_t = torch.tensor([ids])
            with torch.no_grad():
                if kwargs.get("prompt_logprobs") == 0:
                    logp = torch.log_softmax(self.model(ids_t).logits[0].float(), -1)
                    return _FakeOutput([0], [None] + [{ids[j]: types.SimpleNamespace(logprob=logp[j - 1, ids[j]].item())}
                                                      for j in range(1, len(ids))])
                out = self.model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=kwargs["max_tokens"],
                                          do_sample=False, eos_token_id=kwargs["stop_token_ids"])
            return _FakeOutput(out[0, len(ids):].tolist())

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, idx, path: ("LoRARequest", name, idx, path)
    lora.request = request
    return {"vllm": module, "vllm.lora": lora, "vllm.lora.request": request}


def test_backends_give_the_same_answers(tiny_model_path, monkeypatch):
    """hf, device_map (on one CPU device) and vLLM (stand-in) on the same prompts: the same
    answers in the same order, the same test loss, and the documented vLLM arguments."""
    from sap_ds.config.reading import validate_tree
    from sap_ds.evaluation.config import EvalConfig
    from sap_ds.evaluation.evaluate import evaluate
    from sap_ds.evaluation.generation import chat_prompts, encode_prompts
    from sap_ds.model.loading import load_tokenizer
    from tests.support.repo import REPO

    monkeypatch.chdir(REPO)
    results = {b: evaluate(str(tiny_model_path), validate_tree(EvalConfig, TINY_EVAL, [f"backend={b}"]))
               for b in ("hf", "device_map")}
    calls: dict = {}
    for name, module in _fake_vllm(calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    results["vllm"] = evaluate(str(tiny_model_path), validate_tree(EvalConfig, TINY_EVAL, ["backend=vllm", "seed=5"]))
    hf = results["hf"]
    assert results["device_map"]["runtime"]["device_map"] == ["cpu"]
    for name in ("device_map", "vllm"):
        got = results[name]
        assert got["runtime"]["backend"] == name
        for part in ("harmful", "benign"):
            assert [r["response"] for r in got["records"][part]] == [r["response"] for r in hf["records"][part]], name
        assert got["metrics"]["tasks"]["loss"]["loss"] == pytest.approx(hf["metrics"]["tasks"]["loss"]["loss"], rel=1e-5)
        assert got["metrics"]["tasks"]["loss"]["tokens"] == hf["metrics"]["tasks"]["loss"]["tokens"]
    assert calls["llm"] == {"model": str(tiny_model_path), "tokenizer": str(tiny_model_path), "tensor_parallel_size": 1,
                            "dtype": "float32", "seed": 5, "trust_remote_code": False, "gpu_memory_utilization": 0.9}
    tokenizer = load_tokenizer(tiny_model_path)
    harmful_prompts = [r["prompt"] for r in hf["records"]["harmful"]]
    assert calls["prompts"][0] == encode_prompts(tokenizer, chat_prompts(tokenizer, harmful_prompts))  # the HF token ids
    greedy = calls["sampling"][0]
    assert greedy["temperature"] == 0.0 and greedy["max_tokens"] == 6 and tokenizer.eos_token_id in greedy["stop_token_ids"]
    assert calls["sampling"][-1] == {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    assert calls["lora_request"] is None


def test_vllm_arguments_for_an_adapter_and_tensor_parallelism(tmp_path):
    from sap_ds.config.reading import validate_tree
    from sap_ds.evaluation.adapters import ModelSource
    from sap_ds.evaluation.config import EvalConfig
    from sap_ds.evaluation.vllm_backend import engine_arguments

    cfg = validate_tree(EvalConfig, TINY_EVAL, ["backend=vllm", "tensor_parallel_size=8", "vllm.max_model_len=4096", "dtype=bf16"])
    source = ModelSource(path=tmp_path / "base", tokenizer_path=tmp_path / "adapter", adapter=tmp_path / "adapter",
                         adapter_config={"r": 32})
    args = engine_arguments(source, cfg, "bf16", gpus=4)
    assert args["tensor_parallel_size"] == 8 and args["dtype"] == "bfloat16" and args["max_model_len"] == 4096
    assert args["enable_lora"] is True and args["max_lora_rank"] == 32 and args["model"] == str(tmp_path / "base")
    assert engine_arguments(ModelSource(path=tmp_path, tokenizer_path=tmp_path), cfg.model_copy(update={"tensor_parallel_size": None}),
                            "bf16", gpus=4)["tensor_parallel_size"] == 4  # default: every visible GPU


def test_missing_packages_are_clear_errors(tiny_model_path, tmp_path, monkeypatch, capsys):
    """vLLM asked for and not installed, device_map without accelerate: exit 2 naming the
    package and what to do, before the model loads; the previous report is untouched."""
    import yaml

    from sap_ds.eval import main
    from tests.support.repo import REPO, with_repo_paths

    monkeypatch.chdir(REPO)
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(with_repo_paths(TINY_EVAL)))
    (tmp_path / "eval.json").write_text("previous")
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    assert main(["--model", str(tiny_model_path), "--config", str(config), "--out", str(tmp_path), "backend=vllm"]) == 2
    assert "backend 'vllm' needs the vllm package" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "accelerate", None)
    assert main(["--model", str(tiny_model_path), "--config", str(config), "--out", str(tmp_path), "backend=device_map"]) == 2
    assert "pip install accelerate" in capsys.readouterr().err
    assert (tmp_path / "eval.json").read_text() == "previous"
    assert main(["--model", str(tiny_model_path), "--config", str(config), "backend=hf", "tensor_parallel_size=2"]) == 2
    assert "tensor_parallel_size is a vllm setting" in capsys.readouterr().err


def test_dtype_auto(monkeypatch):
    from sap_ds.evaluation.runtime import resolve_dtype

    assert resolve_dtype("fp32") == "fp32" and resolve_dtype("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto") == "bf16"
