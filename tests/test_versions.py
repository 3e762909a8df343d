"""Version floors: setup.py and sap_ds/dependencies.py agree, and an old package is refused
with a message naming it, its installed version and the floor, before anything heavy loads."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sap_ds import dependencies as versions

REPO = Path(__file__).resolve().parents[1]


def fake(**installed):
    """A version lookup: the given versions, every other package at a recent release."""
    return lambda name: installed.get(name, "99.0")


def test_setup_py_states_the_same_floors():
    text = (REPO / "setup.py").read_text()
    for floor in versions.FLOORS:
        match = re.search(rf'"{floor.package}>=([0-9.]+)', text)
        assert match, f"setup.py has no floor for {floor.package}"
        assert match.group(1) == floor.minimum, floor.package
    assert '"torch>=2.6,<2.15"' in text  # the upper bound stays: the CPU machines rely on torch 2.13


def test_old_package_is_named_with_installed_version_and_floor():
    with pytest.raises(versions.VersionError) as info:
        versions.check_versions("train", fake(transformers="4.55.4", deepspeed="0.19.5"))
    msg = str(info.value)
    assert "transformers 4.55.4 is installed; sap-ds needs transformers>=4.56" in msg
    assert "deepspeed 0.19.5 is installed; sap-ds needs deepspeed>=0.19.6" in msg
    assert "pip install -U 'deepspeed>=0.19.6' 'transformers>=4.56'" in msg


def test_floor_versions_and_newer_pass():
    at_floor = {f.package: f.minimum for f in versions.FLOORS}
    versions.check_versions("train", lambda name: at_floor[name])
    versions.check_versions("train", fake(torch="2.13.0+cpu", triton="3.9.0", transformers="5.24.0rc1"))


def test_missing_required_package_is_an_error_but_triton_is_optional():
    versions.check_versions("train", lambda name: None if name == "triton" else "99.0")
    with pytest.raises(versions.VersionError, match="deepspeed is not installed"):
        versions.check_versions("train", lambda name: None if name == "deepspeed" else "99.0")


def test_eval_does_not_need_deepspeed():
    versions.check_versions("eval", fake(deepspeed="0.1.0", peft="0.1.0"))


@pytest.mark.parametrize("text, parsed", [("2.13.0+cpu", (2, 13, 0)), ("0.19.8", (0, 19, 8)),
                                          ("3.1.0rc1", (3, 1, 0)), ("2.14.0a0+git1234", (2, 14, 0))])
def test_parse_version(text, parsed):
    assert versions.parse_version(text) == parsed


def test_commands_refuse_before_importing_torch():
    """train/eval/bench main() with an old transformers: exit 2, the message, and torch,
    deepspeed and transformers never imported."""
    code = """
import importlib.metadata, sys
real = importlib.metadata.version
importlib.metadata.version = lambda name: "4.50.0" if name == "transformers" else real(name)
import importlib as il
for command in ("train", "eval", "bench"):
    module = il.import_module("sap_ds." + command)
    argv = ["--config", "none.yaml"] + (["--out", "x.json"] if command == "bench" else [])
    argv += ["--model", "m"] if command == "eval" else []
    assert module.main(argv) == 2, command
heavy = [m for m in ("torch", "deepspeed", "transformers") if m in sys.modules]
assert not heavy, heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("transformers 4.50.0 is installed; sap-ds needs transformers>=4.56") == 3
