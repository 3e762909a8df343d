"""What a step costs: a model's numbers, FLOPs, the machine's peak, per-step MFU and the planner."""
