"""Export the trained model as plain Hugging Face folders (safetensors).

ZeRO-3 holds every weight in shards, so the 16-bit weights are gathered to rank 0
(DeepSpeed's consolidated state dict), loaded into a CPU copy of the same architecture
and saved. LoRA runs write the adapter (``adapter/``) and, by default, the merged model
(``model/``); full fine-tuning writes ``model/``. Both load with
``AutoModelForCausalLM.from_pretrained`` and no sap-ds code. With ``export.safelora`` the
adapter is projected before the merge (``sap_ds/methods/safelora.py``): ``adapter/`` and
``model/`` hold the projected update, ``adapter_unprojected/`` the trained one and
``safelora.json`` the per-layer report. The SAP probe is a training-time device and is not
part of the exported model; the method saves it beside it as ``probe.safetensors`` for
analysis (``Method.save_beside_export``). ``export.keep_probe`` writes it into the model as
the authors' code leaves it: ``mlp.down_proj.bias`` of the probe layers, other biases 0
(``Method.export_transform``: ``sap_ds.sap.probe.with_probe_as_bias``).
"""
from __future__ import annotations

from pathlib import Path

from sap_ds.files import atomic_folder
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
    with atomic_folder(target, if_exists="replace") as tmp:  # (it makes the run folder too: export before any step)
        _save_models(trainer, state, tmp)


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
    trainer.method.save_beside_export(tmp)  # SAP's probe.safetensors
