"""What a step costs: a model's numbers, FLOPs, the machine (its peak, what it is), per-step MFU and the planner."""
