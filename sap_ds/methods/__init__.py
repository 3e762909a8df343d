"""Training methods over the shared loop: one module per method (``base.Method``).

``METHODS`` maps the config's ``method:`` value to its class; ``RunConfig.method``
accepts exactly these names (tests/test_methods.py checks that the two agree).
"""
from __future__ import annotations

from sap_ds.methods.base import Method
from sap_ds.methods.lisa import LisaMethod
from sap_ds.methods.safety_mix import SafetyMixMethod
from sap_ds.methods.sap import SapMethod
from sap_ds.methods.sft import SftMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (SftMethod, SapMethod, LisaMethod, SafetyMixMethod)}


def build_method(cfg) -> Method:
    """The method object for ``cfg.method`` (validated by the config already)."""
    try:
        return METHODS[cfg.method](cfg)
    except KeyError:
        raise ValueError(f"unknown method '{cfg.method}'; valid: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Method", "build_method"]
