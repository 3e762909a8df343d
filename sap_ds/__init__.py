"""sap-ds: Safety-Aware Probing fine-tuning on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
