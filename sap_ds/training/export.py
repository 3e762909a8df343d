"""Export the trained model as plain Hugging Face folders (safetensors).

ZeRO-3 holds every weight in shards, so the 16-bit weights are gathered to rank 0
(DeepSpeed's consolidated state dict), loaded into a CPU copy of the same architecture
and saved. LoRA runs write the adapter (``adapter/``) and, by default, the merged model
(``model/``); full fine-tuning writes ``model/``. Both load with
``AutoModelForCausalLM.from_pretrained`` and no sap-ds code. With ``export.safelora`` the
adapter is projected before the merge (``sap_ds/methods/safelora.py``): ``adapter/`` and
``model/`` hold the projected update, ``adapter_unprojected/`` the trained one and
``safelora.json`` the per-layer report. The SAP probe is a
training-time device and is not part of the exported model; it is saved beside it as
``probe.safetensors`` for analysis. ``export.keep_probe`` writes it into the model as
the authors' code leaves it: ``mlp.down_proj.bias`` of the probe layers (other biases 0).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sap_ds.model.loading import DTYPES
from sap_ds.parallel.distributed import barrier, is_main


def export_model(trainer) -> Path:
    """Collective: every rank calls it; rank 0 writes ``<output_dir>/export``."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    cfg = trainer.cfg
    state = trainer.engine._zero3_consolidated_16bit_state_dict()  # collective gather to rank 0
    target = trainer.out / "export"
    if is_main():
        unset_hf_deepspeed_config()  # a plain CPU model, not one partitioned by zero.Init
        try:
            _write_export(trainer, state, target)
        finally:
            set_hf_deepspeed_config(trainer._hf_ds)
    barrier()
    return target / "model" if (not cfg.lora.enabled or cfg.export.merge_lora) else target / "adapter"


def _write_export(trainer, state: dict, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)  # the run folder may not exist yet (export before any step)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        _save_models(trainer, state, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _save_models(trainer, state: dict, tmp: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = trainer.cfg
    config = AutoConfig.from_pretrained(trainer.model_path, trust_remote_code=cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.model.dtype])
    if cfg.lora.enabled:
        from sap_ds.model.loading import apply_lora

        model = apply_lora(model, cfg.lora)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    if cfg.lora.enabled:
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        if cfg.export.safelora.enabled:
            from sap_ds.methods.safelora import project_export

            project_export(model, tmp, cfg)  # adapter/ projected, adapter_unprojected/, safelora.json
        if cfg.export.merge_lora:
            model = model.merge_and_unload()
    if not cfg.lora.enabled or cfg.export.merge_lora:
        model = trainer.method.export_transform(trainer, model)  # SAP's export.keep_probe
        model.save_pretrained(tmp / "model", safe_serialization=True)
        trainer.tokenizer.save_pretrained(tmp / "model")
    if trainer.sap_state is not None:
        save_file({"probe": trainer.sap_state.probe.vectors.detach().cpu().contiguous(),
                   "layers": torch.tensor(trainer.sap_state.probe.layers)}, str(tmp / "probe.safetensors"))


def with_probe_as_bias(model, probe):
    """The same model with ``config.mlp_bias`` on: zero MLP biases except ``down_proj`` of
    the probe layers, which holds the probe vector. A block's output is ``h + mlp(...)``,
    so a bias on its last projection adds the vector to the block's output, as the hook
    does in training. Only architectures whose config has ``mlp_bias`` (Llama family)."""
    from transformers import AutoModelForCausalLM

    from sap_ds.sap.probe import find_decoder_layers

    config = model.config
    if not hasattr(config, "mlp_bias"):
        raise ValueError(f"export.keep_probe: {type(model).__name__} has no mlp_bias option to hold the probe; "
                         "set export.keep_probe false (the probe is saved as probe.safetensors either way)")
    config = config.__class__.from_dict(config.to_dict())
    config.mlp_bias = True
    biased = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = biased.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".bias") and not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"export.keep_probe: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    biased.tie_weights()
    blocks = find_decoder_layers(biased)
    with torch.no_grad():
        for name, param in biased.named_parameters():
            if name.endswith(".bias") and ".mlp." in name:
                param.zero_()
        for index, layer in enumerate(probe.layers):
            blocks[layer].mlp.down_proj.bias.copy_(probe.vectors[index].detach().to(blocks[layer].mlp.down_proj.bias))
    return biased
