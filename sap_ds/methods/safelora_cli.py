"""``sap-ds safelora``: project an exported LoRA adapter with SafeLoRA, post hoc.

Works on any peft LoRA folder (an SFT or SAP run's ``export/adapter``, or another tool's):
``sap-ds safelora --adapter runs/demo/export/adapter --base embedded
--aligned runs/align/export/model --out runs/demo_safelora [--merge]``. Writes
``OUT/adapter/`` (the projected adapter), ``OUT/safelora.json`` (the per-layer report) and,
with ``--merge``, ``OUT/model/`` (the projected adapter merged into ``--model``, by default
the aligned model, which is the model a SafeLoRA adapter was fine-tuned from). ``OUT`` is
written to a temporary folder and renamed into place; an existing ``OUT`` is an error.
Exit codes: 0 done, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

from sap_ds.entry import run_command
from sap_ds.files import atomic_folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sap-ds safelora", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="peft LoRA folder (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--base", required=True, help="the unaligned base model: folder, or 'embedded' / 'tiny-random'")
    parser.add_argument("--aligned", required=True, help="the aligned model made from --base (folder or name)")
    parser.add_argument("--out", required=True, help="new output folder (adapter/, safelora.json, model/ with --merge)")
    parser.add_argument("--select", choices=("number", "threshold"), default="number",
                        help="'number': the --num-layers layers of lowest cosine (default, as IBM/SafeLoRA); "
                             "'threshold': every layer with cosine <= --threshold")
    parser.add_argument("--threshold", type=float, default=0.5, help="cosine threshold (default 0.5)")
    parser.add_argument("--num-layers", type=int, default=10, help="layers to project with --select number (default 10)")
    parser.add_argument("--projection", choices=("published", "orthogonal"), default="published",
                        help="'published': C = V V^T / ||V||_F (default); 'orthogonal': the projector onto V's columns")
    parser.add_argument("--merge", action="store_true", help="also write OUT/model: the projected adapter merged into --model")
    parser.add_argument("--model", default=None, help="model to merge into (default: --aligned)")
    parser.add_argument("--device", default="cpu", help="device for the fp32 arithmetic (default cpu)")
    args = parser.parse_args(argv)
    if args.num_layers < 0:
        parser.error(f"--num-layers: {args.num_layers} is negative; give 0 or more")
    return args


def merge_into(model_dir: Path, adapter_dir: Path, out: Path) -> None:
    """``model_dir`` with the adapter merged (its own dtype), saved with its tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    except (OSError, ValueError):  # a model folder without tokenizer files: the weights still load
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: project_adapter(args))


def project_adapter(args) -> int:
    from sap_ds.methods.safelora import SafeLoraError, apply_safelora, resolve_model_folder, summary_line

    out = Path(args.out)
    if out.exists():
        raise SafeLoraError(f"--out: '{out}' already exists; give a new folder (nothing was written)")
    model_dir = resolve_model_folder(args.model or args.aligned, "--model" if args.model else "--aligned")
    cfg = SimpleNamespace(select=args.select, threshold=args.threshold, num_layers=args.num_layers,
                          projection=args.projection)
    with atomic_folder(out) as tmp:
        report = apply_safelora(args.adapter, args.base, args.aligned, tmp / "adapter", cfg,
                                report_path=tmp / "safelora.json", device=args.device, keys=("--adapter", "--base", "--aligned"))
        if args.merge:
            merge_into(model_dir, tmp / "adapter", tmp / "model")
    print(f"sap-ds safelora: {summary_line(report)}; written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
