"""Fused kernels over flat ZeRO-3 shards, each with a PyTorch twin; see docs/kernels.md.

Importing this package never imports triton: kernels are built on first use.
"""
from .dispatch import (BACKENDS, N_STATS, choose_backend, perturb_from_master, perturbation_stats, restore_from_master,
                       sumsq)

__all__ = ["BACKENDS", "N_STATS", "choose_backend", "perturb_from_master", "perturbation_stats", "restore_from_master",
           "sumsq"]
