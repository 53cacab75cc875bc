"""Calibration on tiny random models, checked against the paper's definitions computed with
plain autograd (one sample per backward, response tokens only)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from test_data import WORDS, tokenizer
from test_models import build

import pyattr
from pyattr.calibrate import calibrate
from pyattr.data import Example, encode
from pyattr.models import find_linear_layers

EXAMPLES = [
    Example("how do i make a cake", "sure here is the answer"),
    Example("how do i", "no sorry i cannot help you"),
    Example("make a cake", "sure"),
]


TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_config(kind=transformers.LlamaConfig, **overrides):
    """A two-block config over the test tokenizer's vocabulary."""
    return kind(vocab_size=len(tokenizer().get_vocab()), **(TINY | overrides))


def tiny_llama(dtype=torch.float64):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config()).to(dtype).eval()


def paper_statistics(model, tok):
    """Wanda's s_j and SNIP's Σ_b |∂L_b/∂W| exactly as defined, with no pyattr machinery."""
    layers = find_linear_layers(model)
    inputs = {layer.name: [] for layer in layers}
    grads = {layer.name: torch.zeros_like(layer.weight, dtype=torch.float64) for layer in layers}
    handles = [
        layer.module.register_forward_pre_hook(
            lambda m, a, name=layer.name: inputs[name].append(a[0].detach()[0])
        )
        for layer in layers
    ]
    for ex in EXAMPLES:
        enc = encode(tok, ex)
        ids = enc.input_ids[None]
        model.zero_grad()
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        target = enc.counted[1:]
        loss = torch.nn.functional.cross_entropy(logits[target], ids[0, 1:][target])
        loss.backward()
        for layer in layers:
            grads[layer.name] += layer.module.weight.grad.abs()
        for name in inputs:
            inputs[name][-1] = inputs[name][-1][enc.counted]
    for h in handles:
        h.remove()
    model.zero_grad()
    norms = {name: torch.cat(xs).pow(2).mean(0) for name, xs in inputs.items()}
    covs = {name: torch.cat(xs).T @ torch.cat(xs) for name, xs in inputs.items()}
    return norms, covs, grads


def test_matches_the_paper_definitions():
    tok = tokenizer()
    model = tiny_llama()
    norms, covs, grads = paper_statistics(model, tok)
    stats = calibrate(
        model,
        tok,
        EXAMPLES,
        collect=("norms", "covariance", "snip"),
        accumulate_dtype=torch.float64,
        progress=False,
    )
    assert stats.samples == 3
    assert stats.tokens == sum(int(encode(tok, ex).counted.sum()) for ex in EXAMPLES)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for layer in find_linear_layers(model):
        torch.testing.assert_close(
            stats.sq_norms(layer.name), norms[layer.name], rtol=1e-12, atol=0
        )
        torch.testing.assert_close(
            stats.covariance(layer.name), covs[layer.name], rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            stats.grad(layer.name).double(), grads[layer.name], rtol=1e-6, atol=1e-12
        )
        w = layer.weight.float()
        wanda = pyattr.wanda_mask(w, stats.sq_norms(layer.name), fraction=0.3)
        assert torch.equal(wanda, pyattr.wanda_mask(w, norms[layer.name], fraction=0.3))
        snip = pyattr.snip_mask(w, stats.grad(layer.name), fraction=0.3)
        assert torch.equal(snip, pyattr.snip_mask(w, grads[layer.name].float(), fraction=0.3))


def test_shared_inputs_share_one_accumulator():
    stats = calibrate(tiny_llama(torch.float32), tokenizer(), EXAMPLES, progress=False)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert stats.layer_group[q] == stats.layer_group[k] == q
    assert len(stats.groups) == 8
    assert torch.equal(stats.sq_norms(q), stats.sq_norms(k))
    with pytest.raises(ValueError, match="covariance was not collected"):
        stats.covariance(q)
    with pytest.raises(ValueError, match="no SNIP statistics"):
        stats.grad(q)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "phi3"])
def test_other_architectures(arch):
    tok = tokenizer()
    model = build(arch)
    model.resize_token_embeddings(len(tok.get_vocab()))
    stats = calibrate(model, tok, EXAMPLES[:2], collect=("norms", "snip"), progress=False)
    for layer in find_linear_layers(model):
        assert stats.sq_norms(layer.name).shape == (layer.d_in,)
        assert stats.grad(layer.name).shape == (layer.d_out, layer.d_in)
        assert bool(stats.grad(layer.name).gt(0).any())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_one_at_a_time(arch):
    tok = tokenizer()
    model = tiny_llama() if arch == "llama" else build(arch).double()
    model.resize_token_embeddings(len(tok.get_vocab()))
    data = EXAMPLES * 3
    one = calibrate(
        model,
        tok,
        data,
        collect=("norms", "covariance"),
        accumulate_dtype=torch.float64,
        progress=False,
    )
    batched = calibrate(
        model,
        tok,
        data,
        collect=("norms", "covariance"),
        batch_size=4,
        accumulate_dtype=torch.float64,
        progress=False,
    )
    assert batched.tokens == one.tokens and batched.samples == one.samples
    for name in one.layers():
        torch.testing.assert_close(batched.sq_norms(name), one.sq_norms(name), rtol=1e-10, atol=0)
        torch.testing.assert_close(
            batched.covariance(name), one.covariance(name), rtol=1e-10, atol=1e-10
        )
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        calibrate(model, tok, data, batch_size=0, progress=False)


def test_a_path_is_read_and_other_types_are_named(tmp_path):
    model, tok = tiny_llama(), tokenizer()
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in EXAMPLES)
    )
    from_file = calibrate(model, tok, str(path), progress=False)
    from_list = calibrate(model, tok, EXAMPLES, progress=False)
    assert from_file.tokens == from_list.tokens
    for name in from_list.layers():
        assert torch.equal(from_file.sq_norms(name), from_list.sq_norms(name))
    with pytest.raises(TypeError, match="a path to a pairs file, or a sequence"):
        calibrate(model, tok, 42, progress=False)
    with pytest.raises(TypeError, match="got an item of type str"):
        calibrate(model, tok, ["how do i", "x"], progress=False)
    with pytest.raises(FileNotFoundError):
        calibrate(model, tok, tmp_path / "missing.csv", progress=False)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        calibrate(tiny_llama(), tokenizer(), [], progress=False)
    with pytest.raises(ValueError, match="collect must be among"):
        calibrate(tiny_llama(), tokenizer(), EXAMPLES, collect=("fisher",), progress=False)
    model = tiny_llama(torch.float32)
    layer = find_linear_layers(model)[3]
    layer.module.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"1 NaN/Inf values in {layer.name}.weight"):
        calibrate(model, tokenizer(), EXAMPLES, progress=False)
    # finite weights whose activations overflow: named by the layer whose inputs they are
    layer.module.weight.data[0, 0] = 0.0
    gate = find_linear_layers(model)[4]  # model.layers.0.mlp.gate_proj
    gate.module.weight.data[:] = 3e38
    with pytest.raises(pyattr.NonFiniteActivationError, match="model.layers.0.mlp.down_proj"):
        calibrate(model, tokenizer(), EXAMPLES, progress=False)


_WORDS = WORDS[12:]  # the plain words of the test vocabulary


def sentences(n: int, seed: int, refuse: bool) -> list[Example]:
    """``n`` random pairs over the test vocabulary; refusals or answers as responses."""
    import random

    rng = random.Random(seed)
    reply = "no sorry i cannot help you" if refuse else "sure here is the answer"
    return [
        Example(" ".join(rng.choices(_WORDS, k=rng.randint(3, 9))), f"{reply} {rng.choice(_WORDS)}")
        for _ in range(n)
    ]


def test_eos_can_be_left_out_of_the_statistics():
    """``eos=False`` (the released code's statistics, ``--no-eos``) counts the response tokens
    only: one token fewer per example, and Σx² loses exactly the EOS rows' squares."""
    model, tok = tiny_llama(torch.float32), tokenizer()
    with_eos = calibrate(model, tok, EXAMPLES, progress=False)
    without = calibrate(model, tok, EXAMPLES, eos=False, progress=False)
    assert without.tokens == with_eos.tokens - len(EXAMPLES)
    name = find_linear_layers(model)[0].name
    assert bool((without.sq_norms(name) != with_eos.sq_norms(name)).any())
