"""Training methods over the shared loop: one module per method (``base.Method``).

``METHODS`` maps the config's ``method:`` value to its class: one per entry of the
registry, ``sap_ds.config.methods.METHOD_SECTIONS``, whose section names the class
(``MethodSection.implementation``), so that a new method is registered in one place
(tests/test_methods.py checks that each class's name is its entry's).
"""
from __future__ import annotations

import importlib

from sap_ds.config.methods import METHOD_SECTIONS
from sap_ds.methods.base import ExtraPasses, Method


def _method_class(implementation: str) -> type[Method]:
    module, _, name = implementation.partition(":")
    return getattr(importlib.import_module(module), name)


METHODS: dict[str, type[Method]] = {name: _method_class(section.implementation)
                                     for name, section in METHOD_SECTIONS.items()}


def all_phases() -> tuple[str, ...]:
    """Every phase any method times (``Method.phases``), each method's own first, then the
    main pass every step ends with: the columns of the bench's records and of the run report,
    so that runs of different methods line up (a phase a method does not run is 0)."""
    own = (p for m in METHODS.values() for p in m.phases if p not in Method.phases)
    return (*dict.fromkeys(own), *Method.phases)


def build_method(cfg) -> Method:
    """The method object for ``cfg.method`` (validated by the config already)."""
    try:
        return METHODS[cfg.method](cfg)
    except KeyError:
        raise ValueError(f"unknown method '{cfg.method}'; valid: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "ExtraPasses", "Method", "all_phases", "build_method"]
