"""Fine-tuning attacks: the frozen entries stay bit for bit what they were (full fine-tuning with
weight decay, and LoRA through peft); everything else trains."""

from __future__ import annotations

import copy

import pytest
import torch
from test_calibrate import sentences, tiny_llama
from test_data import tokenizer

import pyattr
from pyattr.finetune import finetune
from pyattr.masks import Mask

PAIRS = sentences(16, 3, refuse=False)


def random_mask(model, gen, fraction=0.3) -> Mask:
    return Mask(
        {
            layer.name: torch.rand(layer.d_out, layer.d_in, generator=gen) < fraction
            for layer in pyattr.find_linear_layers(model)
        }
    )


@pytest.mark.parametrize("lora_rank, optimizer", [(None, "adamw"), (4, "adamw"), (None, "sgd")])
def test_frozen_entries_do_not_move(gen, lora_rank, optimizer):
    if lora_rank is not None:
        pytest.importorskip("peft")
    model, tok = tiny_llama(torch.float32), tokenizer()
    before = copy.deepcopy(model)
    mask = random_mask(model, gen)
    result = finetune(
        model,
        tok,
        PAIRS,
        frozen=mask,
        steps=12,
        lr=1e-2,
        batch_size=4,
        weight_decay=0.1,
        lora_rank=lora_rank,
        optimizer=optimizer,
        progress=False,
    )
    assert result["steps"] == 12 and result["loss_last"] < result["loss_first"]
    old = {layer.name: layer for layer in pyattr.find_linear_layers(before)}
    for layer in pyattr.find_linear_layers(model):
        m = mask.masks[layer.name]
        w, w0 = layer.weight.detach(), old[layer.name].weight.detach()
        assert torch.equal(w[m], w0[m])  # bit for bit
        assert (w[~m] != w0[~m]).float().mean() > 0.9  # the rest trained
    assert all(p.requires_grad for p in model.parameters())  # flags as they were
    assert type(model).__name__ == "LlamaForCausalLM"


def test_without_a_mask_everything_trains_and_bad_input(gen):
    model, tok = tiny_llama(torch.float32), tokenizer()
    before = copy.deepcopy(model)
    finetune(model, tok, PAIRS, steps=3, progress=False)
    changed = [
        not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters(), strict=True)
    ]
    assert all(changed)
    with pytest.raises(ValueError, match="no fine-tuning pairs"):
        finetune(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="need steps"):
        finetune(model, tok, PAIRS, steps=0, progress=False)
    with pytest.raises(ValueError, match="lacks"):
        finetune(model, tok, PAIRS, frozen=Mask({"nope": torch.ones(2, 2, dtype=torch.bool)}))


def test_sgd_steps_by_the_gradient(gen):
    """One SGD step moves every trainable weight by exactly -lr x its gradient on the batch
    (the frozen entries by nothing): what makes the frozen region's share of the attack its
    share of the squared gradient."""
    from pyattr.data import encode_all
    from pyattr.finetune import _loss
    from pyattr.models import pad_id

    model, tok = tiny_llama(torch.float64), tokenizer()
    mask = random_mask(model, gen)
    pairs = PAIRS[:4]
    reference = copy.deepcopy(model)
    _loss(reference, encode_all(tok, pairs), pad_id(tok), "cpu").backward()
    lr = 0.5
    finetune(
        model,
        tok,
        pairs,
        frozen=mask,
        steps=1,
        lr=lr,
        batch_size=4,
        optimizer="sgd",
        progress=False,
    )
    frozen = {layer.name: mask.masks[layer.name] for layer in pyattr.find_linear_layers(model)}
    named = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        ref = named[name]
        expected = ref.detach() - lr * ref.grad
        m = frozen.get(name.removesuffix(".weight"))
        if m is not None:
            expected = torch.where(m, ref.detach(), expected)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        finetune(model, tok, pairs, optimizer="adam", progress=False)
