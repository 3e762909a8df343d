"""The vLLM backend (``backend: vllm``): the one module that imports vllm.

Written against vLLM's documented offline API: ``vllm.LLM(model=..., tokenizer=...,
tensor_parallel_size=..., dtype=..., seed=...)``, ``vllm.SamplingParams(temperature=0
for greedy, top_p, max_tokens, seed, stop_token_ids, prompt_logprobs)``,
``LLM.generate(prompts, sampling_params, lora_request=...)`` with token-id prompts
(``{"prompt_token_ids": [...]}``, vLLM's TokensPrompt; its outputs come back in the order
of the prompts), and ``vllm.lora.request.LoRARequest`` for an adapter folder. It has
NOT been run against a real vLLM: this project's machines have no CUDA; the tests drive
it with a stand-in ``vllm`` module that checks these arguments and the mapping of the
outputs back to the prompts.

The prompts are rendered and tokenized by sap-ds (``generation.chat_prompts`` and
``encode_prompts``), so vLLM and transformers see the same token ids, and vLLM's answers
are decoded by the same tokenizer call as transformers'. Test loss uses
``prompt_logprobs=0``: vLLM then returns, for every prompt token after the first, the
log-probability of that very token, which is the response cross-entropy the
transformers backend computes from its logits.
"""
from __future__ import annotations

import gc
import time
from typing import Optional, Sequence

import torch

from sap_ds.evaluation.generation import Generation, encode_prompts, eos_ids, finished
from sap_ds.evaluation.runtime import is_main

VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
VLLM_MISSING = ("backend '{asked}' needs the vllm package, which is not installed: pip install 'sap-ds[vllm]' "
                "(CUDA machines only), or set backend: device_map (transformers over the node's GPUs) or hf")


def import_vllm():
    from sap_ds.errors import ConfigError

    try:
        import vllm
    except ImportError:
        raise ConfigError(VLLM_MISSING.format(asked="vllm")) from None
    return vllm


def engine_arguments(source, cfg, dtype: str, gpus: int) -> dict:
    """``vllm.LLM``'s keyword arguments for this model and eval config."""
    arguments = dict(model=str(source.path), tokenizer=str(source.tokenizer_path),
                     tensor_parallel_size=cfg.tensor_parallel_size or max(1, gpus), dtype=VLLM_DTYPES[dtype],
                     seed=cfg.seed, trust_remote_code=False, gpu_memory_utilization=cfg.vllm.gpu_memory_utilization)
    if cfg.vllm.max_model_len is not None:
        arguments["max_model_len"] = cfg.vllm.max_model_len
    if source.adapter is not None:
        arguments.update(enable_lora=True, max_lora_rank=source.lora_rank or 16)
    return arguments


class VllmBackend:
    name = "vllm"

    def __init__(self, source, tokenizer, cfg, dtype: str):
        vllm = import_vllm()
        from transformers import GenerationConfig

        self.vllm, self.tokenizer = vllm, tokenizer
        arguments = engine_arguments(source, cfg, dtype, torch.cuda.device_count())
        self.tensor_parallel_size = arguments["tensor_parallel_size"]
        self.lora = None
        if source.adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(source.adapter))
        try:
            generation_config = GenerationConfig.from_pretrained(source.path)
        except OSError:  # no generation_config.json: the tokenizer's eos only
            generation_config = None
        self.stops = eos_ids(generation_config, tokenizer)
        self.llm = vllm.LLM(**arguments)

    def _run(self, prompt_ids: Sequence[Sequence[int]], params) -> list:
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params,
                                    lora_request=self.lora, use_tqdm=is_main())
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
        return outputs

    def generate(self, texts: Sequence[str], settings, *, seed: int = 0, max_new_tokens: Optional[int] = None,
                 desc: str = "generate", stats=None) -> list[Generation]:
        sampling = dict(temperature=settings.temperature, top_p=settings.top_p) if settings.do_sample else dict(temperature=0.0)
        params = self.vllm.SamplingParams(max_tokens=max_new_tokens or settings.max_new_tokens, seed=seed,
                                          stop_token_ids=self.stops, **sampling)
        began = time.perf_counter()
        outputs = self._run(encode_prompts(self.tokenizer, texts), params)
        answers = []
        for output in outputs:
            tokens = finished(list(output.outputs[0].token_ids), self.stops)
            answers.append(Generation(self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens)))
        if stats is not None:
            stats.seconds += time.perf_counter() - began
            stats.tokens += sum(a.n_tokens for a in answers)
        return answers

    def response_nll(self, items: Sequence, batch_size: int) -> list[tuple[float, int]]:
        """Per example: summed cross-entropy of its response tokens and their count, from
        vLLM's prompt log-probabilities (``batch_size`` is vLLM's business)."""
        from sap_ds.data import IGNORE_INDEX

        params = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self._run([item.input_ids for item in items], params)
        out = []
        for item, output in zip(items, outputs):
            nll, count = 0.0, 0
            for position, (token, label) in enumerate(zip(item.input_ids, item.labels)):
                if position == 0 or label == IGNORE_INDEX:
                    continue  # vLLM has no log-probability for the first token; prompt tokens are masked
                nll -= output.prompt_logprobs[position][token].logprob
                count += 1
            out.append((nll, count))
        return out

    def close(self) -> None:
        """Free the engine before a judge loads. vLLM keeps its tensor-parallel group
        alive after the engine object goes, so it is torn down too (where this vLLM has
        the functions); lower ``vllm.gpu_memory_utilization`` if a judge still finds the
        GPUs full."""
        self.llm = None
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
        except ImportError:
            pass
        else:
            destroy_model_parallel()
            destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
