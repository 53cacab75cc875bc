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


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_frozen_entries_do_not_move(gen, lora_rank):
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
