"""Safety-Aware Probing: the probe, its update, the step on ZeRO-3 shards, and its precision checks."""
