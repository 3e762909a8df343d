"""sap-ds plan's columns for the alignment-stage defences (sap_ds/cost/plan.py: Booster,
Vaccine, RepNoise): each column's memory terms and step by hand on a tiny Llama, the order
of their costs on a real size, the headline and the fit hints per --method."""
from __future__ import annotations

import json

import pytest

from sap_ds.config.methods import METHOD_SECTIONS
from sap_ds.cost import plan as P

GIB = 2**30
# The tiny Llama of tests/test_plan.py: h 64, I 128, 2 layers, 4 heads of 16 (q_dim 64), 2 kv heads (kv_dim 32), V 256.
H, I, L, Q, KV, V = 64, 128, 2, 64, 32, 256
N = 106_816  # its parameters (tests/test_plan.py counts them against the Hugging Face module)
PER_TOKEN = 8 * H + 4 * Q + 4 * KV + 8 * I  # bf16 activation bytes per token and layer: 1920
MATMUL = L * (H * Q + 2 * H * KV + Q * H + 3 * H * I) + V * H  # weights in matmuls, lm_head included: 90112


@pytest.fixture
def tiny(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path / "config.json")


def _plan(model, **kw) -> P.PlanResult:
    # world 2 on one node; sub_group_size 1: the optimizer step's copy (4 B) never exceeds the pass peak
    return P.plan(P.PlanInputs(model=model, nodes=1, gpus_per_node=2, probe_layers=(0, 1), sub_group_size=1, **kw))


def _act(tokens: int) -> int:
    """Checkpointed activations: every layer's saved input (2 B * h per token) + one layer recomputed."""
    return L * tokens * H * 2 + tokens * PER_TOKEN


def _forward(seq: int) -> int:
    """Forward FLOPs per token at length seq: 2 * matmul weights + 4 * layers * seq * q_dim."""
    return 2 * MATMUL + 4 * L * seq * Q


def test_by_hand_constants_are_the_models(tiny):
    m = P.resolve_model(tiny)
    assert m.param_count() == N and m.matmul_params() == MATMUL and P.layer_activation_bytes(m, 1) == PER_TOKEN


def test_booster_column_by_hand(tiny):
    """The SFT column + what the harmful batch (6 sequences x 16 tokens) needs beyond the task
    micro-batch (2 x 32) + one fp32 buffer of the trainable shard; its step adds two training
    passes on that batch, each 2 gathers and a reduce-scatter."""
    r = _plan(tiny, micro_batch=2, seq_len=32, harmful_batch=6, safety_seq_len=16)
    task, harmful = _act(64) + 64 * V * 4, _act(96) + 96 * V * 4
    assert (task, harmful) == (204_800, 307_200)
    mem = r.gpu_memory_booster
    assert mem["harmful pass activations+logits beyond the task pass"] == harmful - task == 102_400
    assert mem["Booster harmful-gradient buffer (fp32, 4 B/trainable / world)"] == 4 * N // 2
    assert r.gpu_total_booster - r.gpu_total_sft == 102_400 + 4 * N // 2
    assert r.booster.flops_per_step_per_gpu - r.sft.flops_per_step_per_gpu == 2 * 96 * _forward(16) * (1 + 2 + 1)
    gather = reduce_scatter = 2 * N * (2 - 1) / 2
    assert r.booster.comm_bytes_per_step_per_gpu - r.sft.comm_bytes_per_step_per_gpu == pytest.approx(
        2 * (2 * gather + reduce_scatter))
    assert r.booster.tokens_per_step == r.sft.tokens_per_step == 2 * 32 * 2  # it trains on the task batch
    # a harmful batch smaller than the task micro-batch needs nothing beyond it
    assert _plan(tiny, micro_batch=2, seq_len=32, harmful_batch=1, safety_seq_len=16).gpu_memory_booster[
        "harmful pass activations+logits beyond the task pass"] == 0
    # offloaded: the buffer lives with the fp32 master in CPU RAM, with one chunk of the perturb/restore twins
    off = _plan(tiny, micro_batch=2, seq_len=32, harmful_batch=6, safety_seq_len=16, offload="optimizer")
    assert off.gpu_total_booster - off.gpu_total_sft == 102_400
    twin = P.OFFLOAD_TWIN_BYTES_PER_ELEMENT * min(P.OFFLOAD_TWIN_CHUNK, 1, N / 2)
    assert off.cpu_memory_per_node_booster - off.cpu_memory_per_node_sft == pytest.approx(2 * (4 * N / 2 + twin))


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_vaccine_column_by_hand(tiny, grad_accum):
    """SFT's + one bf16 activation gradient per layer (layers x micro_batch x seq x hidden x
    2 B), and the captured outputs beside them when a later micro-batch's first pass runs
    while they are held; the step adds per micro-batch a forward and an activation-only
    backward through every layer (2 gathers, no reduce-scatter)."""
    r = _plan(tiny, micro_batch=2, seq_len=32, grad_accum=grad_accum)
    eps = L * 2 * 32 * H * 2
    assert eps == 16_384
    mem = r.gpu_memory_vaccine
    assert mem["Vaccine perturbations (layers*micro_batch*seq*hidden*2 B)"] == eps
    captured = mem["Vaccine first pass: captured outputs beside them (same size; grad_accum > 1)"]
    assert captured == (eps if grad_accum > 1 else 0)
    assert r.gpu_total_vaccine - r.gpu_total_sft == eps + captured
    tokens = grad_accum * 2 * 32
    assert r.vaccine.flops_per_step_per_gpu - r.sft.flops_per_step_per_gpu == tokens * _forward(32) * (1 + 1 * (1 + 1))
    assert r.vaccine.comm_bytes_per_step_per_gpu - r.sft.comm_bytes_per_step_per_gpu == pytest.approx(grad_accum * 2 * N)


def test_repnoise_column_by_hand(tiny):
    """RepNoise trains on pairs: --micro-batch 2 pairs are 4 sequences of --safety-seq-len 16
    tokens in one pass (no task pass); beside it the MMD's fp32 inputs, one hidden state's
    logit lens (12 B per logit) and the lens's bf16 gradients for the L+1 hidden states. Its
    FLOPs: the pair pass and the lens's L+1 head projections of the harmful half (forward,
    recompute, backward); its communication SFT's."""
    r = _plan(tiny, micro_batch=2, seq_len=32, safety_seq_len=16, grad_accum=2)
    mem = r.gpu_memory_repnoise
    assert "activations (task micro-batch)" not in mem
    assert mem["activations (pair micro-batch: 2*micro_batch sequences of safety_seq_len)"] == _act(64) == 139_264
    assert mem["logits fp32 (2*micro_batch*safety_seq_len*vocab*4)"] == 64 * V * 4
    harmful = 2 * 16  # tokens of the harmful half
    extra = {"RepNoise MMD inputs fp32 (layers*micro_batch*safety_seq_len*hidden*8 B)": L * harmful * H * 8,
             "RepNoise logit lens, one hidden state (micro_batch*safety_seq_len*vocab*12 B)": harmful * V * 12,
             "RepNoise lens grads waiting ((layers+1)*2*micro_batch*safety_seq_len*hidden*2 B)": (L + 1) * 2 * harmful * H * 2}
    assert {k: mem[k] for k in extra} == extra == {k: v for k, v in zip(extra, (32_768, 98_304, 24_576))}
    states = r.gpu_total_sft - _act(64) - 64 * V * 4  # SFT's task micro-batch is 2 x 32 = 64 tokens too
    assert r.gpu_total_repnoise == states + _act(64) + 64 * V * 4 + sum(extra.values())
    pairs, lens = 2 * 64 * _forward(16) * (1 + 2 + 1), (L + 1) * 2 * harmful * 2 * V * H * (1 + 1 + 2)
    assert r.repnoise.flops_per_step_per_gpu == pairs + lens
    assert r.repnoise.comm_bytes_per_step_per_gpu == r.sft.comm_bytes_per_step_per_gpu
    assert r.repnoise.tokens_per_step == 2 * 64 * 2  # its pairs' tokens, both ranks


def test_defences_cost_more_than_sft_on_a_real_size():
    """On llama2-7b with as many harmful / pair tokens as task tokens: Booster's step is 3 SFT
    steps of FLOPs (its two harmful passes are SFT passes), Vaccine's 7/4 (checkpointed: the
    first pass is a forward and an activation-only backward, each recomputed), RepNoise's
    more than SFT's on the same tokens (the logit lens); each holds more memory than SFT."""
    r = P.plan(P.PlanInputs(model="llama2-7b", micro_batch=4, seq_len=512, harmful_batch=4, safety_seq_len=512))
    sft = r.sft.flops_per_step_per_gpu
    assert r.booster.flops_per_step_per_gpu == 3 * sft
    assert r.vaccine.flops_per_step_per_gpu == pytest.approx(7 / 4 * sft)
    # RepNoise's 2 pairs per micro-batch are 4 sequences: the tokens of r's SFT micro-batch of 4
    pairs = P.plan(P.PlanInputs(model="llama2-7b", micro_batch=2, seq_len=512, safety_seq_len=512)).repnoise
    assert pairs.tokens_per_step == r.sft.tokens_per_step and pairs.flops_per_step_per_gpu > sft
    for name, step in (("booster", r.booster), ("vaccine", r.vaccine), ("repnoise", pairs)):
        assert step.step_s > r.sft.step_s and step.tokens_per_s < r.sft.tokens_per_s, name
    for name in ("booster", "vaccine", "repnoise"):
        assert r.columns[name].total > r.gpu_total_sft and 0 < r.columns[name].over_sft_throughput < 1, name
    assert r.booster.comm_s > r.vaccine.comm_s > r.sft.comm_s == r.repnoise.comm_s


def test_every_method_names_a_column_and_gets_its_headline(capsys):
    """Each method's headline is its own column's memory (safety_mix: SFT's), in the table and
    in --json, which has every column's figures under their flat names."""
    # a small optimizer sub-group: its step copy does not hide the columns' differences
    argv = ["--model", "llama2-7b", "--nodes", "1", "--gpus-per-node", "8", "--sub-group-size", "1000"]
    r = P.plan(P.PlanInputs(model="llama2-7b", sub_group_size=1000))
    assert len({column.total for column in r.columns.values()}) == len(P.COLUMNS)  # a headline shows which column it read
    for method, section in METHOD_SECTIONS.items():
        assert section.plan_column in P.COLUMNS, method
        assert P.main([*argv, "--method", method]) == 0
        total = r.columns[section.plan_column].total
        assert f"=> {method.upper()} needs {total / GIB:.1f} GiB per GPU (fits on h100-80gb)" in capsys.readouterr().out
    assert {METHOD_SECTIONS[m].plan_column for m in ("booster", "vaccine", "repnoise")} == {"booster", "vaccine", "repnoise"}
    assert P.main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for name, column in r.columns.items():
        assert data[f"gpu_total_{name}"] == column.total and data[f"fits_{name}"] is True
        assert data[name]["flops_per_step_per_gpu"] == column.step.flops_per_step_per_gpu
        assert data[f"{name}_over_sft_throughput"] == column.over_sft_throughput
    with pytest.raises(AttributeError, match="gpu_total_dpo"):
        r.gpu_total_dpo  # noqa: B018


def test_booster_fit_hint_shrinks_the_harmful_batch(capsys):
    """A Booster job that does not fit for its harmful batch (16 x 2048 tokens, no activation
    checkpointing) is told --harmful-batch (the largest that fits), not SAP's --safety-batch;
    planned again with the printed flags it fits, one more does not."""
    argv = ["--model", "llama2-7b", "--nodes", "1", "--gpus-per-node", "8", "--method", "booster", "--harmful-batch", "16",
            "--safety-seq-len", "2048", "--seq-len", "512", "--no-activation-checkpointing"]
    assert P.main(argv) == 0
    out = capsys.readouterr().out
    assert "=> BOOSTER needs" in out and "does NOT fit" in out
    hints = out.split("It fits with any one of these changes", 1)[1]
    assert "--safety-batch" not in hints and "booster.harmful_batch_size=" in hints
    value = int(hints.split("--harmful-batch ", 1)[1].split()[0])
    assert 1 <= value < 16

    def fits(*flags: str) -> bool:
        assert P.main([*argv, *flags, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["fits_booster"]

    assert fits("--harmful-batch", str(value)) and not fits("--harmful-batch", str(value + 1))
    # and SAP's job with the same flags is told about its own batch, never Booster's
    sap = P.fit_options(P.PlanInputs(model="llama2-7b", method="sap", safety_batch=16, safety_seq_len=2048, seq_len=512,
                                     activation_checkpointing=False))
    assert any(o.flags[0] == "--safety-batch" for o in sap) and not any(o.flags[0] == "--harmful-batch" for o in sap)


def test_no_fit_message_names_the_columns_own_flags():
    """When no single change fits, the advice names the headline column's batch and length flags."""
    for method, batch, seq in (("booster", " or --harmful-batch", "--seq-len"), ("sap", " or --safety-batch", "--seq-len"),
                               ("repnoise", "", "--safety-seq-len"), ("vaccine", "", "--seq-len")):
        text = P.format_fit_options(P.plan(P.PlanInputs(model="llama2-7b", method=method)), [])
        assert f"a smaller micro-batch{batch}, up to" in text and f"shorten {seq}," in text, method


def test_harmful_batch_defaults_to_boosters_and_is_checked():
    """--harmful-batch plans, by default, the run a config without booster.harmful_batch_size
    makes; it must be positive, as every batch input."""
    from sap_ds.config.methods import BoosterConfig

    assert P.PlanInputs(model="m").harmful_batch == BoosterConfig().harmful_batch_size
    assert P.inputs_from_args(P.build_parser().parse_args(["--model", "m", "--harmful-batch", "3"])).harmful_batch == 3
    with pytest.raises(P.PlanError, match="--harmful-batch must be positive"):
        P.plan(P.PlanInputs(model="llama2-7b", harmful_batch=0))
