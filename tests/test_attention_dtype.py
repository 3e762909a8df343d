"""model.dtype and model.attn_implementation together: flash-attention kernels take fp16/bf16
only, so fp32 with flash_attention_2 is refused when the config is validated, naming both
keys, and not at the first forward (issue 31, item 6). Pure Python: flash-attn is not
installed here, and the refusal must not depend on it."""
from __future__ import annotations

import importlib.util

import pytest

from sap_ds.config.run import build_config
from sap_ds.errors import ConfigError

TREE = {"model": {"path": "embedded"}, "data": {"train": [{"path": "data/gsm8k/train.jsonl", "format": "gsm8k"}]},
        "method": "sft"}


def test_fp32_with_flash_attention_2_is_refused_naming_both_keys():
    assert importlib.util.find_spec("flash_attn") is None, "the point: refused before anyone asks for flash-attn"
    with pytest.raises(ConfigError) as info:
        build_config(TREE, ["model.dtype=fp32", "model.attn_implementation=flash_attention_2"], source="cfg.yaml")
    message = str(info.value)
    assert "model.dtype" in message and "model.attn_implementation" in message, message
    assert "bf16" in message and "sdpa" in message, message  # what would be valid


@pytest.mark.parametrize("dtype,attn", [("bf16", "flash_attention_2"), ("fp32", "sdpa"), ("fp32", "eager")])
def test_the_other_combinations_validate(dtype, attn):
    cfg = build_config(TREE, [f"model.dtype={dtype}", f"model.attn_implementation={attn}"], source="cfg.yaml")
    assert (cfg.model.dtype, cfg.model.attn_implementation) == (dtype, attn)
