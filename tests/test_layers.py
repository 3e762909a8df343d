"""The house's layer rules hold (.importlinter), and the check would catch a break.

import-linter reads every import in sap_ds (module-level and inside functions) and checks two
contracts: the layers, from the front doors (cli, train, eval, bench, ...) down to the foundation
(errors, version, ...), where a module imports only from its own layer or lower ones; and no import
cycle between sibling modules or packages at any depth. The second test proves the check is not
vacuous: the same contracts on a copy of sap_ds with one upward import added must fail, naming it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the repository's contracts, on the sap_ds package found under ``root``."""
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(REPO / ".importlinter"), "--no-cache"],
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)


def test_the_layer_contracts_hold():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    copy = tmp_path / "sap_ds"
    shutil.copytree(REPO / "sap_ds", copy, ignore=shutil.ignore_patterns("__pycache__", "shipped"))
    low = copy / "parallel" / "collectives.py"
    low.write_text(low.read_text() + "\n\ndef _upward():\n    from sap_ds.training import trainer  # noqa: F401\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "sap_ds.parallel.collectives -> sap_ds.training.trainer" in proc.stdout, proc.stdout[-4000:]


def test_an_import_cycle_breaks_the_acyclic_contract(tmp_path):
    copy = tmp_path / "sap_ds"
    shutil.copytree(REPO / "sap_ds", copy, ignore=shutil.ignore_patterns("__pycache__", "shipped"))
    # evaluation/safety.py imports evaluation/scorers.py: scorers importing safety back closes a cycle
    low = copy / "evaluation" / "scorers.py"
    low.write_text(low.read_text() + "\n\ndef _cycle():\n    from sap_ds.evaluation import safety  # noqa: F401\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout, proc.stdout[-4000:]
