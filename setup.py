"""sap-ds: Safety-Aware Probing fine-tuning on DeepSpeed ZeRO-3.

torch is a range, never a pin: on a CPU machine the Makefile installs the CPU
build first, and pip then leaves it alone instead of pulling a CUDA wheel.
"""
from setuptools import find_packages, setup

setup(
    name="sap-ds",
    version="0.1.0",
    description="Safety-Aware Probing (SAP) fine-tuning for LLMs on DeepSpeed ZeRO-3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sap_ds", "sap_ds.*", "kernels", "kernels.*"]),
    include_package_data=True,
    install_requires=[
        # Floors: the first release with what sap-ds uses (sap_ds/versions.py says what, and checks them at start).
        "torch>=2.6,<2.15",
        "deepspeed>=0.19.6,<0.20",
        "transformers>=4.56,<6",
        "peft>=0.13",
        "datasets>=3.0",
        "pydantic>=2.5,<3",
        "PyYAML>=6",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "gguf>=0.10",
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "vllm": ["vllm>=0.6"],  # sap-ds eval backend: vllm (CUDA only); docs/evaluation.md
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": ["sap-ds=sap_ds.cli:main"]},
)
