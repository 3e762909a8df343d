"""sap-ds: Safety-Aware Probing fine-tuning on DeepSpeed ZeRO-3."""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# The fused kernels are the package ``sap_ds_kernels``, kept in the repository's kernels/ folder
# (kernels/sap_ds_kernels/; setup.py maps it for an install). When sap_ds is imported from a checkout
# (``python sap_ds/train.py``, ``python -m sap_ds.train`` or pytest from the repository root, with or
# without an install), that folder goes first on sys.path, so the checkout's own kernels are imported.
# It holds nothing but sap_ds_kernels/, so it shadows nothing; in an installed (non-editable) package
# there is no such folder next to sap_ds and sys.path is left alone.
_CHECKOUT_KERNELS = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
_IN_CHECKOUT = _os.path.isfile(_os.path.join(_CHECKOUT_KERNELS, "sap_ds_kernels", "__init__.py"))
if _IN_CHECKOUT and _CHECKOUT_KERNELS not in _sys.path:
    _sys.path.insert(0, _CHECKOUT_KERNELS)
