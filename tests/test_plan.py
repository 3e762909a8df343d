"""The sizing planner (sap_ds/cost/plan.py): exact parameter counts, hand-computed memory,
agreement with DeepSpeed's own ZeRO-3 estimator, LoRA counts, SAP deltas, the CLI."""
from __future__ import annotations

import argparse
import json
import re

import pytest

from sap_ds.cost import model_spec
from sap_ds.cost import plan as P

GIB = 2**30


def _plan(**kw) -> P.PlanResult:
    return P.plan(P.PlanInputs(**kw))


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name,expected", [
    ("llama2-7b", 6_738_415_616),
    ("llama2-70b", 68_976_648_192),
    ("llama3-8b", 8_030_261_248),
    # published totals of the other named sizes (HF model cards / safetensors metadata)
    ("llama2-13b", 13_015_864_320),
    ("llama3-70b", 70_553_706_496),
    ("mistral-7b", 7_241_732_096),
    ("qwen2.5-0.5b", 494_032_768),
    ("qwen2.5-7b", 7_615_616_512),
    ("qwen2.5-72b", 72_706_203_648),
    ("smollm2-135m", 134_515_008),
])
def test_named_parameter_counts_exact(name, expected):
    assert model_spec.NAMED_MODELS[name].param_count() == expected


def test_llama2_7b_count_by_hand():
    h, i, L, V = 4096, 11008, 32, 32000
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q,k,v,o (no GQA) + gate,up,down + 2 RMSNorm
    assert model_spec.NAMED_MODELS["llama2-7b"].param_count() == V * h + L * per_layer + h + V * h


def test_config_json_matches_named(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
           "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = model_spec.model_from_config(tmp_path / "config.json")
    assert m.param_count() == 68_976_648_192
    assert model_spec.model_from_config(tmp_path).param_count() == 68_976_648_192  # a folder works too


def test_tied_embeddings_counted_once(tmp_path):
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = model_spec.model_from_config(tmp_path / "config.json")
    kv = 2 * 16
    per_layer = 64 * 64 * 2 + 64 * kv * 2 + 3 * 64 * 128 + 2 * 64
    assert m.param_count() == 100 * 64 + 2 * per_layer + 64


# --------------------------------------------------------------------------- memory by hand


def test_llama2_7b_full_ft_8_gpus_by_hand():
    r = _plan(model="llama2-7b", nodes=1, gpus_per_node=8, method="sft")
    N = 6_738_415_616
    # 2 B bf16 params, 2 B bf16 grads, 12 B fp32 master + Adam m + v, each / 8 GPUs
    assert N * 2 // 8 == 1_684_603_904
    mem = r.gpu_memory_sft
    assert mem["params (bf16, 2 B/param / world)"] == 1_684_603_904  # 1.57 GiB
    assert mem["grads (bf16, 2 B/trainable / world)"] == 1_684_603_904
    assert mem["optimizer (fp32 master+m+v, 12 B/trainable / world)"] == 10_107_623_424  # 12 * N / 8, 9.41 GiB
    # largest module = embedding (= lm_head) 32000 * 4096, gathered in bf16 + its bf16 grad
    assert mem["largest layer gathered (2 B) + its full grad (2 B, full FT only)"] == 4 * 32000 * 4096
    assert r.cpu_memory_per_node_sft == 0


def test_llama2_70b_full_ft_64_gpus_by_hand():
    r = _plan(model="llama2-70b", nodes=8, gpus_per_node=8, method="sft")
    N = 68_976_648_192
    assert N % 64 == 0 and N // 64 == 1_077_760_128
    mem = r.gpu_memory_sft
    assert mem["params (bf16, 2 B/param / world)"] == 2_155_520_256  # 2.01 GiB
    assert mem["grads (bf16, 2 B/trainable / world)"] == 2_155_520_256
    assert mem["optimizer (fp32 master+m+v, 12 B/trainable / world)"] == 12_933_121_536  # 12.04 GiB
    states = sum(v for k, v in mem.items() if k.startswith(("params", "grads", "optimizer (")))
    assert states == 16 * N // 64 == 17_244_162_048


def test_offload_moves_states_to_cpu_per_node():
    r = _plan(model="llama2-70b", nodes=2, gpus_per_node=8, offload="optimizer", method="sft")
    N, world = 68_976_648_192, 16
    mem = r.gpu_memory_sft
    assert mem["params (bf16, 2 B/param / world)"] == 2 * N // world
    assert mem["grads (offloaded to CPU)"] == 0 and mem["optimizer (offloaded to CPU)"] == 0
    assert r.cpu_memory_per_node_sft == 16 * N // world * 8  # fp32 master, m, v, fp32 grad of 8 local ranks
    r_all = _plan(model="llama2-70b", nodes=2, gpus_per_node=8, offload="all", method="sft")
    assert r_all.gpu_memory_sft["params (bf16, 2 B/param / world)"] == 0
    assert r_all.cpu_memory_per_node_sft == 18 * N // world * 8


def test_activation_formulas():
    m = model_spec.NAMED_MODELS["llama2-70b"]
    h, i, kv, L = 8192, 28672, 1024, 80
    s, b = 2048, 1
    per_layer = s * b * (12 * h + 4 * kv + 8 * i)  # = 8h + 4q_dim + 4kv + 8I with q_dim = h
    assert P.layer_activation_bytes(m, s * b) == per_layer
    assert P.activation_bytes(m, b, s, checkpointing=False) == L * per_layer
    assert P.activation_bytes(m, b, s, checkpointing=True) == L * s * b * h * 2 + per_layer
    r = _plan(model="llama2-70b", nodes=8, gpus_per_node=8, method="sft", activation_checkpointing=False)
    assert r.gpu_memory_sft["activations (task micro-batch)"] == L * per_layer
    assert r.gpu_memory_sft["logits fp32 (micro_batch*seq*vocab*4)"] == 1 * 2048 * 32000 * 4


# --------------------------------------------------------------------------- DeepSpeed's estimator


def _ds_estimate(total, largest, g, n, cpu_offload, cpu_offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    # zero_init=True, additional_buffer_factor=1.0: the raw byte counts, no safety margin
    return estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=g, num_nodes=n,
                                                 cpu_offload=cpu_offload, cpu_offload_params=cpu_offload_params,
                                                 zero_init=True, additional_buffer_factor=1.0)


@pytest.mark.parametrize("model,nodes,g", [("llama2-7b", 1, 8), ("llama2-70b", 8, 8), ("llama3-70b", 2, 8)])
def test_agrees_with_deepspeed_estimator(model, nodes, g):
    """DeepSpeed's estimate_zero3_model_states_mem_needs counts, per GPU:
      no offload:        4 * largest_layer + 18 * N / world   (CPU: only the zero_init staging)
      offload optimizer: 4 * largest_layer + 2 * N / world    (CPU per node: 16 * N / nodes)
      offload all:       4 * largest_layer                    (CPU per node: 18 * N / nodes)
    Our "largest layer gathered + its grad" item is exactly its 4 * largest_layer. With any
    offload the two agree exactly on GPU and CPU. Without offload DeepSpeed charges 18 bytes
    per parameter against our 16 (2 bf16 param + 2 bf16 grad + 12 fp32 master/m/v, the
    ZeRO paper's mixed-precision Adam count): the tolerance is exactly 2 * N / world bytes,
    i.e. ours is 16/18 of its partitioned part (11.1 % less), and nothing else differs."""
    r = _plan(model=model, nodes=nodes, gpus_per_node=g, method="sft")
    N, largest, world = r.total_params, r.largest_layer_params, nodes * g
    mem = r.gpu_memory_sft
    gathered = mem["largest layer gathered (2 B) + its full grad (2 B, full FT only)"]
    _, ds_gpu, ds_largest = _ds_estimate(N, largest, g, nodes, False, False)
    assert gathered == ds_largest
    ours = sum(v for k, v in mem.items() if k.startswith(("params", "grads", "optimizer ("))) + gathered
    assert abs(ours - (ds_gpu - 2 * N / world)) <= 1  # DeepSpeed int()s its figure
    assert ours <= ds_gpu and (ds_gpu - ours) / (ds_gpu - gathered) == pytest.approx(2 / 18, rel=1e-6)

    for offload, params_too in (("optimizer", False), ("all", True)):
        r = _plan(model=model, nodes=nodes, gpus_per_node=g, method="sft", offload=offload)
        mem = r.gpu_memory_sft
        ds_cpu, ds_gpu, _ = _ds_estimate(N, largest, g, nodes, True, params_too)
        ours_gpu = mem["params (bf16, 2 B/param / world)"] + mem["grads (offloaded to CPU)"] + \
            mem["optimizer (offloaded to CPU)"] + mem["largest layer gathered (2 B) + its full grad (2 B, full FT only)"]
        assert abs(ours_gpu - ds_gpu) <= 1
        assert abs(r.cpu_memory_per_node_sft - ds_cpu) <= 1


# --------------------------------------------------------------------------- LoRA


def test_lora_trainable_counts():
    m = model_spec.NAMED_MODELS["llama2-7b"]
    # q_proj 4096->4096, v_proj 4096->4096: r*(in+out) each, 32 layers
    assert m.lora_params(8, ["q_proj", "v_proj"]) == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    m70 = model_spec.NAMED_MODELS["llama2-70b"]
    # GQA: v_proj is 8192 -> 8 kv heads * 128 = 1024
    assert m70.lora_params(8, ["q_proj", "v_proj"]) == 80 * 8 * ((8192 + 8192) + (8192 + 1024)) == 16_384_000
    assert m70.lora_params(16, ["gate_proj"]) == 80 * 16 * (8192 + 28672)
    r = _plan(model="llama2-70b", nodes=2, gpus_per_node=8, lora=True, method="sft")
    N = 68_976_648_192
    assert r.trainable_params == 16_384_000 and r.total_params == N + 16_384_000
    mem = r.gpu_memory_sft
    assert mem["params (bf16, 2 B/param / world)"] == 2 * (N + 16_384_000) // 16
    assert mem["grads (bf16, 2 B/trainable / world)"] == 2 * 16_384_000 // 16
    assert mem["optimizer (fp32 master+m+v, 12 B/trainable / world)"] == 12 * 16_384_000 // 16
    # frozen largest module is gathered but never gets a full gradient
    assert mem["largest layer gathered (2 B) + its full grad (2 B, full FT only)"] == 2 * 32000 * 8192
    with pytest.raises(model_spec.PlanError, match="unknown LoRA target"):
        m.lora_params(8, ["qkv"])


# --------------------------------------------------------------------------- SAP


@pytest.mark.parametrize("lora", [False, True])
def test_sap_adds_exactly_direction_and_probe(lora):
    # safety pass (2 pairs -> 4 sequences x 256 tokens) smaller than the task micro-batch (4 x 2048)
    kw = dict(model="llama2-7b", nodes=1, gpus_per_node=8, micro_batch=4, seq_len=2048, safety_batch=2,
              safety_seq_len=256, probe_layers=(3, 9), lora=lora)
    r = _plan(**kw)
    trainable = r.trainable_params
    direction = 4 * trainable / 8
    probe = 2 * 4096 * 4 * 3
    assert r.gpu_total_sap - r.gpu_total_sft == pytest.approx(direction + probe, abs=1)
    assert r.gpu_memory_sap["SAP probe (layers*hidden*4 B * 3: value, Adam m, v)"] == probe
    assert r.gpu_memory_sap["safety pass activations+logits beyond the task pass"] == 0
    # with the optimizer offloaded the direction lives in CPU RAM next to the fp32 master, and
    # the perturb/restore twins hold a chunk of temporaries there (tests/test_offload_twin_memory.py)
    r_off = _plan(offload="optimizer", **kw)
    assert r_off.gpu_total_sap - r_off.gpu_total_sft == pytest.approx(probe, abs=1)
    twin = P.offload_twin_transient(r_off.inputs, P.parameters(r_off.model, r_off.inputs), 8)
    assert r_off.cpu_memory_per_node_sap - r_off.cpu_memory_per_node_sft == pytest.approx((direction + twin) * 8, abs=1)


@pytest.mark.parametrize("lora", [False, True])
def test_lisa_adds_exactly_its_anchor(lora):
    """Lisa keeps one fp32 anchor shaped like the master shard: 4 B per trainable parameter
    over the world, on the GPU, or in CPU RAM next to an offloaded master; its step is SFT's."""
    kw = dict(model="llama2-7b", nodes=2, gpus_per_node=8, micro_batch=4, seq_len=2048, lora=lora)
    r = _plan(method="lisa", **kw)
    anchor = 4 * r.trainable_params / 16
    assert r.gpu_total_lisa - r.gpu_total_sft == pytest.approx(anchor, abs=1)
    assert r.cpu_memory_per_node_lisa == r.cpu_memory_per_node_sft
    r_off = _plan(method="lisa", offload="optimizer", **kw)
    assert r_off.gpu_total_lisa == r_off.gpu_total_sft
    assert r_off.cpu_memory_per_node_lisa - r_off.cpu_memory_per_node_sft == pytest.approx(anchor * 8, abs=1)
    out = P.format_table(r)
    assert "Lisa anchor (fp32, 4 B/trainable / world)" in out and f"=> LISA needs {r.gpu_total_lisa / P.GIB:.1f} GiB" in out


def test_plan_methods_are_the_trainers():
    import typing

    from sap_ds.config.run import MethodName

    assert set(P.METHODS) == set(typing.get_args(MethodName))
    with pytest.raises(model_spec.PlanError, match="unknown method 'dpo'; valid: sft, sap, lisa, safety_mix"):
        _plan(model="llama2-7b", nodes=1, gpus_per_node=8, method="dpo")


def test_sap_costs_more_time_than_sft():
    r = _plan(model="llama2-7b", nodes=1, gpus_per_node=8, seq_len=2048, micro_batch=4, safety_batch=2,
              safety_seq_len=2048)
    # equal safety and task tokens (2 pairs = 4 sequences): DESIGN section 2 says ~2.6x the compute
    assert 2.4 < r.sap.flops_per_step_per_gpu / r.sft.flops_per_step_per_gpu < 2.8
    assert 0 < r.sap_over_sft_throughput < 1
    assert r.sap.comm_s > r.sft.comm_s > 0
    one = _plan(model="llama2-7b", nodes=1, gpus_per_node=1)
    assert one.sft.comm_s == 0


def test_same_step_adds_one_probe_pass_of_compute_and_gathers():
    """sap.probe_timing same_step: the probe pass at W as well as at W', each a forward and a
    backward down to the lowest probe layer, with its gathers; nothing else changes."""
    assert P.PROBE_PASSES == {"next_step": 1, "same_step": 2}  # SAP's section's count, every timing it takes
    common = dict(model="llama2-7b", nodes=2, gpus_per_node=8, seq_len=1024, micro_batch=2, grad_accum=2)
    nxt, same = _plan(**common), _plan(**common, probe_timing="same_step")
    extra = same.sap.flops_per_step_per_gpu - nxt.sap.flops_per_step_per_gpu
    m = model_spec.NAMED_MODELS["llama2-7b"]
    f_tok = nxt.sft.flops_per_step_per_gpu / (2 * 1024 * 2 * 4)  # SFT: fwd + 2 bwd + 1 recompute
    assert extra == pytest.approx(2 * 1024 * 2 * f_tok * (1 + (32 - 3) / 32 * 2))  # one more pass: fwd + bwd above layer 3
    gather = 2 * m.param_count() * 15 / 16
    assert same.sap.comm_bytes_per_step_per_gpu - nxt.sap.comm_bytes_per_step_per_gpu == pytest.approx(2 * gather * (1 + 29 / 32))
    assert same.sft == nxt.sft and same.gpu_total_sap == nxt.gpu_total_sap
    assert same.sap_over_sft_throughput < nxt.sap_over_sft_throughput


def test_step_flops_by_hand():
    r = _plan(model="llama2-7b", nodes=1, gpus_per_node=8, seq_len=1024, micro_batch=2, grad_accum=3,
              activation_checkpointing=False, mfu=0.5, gpu="a100-80gb")
    m = model_spec.NAMED_MODELS["llama2-7b"]
    matmul = m.param_count() - 32000 * 4096 - (2 * 32 + 1) * 4096  # minus input embedding and norms
    f_tok = 2 * matmul + 4 * 32 * 1024 * 4096
    tokens = 2 * 1024 * 3
    assert r.sft.flops_per_step_per_gpu == tokens * f_tok * 3
    assert r.sft.compute_s == pytest.approx(tokens * f_tok * 3 / (312e12 * 0.5))
    ring = 7 / 8
    N = m.param_count()
    assert r.sft.comm_bytes_per_step_per_gpu == pytest.approx(3 * (2 * 2 * N * ring + 2 * N * ring))
    assert r.sft.comm_s == pytest.approx(r.sft.comm_bytes_per_step_per_gpu / 300e9)  # NVLink 600 GB/s -> 300 per direction
    assert r.sft.tokens_per_s == pytest.approx(tokens * 8 / r.sft.step_s)


# --------------------------------------------------------------------------- tiny config


def test_tiny_config_per_rank_model_states(tmp_path):
    """The per-rank model-state figure for the tiny test Llama (hidden 64, 2 layers), by hand.
    (A CPU-measured comparison against a live DeepSpeed engine is a separate test.)"""
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = _plan(model=str(tmp_path / "config.json"), nodes=1, gpus_per_node=2, method="sft", probe_layers=(0, 1))
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    N = 256 * 64 + 2 * per_layer + 64 + 256 * 64
    assert r.total_params == N == 106_816
    # and the real Hugging Face module has exactly that many parameters
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    assert sum(p.numel() for p in hf.parameters()) == N
    mem = r.gpu_memory_sft
    assert mem["params (bf16, 2 B/param / world)"] == N  # 2 B * N / 2 ranks = 213,632 bytes
    assert mem["grads (bf16, 2 B/trainable / world)"] == N
    assert mem["optimizer (fp32 master+m+v, 12 B/trainable / world)"] == 6 * N
    # every tensor is under the 1e5 persistence threshold: all kept whole on each rank
    assert mem["persistent small params kept whole (2 B * numel <= threshold)"] == 2 * N


# --------------------------------------------------------------------------- CLI


def test_cli_named_size_table(capsys):
    assert P.main(["--model", "llama2-70b", "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "TOTAL per GPU" in out and "throughput over SFT" in out and "assumptions:" in out
    header = next(line for line in out.splitlines() if line.startswith("per-GPU memory")).split()
    assert header[2:] == [c.title for c in P.COLUMNS.values()]  # every column, in COLUMNS' order
    assert "68,976,648,192" in out
    assert "(fits on h100-80gb)" in out and "It fits with" not in out and "No single change" not in out


def test_each_default_is_written_once():
    """The flags' defaults are ``PlanInputs``' (a bare command plans ``PlanInputs(model=...)``),
    and an input that is a run-config key defaults to that key's default."""
    from sap_ds.config.methods import SapConfig
    from sap_ds.config.run import DataConfig, LoraConfig

    assert P.inputs_from_args(P.build_parser().parse_args(["--model", "llama2-7b"])) == P.PlanInputs(model="llama2-7b")
    i, lora, sap = P.PlanInputs(model="m"), LoraConfig(), SapConfig()
    assert (i.lora_r, list(i.lora_targets), i.lora_dropout) == (lora.r, lora.target_modules, lora.dropout)
    assert i.safety_seq_len == DataConfig.model_fields["safety_max_length"].default
    assert (i.safety_batch, list(i.probe_layers), i.safety_every, i.probe_fraction, i.probe_timing,
            i.probe_micro_batches) == (sap.safety_batch_size, sap.probe_layers, sap.safety_every, sap.probe_fraction,
                                       sap.probe_timing, sap.probe_micro_batches)


def test_cli_help_has_a_help_string_for_every_option(capsys):
    """`sap-ds plan --help` explains every flag (with its default, which the formatter appends)."""
    from sap_ds.cli import main as cli

    assert cli(["plan", "--help"]) == 0
    shown = "".join(capsys.readouterr().out.split())  # no whitespace: the help is wrapped into lines
    actions = [a for a in P.build_parser()._actions if a.option_strings]
    assert len(actions) > 30
    for action in actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{action.option_strings} has no help"
        text = action.help % {"default": action.default} if "%(" in action.help else action.help
        assert "".join(text.split()) in shown, f"{action.option_strings[0]}: {text!r} not in --help"
        if action.default not in (None, argparse.SUPPRESS) and "%(default)" not in action.help:
            assert "".join(f"{text} (default: {action.default})".split()) in shown, action.option_strings[0]


def _fit_lines(out: str) -> list[tuple[list[str], float]]:
    """The listed changes (flags, SAP/SFT GiB per GPU) under "It fits with any one of these"."""
    lines = out.split("It fits with any one of these changes", 1)[1].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("  --"):
            break
        flags, gib = re.split(r"\s{2,}", line.strip())[:2]
        rows.append((flags.split(), float(gib.removesuffix(" GiB"))))
    return rows


def _replan(argv: list[str], capsys) -> dict:
    assert P.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv,method,listed,not_listed", [
    # 70B full fine-tuning with SAP on one node of 8 H100s: model states do not fit
    (["--model", "llama2-70b", "--nodes", "1", "--gpus-per-node", "8", "--seq-len", "512", "--micro-batch", "4"], "sap",
     {"--offload", "--lora", "--nodes"}, [["--gpu", "h200"], ["--micro-batch", "1", "--grad-accum", "4"]]),
    # 7B, a large micro-batch without checkpointing: activations do not fit, more GPUs do not help
    (["--model", "llama2-7b", "--nodes", "1", "--gpus-per-node", "8", "--seq-len", "4096", "--micro-batch", "16",
      "--no-activation-checkpointing", "--method", "sft"], "sft",
     {"--activation-checkpointing", "--micro-batch"}, [["--nodes", str(P.MAX_NODES)], ["--lora"], ["--offload", "all"]]),
])
def test_a_job_that_does_not_fit_lists_changes_that_fit(argv, method, listed, not_listed, capsys):
    """Each listed change, planned again on its own from the printed flags, fits, with the memory
    printed; the node count is the fewest; and changes that would not fit are not listed (checked
    by planning them too)."""
    from sap_ds.cli import main as cli

    assert cli(["plan", *argv]) == 0
    out = capsys.readouterr().out
    assert f"=> {method.upper()} needs" in out and "does NOT fit" in out
    rows = _fit_lines(out)
    assert {flags[0] for flags, _ in rows} == listed, out[-3000:]
    assert ["--offload", "all"] not in [flags for flags, _ in rows]  # listed only when the optimizer's offload is not enough
    for flags, gib in rows:
        again = _replan(argv + flags, capsys)
        assert again[f"fits_{method}"], flags
        assert again[f"gpu_total_{method}"] / GIB == pytest.approx(gib, abs=0.06), flags
        if flags[0] == "--nodes":
            assert not _replan(argv + ["--nodes", str(int(flags[1]) - 1)], capsys)[f"fits_{method}"]
    for flags in not_listed:
        assert not _replan(argv + flags, capsys)[f"fits_{method}"], flags
    data = _replan(argv, capsys)  # the same changes in the JSON output
    assert [list(o["flags"]) for o in data["fit_options"]] == [flags for flags, _ in rows]


def test_no_single_change_fits(capsys):
    """A 100K-token sequence on one L40S: no single change fits, and none is suggested."""
    argv = ["--model", "llama2-7b", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "l40s", "--seq-len", "100000"]
    assert P.main(argv) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "No single change makes it fit" in out and "It fits with" not in out
    assert _replan(argv, capsys)["fit_options"] == []
    for flags in (["--gpu", "h200"], ["--lora"], ["--offload", "all"], ["--nodes", str(P.MAX_NODES)], ["--safety-batch", "1"]):
        assert not _replan(argv + flags, capsys)["fits_sap"], flags


def test_cli_json_config_file(tmp_path, capsys):
    cfg = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "vocab_size": 32000}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert P.main(["--model", str(path), "--nodes", "1", "--gpus-per-node", "8", "--lora", "--lora-r", "16",
                   "--offload", "optimizer", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_params"] == 6_738_415_616 + 32 * 2 * 16 * 8192
    assert data["trainable_params"] == 32 * 2 * 16 * 8192
    assert data["world_size"] == 8 and data["inputs"]["offload"] == "optimizer"
    assert data["cpu_memory_per_node_sft"] > 0


def test_module_entry_point_runs():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "sap_ds.cost.plan", "--model", "smollm2-135m", "--nodes", "1",
                          "--gpus-per-node", "1", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["total_params"] == 134_515_008


def test_safety_mix_is_sfts_memory_and_step(capsys):
    """safety_mix runs SFT's step: its headline is the SFT column, with the assumption said."""
    mix, sft = _plan(model="llama2-7b", nodes=1, gpus_per_node=8, method="safety_mix"), _plan(
        model="llama2-7b", nodes=1, gpus_per_node=8, method="sft")
    assert mix.gpu_total_sft == sft.gpu_total_sft and mix.sft == sft.sft
    assert any(a.startswith("safety_mix: SFT's step") for a in mix.assumptions)
    assert P.main(["--model", "llama2-7b", "--nodes", "1", "--gpus-per-node", "8", "--method", "safety_mix"]) == 0
    assert f"=> SAFETY_MIX needs {sft.gpu_total_sft / P.GIB:.1f} GiB per GPU" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--model", "llama2-7b", "--method", "dpo"], "valid: sft, sap, lisa, safety_mix"),
    (["--model", "llama9-1t"], "llama2-7b"),  # lists the valid names
    (["--model", "llama2-7b", "--gpu", "tpu-v5"], "h100-80gb"),
    (["--model", "llama2-7b", "--nodes", "0"], "--nodes must be a positive integer"),
    (["--model", "llama2-7b", "--nodes", "-2"], "--nodes must be a positive integer"),
    (["--model", "llama2-7b", "--offload", "disk"], "none, optimizer, all"),
    (["--model", "llama2-7b", "--probe-layers", "3,99"], "--probe-layers"),
    (["--model", "llama2-7b", "--probe-timing", "same-step"], "valid: next_step, same_step"),
])
def test_cli_usage_errors(argv, needle, capsys):
    assert P.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_cli_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope" / "config.json"
    assert P.main(["--model", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_argparse_error_exit_2(capsys):
    assert P.main(["--nodes", "2"]) == 2  # --model missing
    assert "--model" in capsys.readouterr().err


# --------------------------------------------------------------------------- measured on CPU
# The planner against a live 2-rank engine: tests/test_zero3_reference.py
# (test_model_states_match_a_live_zero3_engine_on_2_cpu_ranks), whose single launch builds it.
