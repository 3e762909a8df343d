"""The training loop and what it writes: checkpoints, resume rules, metrics, logs, export."""
