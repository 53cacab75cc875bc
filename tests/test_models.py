"""Layer discovery on tiny random models of every supported architecture, built from configs."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from pyattr.models import decoder_blocks, find_linear_layers, input_groups

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)

# architecture → (config, layers per block, the input groups of block 0 by short name)
ARCHS = {
    "llama": (
        lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2),
        7,
        [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    ),
    "mistral": (
        lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=2),
        7,
        [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    ),
    "qwen2": (
        lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=2),
        7,
        [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    ),
    "gemma": (
        lambda: transformers.GemmaConfig(**COMMON, num_key_value_heads=2, head_dim=8),
        7,
        [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    ),
    "phi3": (
        lambda: transformers.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0),
        4,
        [["o_proj"], ["qkv_proj"], ["gate_up_proj"], ["down_proj"]],
    ),
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(**COMMON),
        4,
        [["query_key_value"], ["dense"], ["dense_h_to_4h"], ["dense_4h_to_h"]],
    ),
    "opt": (
        lambda: transformers.OPTConfig(
            vocab_size=64,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        6,
        [["k_proj", "v_proj", "q_proj"], ["out_proj"], ["fc1"], ["fc2"]],
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64
        ),
        4,
        [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]],
    ),
}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    config = ARCHS[arch][0]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_finds_every_linear_layer_in_the_blocks(arch, gen):
    model = build(arch)
    _, per_block, expected_groups = ARCHS[arch]
    layers = find_linear_layers(model)
    assert len(layers) == 2 * per_block
    assert [layer.block for layer in layers] == [0] * per_block + [1] * per_block
    names = [layer.name for layer in layers]
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    for layer in layers:
        x = torch.randn(3, layer.d_in, generator=gen)
        y = layer.module(x)
        bias = getattr(layer.module, "bias", None)
        want = x @ layer.weight.T + (bias if bias is not None else 0)
        torch.testing.assert_close(y, want)
        assert layer.weight.shape == (layer.d_out, layer.d_in)
    groups = input_groups(model, layers)
    block0 = [[layer.name.rsplit(".", 1)[1] for layer in g] for g in groups if g[0].block == 0]
    assert block0 == expected_groups


def test_gpt2_conv1d_is_transposed():
    layers = find_linear_layers(build("gpt2"))
    c_attn = layers[0]
    assert c_attn.transposed and c_attn.weight.shape == (96, 32)
    assert c_attn.weight.data_ptr() == c_attn.module.weight.data_ptr()


def test_include_and_exclude_patterns():
    model = build("llama")
    mlp = find_linear_layers(model, include=[r"\.mlp\."])
    assert [layer.name.rsplit(".", 1)[1] for layer in mlp] == [
        "gate_proj",
        "up_proj",
        "down_proj",
    ] * 2
    no_down = find_linear_layers(model, exclude=["down_proj"])
    assert len(no_down) == 12 and all("down_proj" not in layer.name for layer in no_down)
    assert decoder_blocks(model)[0] == "model.layers"


def test_models_without_layers_are_refused():
    with pytest.raises(ValueError, match="no decoder blocks found in Sequential"):
        find_linear_layers(nn.Sequential(nn.Linear(2, 2)))
    blocks = nn.Module()
    blocks.layers = nn.ModuleList([nn.Sequential(nn.ReLU(), nn.Linear(2, 2)) for _ in range(2)])
    with pytest.raises(ValueError, match="no linear layers found in the decoder blocks 'layers'"):
        find_linear_layers(blocks, include=["nothing"])


def test_architecture_helpers_have_one_home():
    """Padding, pad ids, context length, the layer map and the Conv1D layout live in models."""
    from types import SimpleNamespace

    from pyattr.models import context_length, layers_by_name, pad, pad_id

    ids, mask = pad([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[1, 2, 3], [4]], 9, left=True)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    flags, _ = pad([torch.tensor([True, False]), torch.tensor([True])], False, dtype=torch.bool)
    assert flags.tolist() == [[True, False], [True, False]]
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None), fallback=0) == 0
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))
    model = build("gpt2")
    assert context_length(model) == model.config.n_positions
    layers = layers_by_name(model)
    assert list(layers) == [layer.name for layer in find_linear_layers(model)]
    conv = next(layer for layer in layers.values() if layer.transposed)
    param = conv.module.weight
    assert conv.relayout(param).shape == (conv.d_out, conv.d_in)
    assert conv.relayout(conv.relayout(param)) is param or torch.equal(
        conv.relayout(conv.relayout(param)), param
    )
