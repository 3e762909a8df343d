"""The SAP probe (sap_ds/sap/probe.py): finding decoder layers across architectures, layer
range errors, the hook adding V to a block's output, enabled=False, and cut_below."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sap_ds.errors import ProbeError
from sap_ds.sap.probe import Probe, find_decoder_layers
from tests.support.tiny_models import CPU, HIDDEN, VOCAB, tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gemma", "gpt_neox", "gpt2"]
EXPECTED_BLOCK = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "mistral": "MistralDecoderLayer",
                  "gemma": "GemmaDecoderLayer", "gpt_neox": "GPTNeoXLayer", "gpt2": "GPT2Block"}


def _ids(seed=1):
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _layer_inputs(model) -> dict[int, torch.Tensor]:
    """What each decoder block receives (a pre-hook), and what the final norm receives (-1)."""
    seen: dict[int, torch.Tensor] = {}

    def grab(index):
        def hook(module, args, kwargs):
            seen[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    for i, block in enumerate(find_decoder_layers(model)):
        block.register_forward_pre_hook(grab(i), with_kwargs=True)
    return seen


# --------------------------------------------------------------------------- finding layers


@pytest.mark.parametrize("arch", ARCHS)
def test_find_decoder_layers(arch):
    model = tiny_model(arch, layers=2)
    layers = find_decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    assert all(type(block).__name__ == EXPECTED_BLOCK[arch] for block in layers)


def test_find_decoder_layers_through_peft():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", layers=3)
    layers = find_decoder_layers(base)
    wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert find_decoder_layers(wrapped) is layers
    # the probe placed through the wrapper acts on the wrapped model's forward
    ids = _ids()
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
        probe = Probe(wrapped, [1], HIDDEN, CPU)
        probe.vectors.fill_(0.5)
        after = wrapped(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_find_decoder_layers_through_engine_style_wrapper():
    class Engine(nn.Module):  # DeepSpeed's engine keeps the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model("gpt2")
    assert find_decoder_layers(Engine(model)) is find_decoder_layers(model)


def test_unknown_architecture():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ProbeError) as info:
        find_decoder_layers(Plain())
    msg = str(info.value)
    assert "Plain" in msg and "model.layers" in msg and "Llama" in msg
    with pytest.raises(ProbeError):
        Probe(nn.Sequential(nn.Linear(4, 4)), [0], 4, CPU)


@pytest.mark.parametrize("layers_asked", [[0, 99], [2], [-3], [5, -9]])
def test_probe_layer_out_of_range(layers_asked):
    model = tiny_model("llama", layers=2)
    with pytest.raises(ProbeError) as info:
        Probe(model, layers_asked, HIDDEN, CPU)
    msg = str(info.value)
    assert "sap.probe_layers" in msg and "2 decoder layers" in msg and "0..1" in msg
    bad = [i for i in layers_asked if not -2 <= i < 2]
    assert str(bad) in msg
    assert not any(block._forward_hooks for block in find_decoder_layers(model))  # nothing left attached


def test_negative_layer_indices_count_from_the_top():
    model = tiny_model("llama", layers=4)
    probe = Probe(model, [-1, 1], HIDDEN, CPU)
    assert probe.layers == [1, 3]
    assert probe.vectors.shape == (2, HIDDEN) and probe.vectors.dtype == torch.float32 and probe.vectors.requires_grad


# --------------------------------------------------------------------------- the hook


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_adds_v_to_the_block_output(arch):
    ids = _ids()
    reference = tiny_model(arch, layers=3)
    probed = tiny_model(arch, layers=3)  # same seed: same weights
    ref_inputs, probed_inputs = _layer_inputs(reference), _layer_inputs(probed)
    # Attached before the first forward, as the trainer does: transformers (5.x) installs its
    # output_hidden_states capture hooks on the first forward, so they then run after the
    # probe's hook and record the probed output. (Attached later, hidden_states would show the
    # block output before V while the residual stream itself still carries V.)
    probe = Probe(probed, [1], HIDDEN, CPU)
    v = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probe.vectors.copy_(v)
        ref = reference(input_ids=ids, output_hidden_states=True)
        out = probed(input_ids=ids, output_hidden_states=True)
    # layer 2 consumes (output of layer 1) + V; layers 0 and 1 see what they saw before
    torch.testing.assert_close(probed_inputs[0], ref_inputs[0])
    torch.testing.assert_close(probed_inputs[1], ref_inputs[1])
    torch.testing.assert_close(probed_inputs[2], ref_inputs[2] + v[0], rtol=1e-5, atol=1e-5)
    # the same through output_hidden_states: entry k + 1 is the output of block k
    torch.testing.assert_close(out.hidden_states[0], ref.hidden_states[0])
    torch.testing.assert_close(out.hidden_states[1], ref.hidden_states[1])
    torch.testing.assert_close(out.hidden_states[2], ref.hidden_states[2] + v[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.logits, ref.logits)


def test_each_probe_layer_gets_its_own_vector():
    ids = _ids()
    reference, probed = tiny_model("llama", layers=4), tiny_model("llama", layers=4)
    probe = Probe(probed, [2, 0], HIDDEN, CPU)  # sorted: vectors[0] is layer 0, vectors[1] layer 2
    assert probe.layers == [0, 2]
    ref_in, probed_in = _layer_inputs(reference), _layer_inputs(probed)
    with torch.no_grad():
        probe.vectors[0].fill_(1.0)
        probe.vectors[1].zero_()
        reference(input_ids=ids)
        probed(input_ids=ids)
    torch.testing.assert_close(probed_in[1], ref_in[1] + 1.0)
    assert not torch.allclose(probed_in[2], ref_in[2])  # the shift at layer 0 propagates


def test_enabled_false_and_remove_are_no_ops():
    ids = _ids()
    reference, probed = tiny_model("llama", layers=3), tiny_model("llama", layers=3)
    probe = Probe(probed, [0, 2], HIDDEN, CPU)
    with torch.no_grad():
        probe.vectors.fill_(2.0)
        ref = reference(input_ids=ids, output_hidden_states=True)
        probe.enabled = False
        off = probed(input_ids=ids, output_hidden_states=True)
        probe.enabled = True
        on = probed(input_ids=ids).logits
        probe.remove()
        removed = probed(input_ids=ids).logits
    assert torch.equal(off.logits, ref.logits)
    assert all(torch.equal(a, b) for a, b in zip(off.hidden_states, ref.hidden_states))
    assert not torch.allclose(on, ref.logits)
    assert torch.equal(removed, ref.logits)


def test_zero_probe_is_a_no_op_and_reset_zeroes():
    ids = _ids()
    reference, probed = tiny_model("qwen2"), tiny_model("qwen2")
    probe = Probe(probed, [0, 1], HIDDEN, CPU)
    with torch.no_grad():
        assert torch.equal(probed(input_ids=ids).logits, reference(input_ids=ids).logits)
        probe.vectors.fill_(1.0)
    probe.reset()
    assert probe.vectors.abs().sum() == 0 and probe.vectors.requires_grad


def test_gradient_reaches_v():
    model = tiny_model("llama", layers=3)
    probe = Probe(model, [1], HIDDEN, CPU)
    loss = model(input_ids=_ids()).logits.square().mean()
    (grad,) = torch.autograd.grad(loss, [probe.vectors])
    assert grad.shape == (1, HIDDEN) and grad.abs().sum() > 0


def test_bf16_model_keeps_fp32_probe():
    model = tiny_model("llama", layers=2).to(torch.bfloat16)
    probe = Probe(model, [0], HIDDEN, CPU)
    loss = model(input_ids=_ids()).logits.float().square().mean()
    (grad,) = torch.autograd.grad(loss, [probe.vectors])
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


# --------------------------------------------------------------------------- cut_below


def _loss_and_grads(model, probe, ids, cut: bool):
    probe.cut_below = cut
    layers = find_decoder_layers(model)
    named = {
        "embed": model.get_input_embeddings().weight,
        "layer0": layers[0].mlp.down_proj.weight,
        "layer1": layers[1].self_attn.q_proj.weight,  # the lowest probe layer itself
        "layer2": layers[2].mlp.down_proj.weight,
        "layer3": layers[3].self_attn.o_proj.weight,
        "lm_head": model.get_output_embeddings().weight,
        "V": probe.vectors,
    }
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return loss.detach(), dict(zip(named, grads))


def test_cut_below_detaches_under_the_lowest_probe_layer():
    model = tiny_model("llama", layers=4, tie=False)
    probe = Probe(model, [3, 1], HIDDEN, CPU)
    with torch.no_grad():
        probe.vectors.normal_(generator=torch.Generator().manual_seed(0))
    ids = _ids()
    loss_full, full = _loss_and_grads(model, probe, ids, cut=False)
    loss_cut, cut = _loss_and_grads(model, probe, ids, cut=True)
    # without the cut, every parameter has a gradient
    assert all(g is not None and g.abs().sum() > 0 for g in full.values())
    # the forward pass is unchanged
    assert torch.equal(loss_full, loss_cut)
    # the cut: nothing at or below the lowest probe layer (layer 1) is in the graph
    assert cut["embed"] is None and cut["layer0"] is None and cut["layer1"] is None
    # above it, and for V, the gradients are exactly those of the uncut graph
    for name in ("layer2", "layer3", "lm_head", "V"):
        torch.testing.assert_close(cut[name], full[name], rtol=1e-6, atol=1e-8)
    probe.cut_below = False
    _, again = _loss_and_grads(model, probe, ids, cut=False)
    assert again["layer0"] is not None  # the flag, not the hook, decides


# --------------------------------------------------------------------------- variants


def test_hidden_norms_are_measured_before_the_probe_is_added():
    model = tiny_model("llama", layers=3)
    probe = Probe(model, [0, 2], HIDDEN, CPU)
    with torch.no_grad():
        probe.vectors.fill_(5.0)
    seen = _layer_inputs(model)  # block i+1 receives block i's output (+ V)
    probe.measure = True
    with torch.no_grad():
        model(_ids())
    want0 = (seen[1] - 5.0).norm(dim=-1).mean()
    assert torch.allclose(probe.hidden_norms[0], want0, rtol=1e-5)
    probe.measure = False
    probe.hidden_norms.zero_()
    with torch.no_grad():
        model(_ids())
    assert probe.hidden_norms.abs().max() == 0


def test_rescale_and_random_init():
    model = tiny_model("llama", layers=3)
    probe = Probe(model, [0, 2], HIDDEN, CPU)
    probe.init_random(2.5, seed=3)
    assert torch.allclose(probe.vectors.norm(dim=-1), torch.full((2,), 2.5))
    other = Probe(tiny_model("llama", layers=3), [0, 2], HIDDEN, CPU)
    other.init_random(2.5, seed=3)
    assert torch.equal(probe.vectors, other.vectors)  # same seed on every rank: the same probe
    direction = probe.vectors.detach().clone()
    probe.rescale(torch.tensor([1.0, 7.0]))
    assert torch.allclose(probe.vectors.norm(dim=-1), torch.tensor([1.0, 7.0]))
    assert torch.allclose(probe.vectors[1] / 7.0, direction[1] / 2.5, atol=1e-6)
    probe.reset()
    probe.rescale(torch.tensor([1.0, 7.0]))
    assert probe.vectors.abs().max() == 0  # zero stays zero, no NaN


def test_probe_written_as_down_proj_bias_gives_the_hooked_logits():
    """export.keep_probe: the plain model with the probe as mlp.down_proj.bias computes what
    the model with the probe hooks computes, and loads back in plain transformers."""
    from sap_ds.sap.probe import with_probe_as_bias

    model = tiny_model("llama", layers=3)
    probe = Probe(model, [0, 2], HIDDEN, CPU)
    probe.init_random(3.0, seed=0)
    with torch.no_grad():
        hooked = model(_ids()).logits
    probe.remove()
    with torch.no_grad():
        plain = model(_ids()).logits
    biased = with_probe_as_bias(model, probe).eval()
    with torch.no_grad():
        baked = biased(_ids()).logits
    assert not torch.allclose(plain, hooked, atol=1e-3), "the probe must change the logits for this test to mean anything"
    assert torch.allclose(baked, hooked, atol=1e-5), (baked - hooked).abs().max()
    assert biased.config.mlp_bias and biased.model.layers[1].mlp.down_proj.bias.abs().max() == 0


def test_keep_probe_needs_an_mlp_bias_option():
    from sap_ds.sap.probe import with_probe_as_bias

    model = tiny_model("gpt2", layers=2)
    probe = Probe(model, [0], HIDDEN, CPU)
    with pytest.raises(ValueError, match="has no mlp_bias option"):
        with_probe_as_bias(model, probe)


def test_probe_pass_gradient_bypasses_an_output_hook_that_rescales():
    """DeepSpeed hooks the engine's outputs with ``_backward_prologue_per_tensor``, which
    divides a torch-style backward's gradient by the accumulation steps; the probe pass
    hands on the gradient as it arrived (sap.bypass_engine_grad_scaling)."""
    from sap_ds.sap.step import bypass_engine_grad_scaling

    model = tiny_model("llama", layers=2)
    probe = Probe(model, [0], HIDDEN, CPU)
    ids = _ids()

    def probe_grad(bypass: bool):
        logits = model(input_ids=ids).logits
        logits.register_hook(lambda g: g / 3)  # what the engine's hook does at grad_accum 3
        if bypass:
            logits = bypass_engine_grad_scaling(logits)
        return torch.autograd.grad(logits.square().mean(), [probe.vectors])[0]

    plain = torch.autograd.grad(model(input_ids=ids).logits.square().mean(), [probe.vectors])[0]
    torch.testing.assert_close(probe_grad(bypass=False), plain / 3)
    torch.testing.assert_close(probe_grad(bypass=True), plain, rtol=0, atol=0)
