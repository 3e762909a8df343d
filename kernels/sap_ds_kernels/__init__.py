"""Fused kernels over flat ZeRO-3 shards, each with a PyTorch twin; see docs/kernels.md.

Importing this package never imports triton: kernels are built on first use.

The import name is ``sap_ds_kernels``, never ``kernels``: that is Hugging Face's PyPI
package, which transformers depends on; two packages installing ``site-packages/kernels/``
overwrite each other. The source stays in the repository's ``kernels/`` folder
(``kernels/sap_ds_kernels/``; setup.py maps it), which has no ``__init__.py`` so that a
repository root on ``sys.path`` does not shadow Hugging Face's package.
"""
from .dispatch import (BACKENDS, N_STATS, choose_backend, perturb_from_master, perturbation_stats, restore_from_master,
                       sumsq)

__all__ = ["BACKENDS", "N_STATS", "choose_backend", "perturb_from_master", "perturbation_stats", "restore_from_master",
           "sumsq"]
