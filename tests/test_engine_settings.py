"""Engine settings SAP cannot honour are refused before any rank starts, naming the key and
why (sap_ds/parallel/ds_config.py); the offloaded optimizer steps DeepSpeed's CPU Adam where it can
be built (decided without compiling anything); a DeepSpeed batch size no grad_accum gives
says so."""
from __future__ import annotations

import json
import types

import pytest

from sap_ds.config.run import load_config
from sap_ds.errors import ConfigError
from sap_ds.parallel import ds_config
from tests.support.repo import REPO

TINY = REPO / "configs" / "tiny.yaml"
SAP = ["method=sap"]


def _load(tmp_path, zero_extra=None, overrides=(), world_size=2, top=None):
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"].update(zero_extra or {})
    ds.update(top or {})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(TINY, [f"deepspeed_config={path}", *overrides])
    return ds_config.load_ds_config(cfg, world_size=world_size)


@pytest.mark.parametrize("key, value, why", [
    ("zero_hpz_partition_size", 8, "hpZ keeps a secondary copy"),
    ("zero_quantized_weights", True, "qwZ gathers the weights quantized"),
    ("mics_shard_size", 2, "MiCS shards each weight within a sub-group"),
])
def test_zero_plus_plus_and_mics_are_refused_for_sap_only(tmp_path, key, value, why):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, {key: value}, SAP)
    msg = str(info.value)
    assert f"'zero_optimization.{key}' is {value!r}" in msg and why in msg and "SFT runs accept it" in msg
    assert str(tmp_path / "ds.json") in msg
    _load(tmp_path, {key: value}, ["method=sft"])  # SFT: nothing is perturbed
    _load(tmp_path, {key: value}, [*SAP, "sap.probe_train=false", "sap.probe_init=random"])  # a fixed probe
    harmless = {"zero_hpz_partition_size": 1, "zero_quantized_weights": False, "mics_shard_size": -1}[key]
    _load(tmp_path, {key: harmless}, SAP)


def test_quantized_frozen_weights_are_accepted(tmp_path):
    _load(tmp_path, {"zero_quantized_nontrainable_weights": True}, [*SAP, "lora.enabled=true"])


@pytest.mark.parametrize("section", ["offload_optimizer", "offload_param"])
def test_offload_with_triton_kernels_is_refused(tmp_path, section):
    zero = {section: {"device": "cpu"}}
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, zero, [*SAP, "sap.kernels=triton", "train.offload_adam=torch"])
    msg = str(info.value)
    assert "sap.kernels is 'triton'" in msg and f"'zero_optimization.{section}.device' is cpu" in msg
    assert "'auto' or 'torch'" in msg
    _load(tmp_path, zero, [*SAP, "sap.kernels=auto", "train.offload_adam=torch"])


@pytest.mark.parametrize("batch, hint", [
    (12, "needs train.grad_accum=3"),
    (10, "not a multiple of train.micro_batch_size x world size (2 x 2 = 4)"),
])
def test_a_ds_batch_size_says_which_grad_accum_gives_it(tmp_path, batch, hint):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, top={"train_batch_size": batch})
    assert f"'train_batch_size' is {batch}" in str(info.value) and hint in str(info.value)


def test_optimizer_choice(tmp_path, monkeypatch):
    assert _load(tmp_path)["optimizer"]["params"]["torch_adam"] is True  # not offloaded: torch AdamW
    offload = {"offload_optimizer": {"device": "cpu"}}
    assert _load(tmp_path, offload, ["train.offload_adam=torch"])["optimizer"]["params"]["torch_adam"] is True
    assert _load(tmp_path, offload, ["train.offload_adam=deepspeed"])["optimizer"]["params"]["torch_adam"] is False
    monkeypatch.setattr(ds_config, "cpu_adam_buildable", lambda: (False, "no compiler"))
    cfg = load_config(TINY, [])
    choice, why = ds_config.optimizer_choice(cfg, {"zero_optimization": offload})
    assert choice == "torch" and "cannot be built here (no compiler)" in why
    monkeypatch.setattr(ds_config, "cpu_adam_buildable", lambda: (True, "prebuilt op"))
    assert ds_config.optimizer_choice(cfg, {"zero_optimization": offload})[0] == "deepspeed"


class _Builder:
    name = "cpu_adam"

    def __init__(self, compatible=True):
        self.compatible, self.error_log = compatible, "no AVX"

    def is_compatible(self, verbose=False):
        return self.compatible


def test_cpu_adam_build_decision(monkeypatch):
    status = ds_config.cpu_adam_build_status
    assert status(None, {}) == (False, "this accelerator has no CPU Adam builder")
    assert status(_Builder(), {"cpu_adam": True}) == (True, "prebuilt op")
    assert status(_Builder(compatible=False), {})[1].startswith("the op is not compatible with this system (no AVX")
    on_path = {"ninja", "c++"}
    monkeypatch.setattr(ds_config.shutil, "which", lambda name: f"/usr/bin/{name}" if name in on_path else None)
    monkeypatch.delenv("CXX", raising=False)
    on_path.discard("ninja")
    assert "needs ninja" in status(_Builder(), {})[1]
    on_path.add("ninja")
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "'no-such-compiler-xyz' not found" in status(_Builder(), {})[1]
    monkeypatch.delenv("CXX")
    assert status(_Builder(), {}) == (True, "JIT-compiled on first use (about a minute, once), then cached")


def test_padding_is_counted_in_the_parameters_own_partition_group(monkeypatch):
    """The real elements of a shard depend on the rank within the group the parameter is
    partitioned over (MiCS, hpZ), not on the global rank."""
    from sap_ds.parallel import zero3

    group = object()
    monkeypatch.setattr(zero3.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(zero3.dist, "get_rank", lambda group=None: 1 if group is not None else 3)
    p = types.SimpleNamespace(ds_numel=10, partition_numel=lambda: 4, ds_process_group=group)
    # group rank 1 of a 4-element partition of 10 elements holds 4 real ones (the global rank 3 would say 0)
    assert zero3.Zero3Shards._valid_numel(None, p) == 4
    assert zero3.partition_rank(types.SimpleNamespace()) == 3  # no group recorded: the global rank
