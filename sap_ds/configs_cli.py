"""``sap-ds configs [path NAME | copy NAME [DEST] | slurm [DEST]]``: the configs shipped with sap-ds.

``sap-ds configs`` lists them (name, kind, first line of the file's comment); any command
takes a name where it takes a config (``sap-ds train --config demo``). ``path`` prints
where the file is; ``copy`` writes a self-contained copy to edit: the file with its
``base:`` chain merged in and its relative paths made absolute (they are relative to the
shipped file's folder, so a verbatim copy elsewhere would not find its data), under a
header saying where it came from. A user's config can also start from a shipped one with
``base: demo`` and list only what it changes. ``slurm`` writes the sbatch templates and their
``common.sh`` into ``DEST/slurm/``, so that ``sbatch slurm/sap_single_node.sbatch`` works
from DEST after a pip install as it does from a checkout's root (slurm/README.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sap_ds.entry import run_command

KINDS = ("run", "eval", "compare", "sweep", "attack", "bench")


def config_kind(path: Path, tree: dict) -> str:
    """What a config file is for, from its keys (and an ``eval/`` folder)."""
    if "points" in tree or "grid" in tree:
        return "sweep"
    if "attacks" in tree:
        return "attack"
    if "train_config" in tree:
        return "compare"
    if "bench" in tree:
        return "bench"
    if path.parent.name == "eval" or ({"harmful", "tasks", "scorer"} & set(tree) and "data" not in tree):
        return "eval"
    return "run"


def schema_for(kind: str):
    if kind == "eval":
        from sap_ds.evaluation.config import EvalConfig

        return EvalConfig
    if kind == "compare":
        from sap_ds.experiments.compare import CompareConfig

        return CompareConfig
    if kind == "sweep":
        from sap_ds.experiments.sweep_config import SweepConfig

        return SweepConfig
    if kind == "attack":
        from sap_ds.experiments.attack_config import AttackConfig

        return AttackConfig
    from sap_ds.config.run import RunConfig

    return RunConfig


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            if text:
                return text
        elif line.strip():
            break
    return ""


def list_configs() -> list[tuple[str, str, str]]:
    from sap_ds.config.reading import read_config_file
    from sap_ds.resources import config_name, shipped_configs

    rows = []
    for path in shipped_configs():
        rows.append((config_name(path), config_kind(path, read_config_file(path)), _first_comment(path)))
    return rows


def copy_config(name: str, dest: Path, force: bool = False) -> Path:
    import yaml

    from sap_ds.config.reading import find_config_file, read_config_file
    from sap_ds.errors import ConfigError

    source = find_config_file(name)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not force:
        raise ConfigError(f"{dest} exists; give another destination or --force")
    kind = config_kind(source, read_config_file(source))
    tree = read_config_file(source, schema=schema_for(kind))
    header = "\n".join(f"# {line}" if line else "#" for line in (
        f"Copied from the shipped config '{name}' ({source}) by `sap-ds configs copy`:",
        "its base: chain is merged in and its paths are absolute. Edit freely; relative paths",
        "you add are relative to this file's folder (output_dir and model.path: to where you run).",
        "", *[line[2:] if line.startswith("# ") else line[1:] for line in source.read_text(encoding="utf-8").splitlines()
              if line.startswith("#")][:12]))
    dest.write_text(header + "\n" + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return dest


def copy_slurm_templates(dest: Path, force: bool = False) -> Path:
    """The shipped slurm/ folder (templates, common.sh, README.md) as ``dest/slurm``."""
    import shutil

    from sap_ds.errors import ConfigError
    from sap_ds.resources import slurm_dir

    source, target = slurm_dir(), dest / "slurm"
    files = sorted(p for p in source.iterdir() if p.suffix in (".sbatch", ".sh", ".md"))
    clashes = [str(target / p.name) for p in files if (target / p.name).exists()]
    if clashes and not force:
        raise ConfigError(f"{', '.join(clashes)} exist; give another destination or --force")
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, target / path.name)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sap-ds configs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action")
    show = sub.add_parser("path", help="print the file of a shipped config")
    show.add_argument("name")
    copy = sub.add_parser("copy", help="write a self-contained copy of a shipped config")
    copy.add_argument("name")
    copy.add_argument("dest", nargs="?", default=".", help="file or folder (default: the working directory)")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    slurm = sub.add_parser("slurm", help="write the SLURM templates and common.sh to DEST/slurm/")
    slurm.add_argument("dest", nargs="?", default=".", help="folder to submit jobs from (default: the working directory)")
    slurm.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    return run_command(lambda: act(args))


def act(args) -> int:
    if args.action is None:
        rows = list_configs()
        width = max(len(name) for name, _, _ in rows)
        for name, kind, about in rows:
            print(f"{name:<{width}}  {kind:<7}  {about}")
        print("\nUse a name wherever a config is expected (sap-ds train --config demo); "
              "sap-ds configs copy NAME writes one out to edit.")
    elif args.action == "path":
        from sap_ds.config.reading import find_config_file

        print(find_config_file(args.name).resolve())
    elif args.action == "slurm":
        target = copy_slurm_templates(Path(args.dest), args.force)
        print(f"sap-ds configs: wrote the SLURM templates to {target}; submit from {target.parent}, e.g. "
              f"sbatch slurm/sap_single_node.sbatch (see {target / 'README.md'})")
    else:
        print(f"sap-ds configs: wrote {copy_config(args.name, Path(args.dest), args.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
