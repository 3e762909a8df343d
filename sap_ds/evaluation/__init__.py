"""Evaluation of fine-tuned models: harmful score on held-out harmful prompts, task
metrics (GSM8K / SST-2 accuracy, held-out test loss), and the SFT-vs-SAP comparison.

Modules: ``config`` (the typed eval config), ``prompts`` (harmful prompt files),
``generation`` (batched, rank-sharded greedy decoding), ``scorers`` (refusal matcher and
moderation classifiers), ``tasks`` (task metrics), ``output`` (JSON + markdown reports).
"""
