"""The kernels' import name: ``sap_ds_kernels``, never ``kernels``.

Hugging Face's PyPI package ``kernels`` is a dependency of transformers (5.25 on). sap-ds's
kernels used to be a top-level package ``kernels`` too: installed, both wrote
``site-packages/kernels/``; with the repository root on sys.path (pytest, ``python
sap_ds/train.py``), the repository's ``kernels/__init__.py`` shadowed Hugging Face's. The
installed case is tested by tests/test_user_install.py; these test the checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_repository_root_does_not_shadow_hf_kernels(tmp_path):
    # a stand-in for Hugging Face's package, installed after the repository root on sys.path
    (tmp_path / "site" / "kernels").mkdir(parents=True)
    (tmp_path / "site" / "kernels" / "__init__.py").write_text("HUGGING_FACE = True\n")
    code = (f"import json, sys; sys.path[:0] = [{str(REPO)!r}, {str(tmp_path / 'site')!r}]\n"
            "import sap_ds.sap.step, sap_ds_kernels, kernels\n"
            "print(json.dumps({'kernels': kernels.__file__, 'hf': getattr(kernels, 'HUGGING_FACE', False),"
            " 'sap_ds_kernels': sap_ds_kernels.__file__}))")
    found = _python(code, tmp_path)
    assert found["hf"] and found["kernels"] == str(tmp_path / "site" / "kernels" / "__init__.py")
    assert found["sap_ds_kernels"] == str(REPO / "kernels" / "sap_ds_kernels" / "__init__.py")
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_a_checkout_imports_its_own_kernels(tmp_path):
    """From a checkout's root (here a copy of sap_ds/ and kernels/, so an installed sap-ds cannot
    answer instead), sap_ds and sap_ds_kernels both come from that checkout."""
    checkout = tmp_path / "checkout"
    for folder in ("sap_ds", "kernels"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__", "shipped"))
    code = ("import json, sap_ds.sap.step, sap_ds_kernels\n"
            "print(json.dumps({'sap_ds': sap_ds.__file__, 'sap_ds_kernels': sap_ds_kernels.__file__}))")
    found = _python(code, checkout)
    assert found == {"sap_ds": str(checkout / "sap_ds" / "__init__.py"),
                     "sap_ds_kernels": str(checkout / "kernels" / "sap_ds_kernels" / "__init__.py")}
