"""Evaluation of fine-tuned models: harmful score on held-out harmful prompts, over-refusal
on benign ones, task metrics (GSM8K / SST-2 accuracy, held-out test loss), and the
SFT-vs-SAP comparison.

Modules: ``config`` (the typed eval config), ``prompts`` (prompt files), ``adapters``
(model or LoRA adapter folder), ``backends`` (hf / device_map / vllm, and the choice
between them), ``vllm_backend`` (the only module importing vllm), ``generation``
(prompt rendering and batched, rank-sharded greedy decoding), ``scorers`` (refusal
matcher), ``judges`` (the judge registry: refusal matcher, XSTest rule, moderation
classifiers and generative judges), ``judge_presets`` (published judges' prompt and
verdict formats), ``safety`` (harmful score and over-refusal), ``xstest`` (XSTest over-refusal, the authors' rule beside the
matcher), ``coherence`` (empty, degenerate and off-language answers), ``tasks`` (task
metrics), ``output`` (JSON + markdown reports).
"""
