"""The model: loading (and LoRA), the embedded default model, and the forward passes and losses."""
