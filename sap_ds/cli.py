"""``sap-ds <command>``: one console script, a subcommand per job."""
from __future__ import annotations

import sys

COMMANDS = {
    "train": ("sap_ds.train", "fine-tune (SFT, SAP, Lisa or safety_mix: method=...); also: deepspeed sap_ds/train.py --config ..."),
    "eval": ("sap_ds.eval", "harmful score and task metrics of one model (docs/evaluation.md)"),
    "compare": ("sap_ds.experiments.compare", "methods from one model (SFT, SAP, Lisa, Booster, ...): train each, evaluate, table + plot"),
    "sweep": ("sap_ds.experiments.sweep", "train + evaluate a grid/random search over config keys and seeds; Pareto front"),
    "attack": ("sap_ds.experiments.attack", "re-attack a model (harmful-only / poisoned fine-tunes over an lr x steps grid): bounded worst case"),
    "bench": ("sap_ds.bench", "throughput of SFT vs SAP variants (tokens/s, phase split, MFU, memory)"),
    "safelora": ("sap_ds.methods.safelora_cli", "project a LoRA adapter onto the alignment subspace (SafeLoRA), post hoc"),
    "plan": ("sap_ds.cost.plan", "per-GPU memory and step time for a model size and cluster"),
    "configs": ("sap_ds.configs_cli", "list the shipped configs; print one's path; copy one out to edit; copy the SLURM templates out"),
    "data": ("sap_ds.data_cli", "the run's data as training sees it: counts, examples with the trained tokens marked"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        from sap_ds.version import version_line

        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: sap-ds <command> [args]   (sap-ds --version: version and commit)\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsap-ds: error: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
