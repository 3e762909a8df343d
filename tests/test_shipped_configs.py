"""Every file under configs/ runs: its first step on 2 CPU ranks for each run config, the runs a
compare config would launch validated (and the distinct ones run), every sweep point validated, each eval config
evaluated on the tiny model, all from a working directory outside the checkout and by the
configs' shipped names (tests/support/shipped_configs_runner.py: one launch for all of them).

A new config is covered by being there: the parameters are the glob of configs/. The only
changes from a user's run are the overrides a test must make (one step, fp32, the CPU
DeepSpeed config; a tiny random Llama and a stand-in data file where the config names a
model or a file that is not here, after checking that the user is told which override to
pass for each). The same module checks what an installed package ships."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.launch import free_port
from tests.support.repo import REPO

sys.path.insert(0, str(REPO))
from sap_ds.resources import config_name, shipped_configs  # noqa: E402

CONFIGS = [config_name(p) for p in shipped_configs()]
DEEP_LAYERS = 12  # enough for the probe layers the shipped configs name ([3, 9])


def _deep_tiny_model(folder: Path, tiny: Path) -> Path:
    """tiny-random's architecture and tokenizer with more layers: the stand-in for the
    configs' model paths that are not here (a Llama like theirs, cheap on a CPU)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny)
    config.num_hidden_layers = DEEP_LAYERS
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return folder


def _alpaca_stand_in(path: Path, rows: int = 2000) -> Path:
    """An alpaca-format file (instruction, input, output) from the shipped 175 seed tasks,
    repeated to ``rows``: the paper config's /path/to/alpaca_data.json takes 2,000."""
    seeds = [json.loads(line) for line in (REPO / "data" / "alpaca" / "seed_tasks.jsonl").read_text().splitlines()]
    items = [{"instruction": f"{s['instruction']} ({i})", "input": s["instances"][0]["input"],
              "output": s["instances"][0]["output"]} for i, s in ((i, seeds[i % len(seeds)]) for i in range(rows))]
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tiny_model_path):
    work = tmp_path_factory.mktemp("shipped")
    elsewhere = work / "elsewhere"  # the working directory: not the checkout
    elsewhere.mkdir()
    model = _deep_tiny_model(work / f"tiny-llama-{DEEP_LAYERS}", tiny_model_path)
    alpaca = _alpaca_stand_in(work / "alpaca_data.json")
    results = work / "results.json"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "tests" / "support" / "shipped_configs_runner.py"),
           "--results", str(results), "--model", str(model), "--alpaca", str(alpaca)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1500)
        output = proc.stdout[-6000:] + proc.stderr[-6000:]
    except subprocess.TimeoutExpired as exc:
        output = f"timed out after {exc.timeout} s"
    found = json.loads(results.read_text()) if results.is_file() else {}
    return found, output, elsewhere


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_runs(name, shipped):
    results, output, _ = shipped
    assert name in results, f"{name}: the runner never reached it:\n{output}"
    result = results[name]
    assert result["status"] == "ok", f"{name}: {result['error']}\n{result['traceback']}"
    assert result["checks"]


def test_runs_wrote_to_the_working_directory(shipped):
    """Outputs resolve against the working directory (runs/<name> there), inputs against the
    config files: nothing is written next to the configs."""
    results, _, elsewhere = shipped
    assert (elsewhere / "runs" / "tiny" / "summary.json").is_file()
    assert (elsewhere / "runs" / "align" / "export" / "model").is_dir()  # the demo's start model, as `make demo` makes it
    assert not (REPO / "configs" / "runs").exists()


# --------------------------------------------------------------------------- installed


def test_wheel_ships_configs_ds_configs_and_data(tmp_path):
    """``pip install .`` (a wheel, not a checkout): the package carries the configs,
    DeepSpeed configs and data under sap_ds/shipped/ with the checkout's layout, and the
    build records the commit for ``sap-ds --version``; installed, ``--config demo`` resolves
    to the packaged file and its data paths to the packaged data, from any folder."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PIP_NO_INDEX": "1"})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("sap_ds-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*(REPO / "configs").rglob("*"), *(REPO / "ds_configs").glob("*.json"), *(REPO / "data").rglob("*")]:
        if path.is_file():
            assert f"sap_ds/shipped/{path.relative_to(REPO).as_posix()}" in names, path
    assert "sap_ds/_build_info.json" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import json, sap_ds, sap_ds.cli as c; from sap_ds.config.run import load_config; cfg = load_config('demo'); "
             "print(json.dumps([sap_ds.__file__, cfg.data.train[0].path, cfg.deepspeed_config]))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, data, ds = json.loads(proc.stdout.strip().splitlines()[-1])
    assert package.startswith(str(site)) and data.startswith(str(site / "sap_ds" / "shipped" / "data"))
    assert Path(data).is_file() and Path(ds).is_file() and ds.startswith(str(site))
    version = subprocess.run([sys.executable, "-m", "sap_ds.cli", "--version"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=120)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert version.returncode == 0 and version.stdout.split()[:2] == ["sap-ds", "0.1.0"], version.stdout + version.stderr
    assert commit[:12] in version.stdout
