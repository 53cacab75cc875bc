"""Whole-model regions from two calibration sets."""

from __future__ import annotations

import pytest
import torch
from test_calibrate import EXAMPLES, tiny_llama
from test_data import tokenizer
from test_models import build

import pyattr
from pyattr.data import Example
from pyattr.masks import random_like, region
from pyattr.models import find_linear_layers

UTILITY = [Example("make a cake", "sure here is the answer"), Example("how", "sure")]


@pytest.mark.parametrize("method", ["wanda", "snip"])
def test_set_difference_region_over_the_model(method):
    model = tiny_llama(torch.float32)
    tok = tokenizer()
    collect = ("norms", "snip")
    safety = pyattr.calibrate(model, tok, EXAMPLES, collect=collect, progress=False)
    utility = pyattr.calibrate(model, tok, UTILITY, collect=collect, progress=False)
    mask, counts = region(model, safety, utility, method=method, q=0.2, p=0.1)
    layers = find_linear_layers(model)
    assert set(mask.masks) == {layer.name for layer in layers} == set(counts)
    for layer in layers:
        w = layer.weight
        if method == "wanda":
            s_stat, u_stat = safety.sq_norms(layer.name), utility.sq_norms(layer.name)
        else:
            s_stat, u_stat = safety.grad(layer.name), utility.grad(layer.name)
        want, c = pyattr.set_difference_mask(w.detach(), s_stat, u_stat, q=0.2, p=0.1)
        assert torch.equal(mask.masks[layer.name], want) and counts[layer.name] == c
        assert int(mask.masks[layer.name].sum()) == c.size
    top, none = region(model, safety, method=method, q=0.05)
    assert none == {} and abs(top.sparsity()["overall"] - 0.05) < 0.03
    control = random_like(mask, seed=1)
    for name, m in mask.masks.items():
        assert int(control.masks[name].sum()) == int(m.sum())
    assert torch.equal(random_like(mask, seed=1).masks[name], control.masks[name])


def test_conv1d_layers_and_bad_arguments():
    model = build("gpt2")
    tok = tokenizer()
    model.resize_token_embeddings(len(tok.get_vocab()))
    stats = pyattr.calibrate(model, tok, EXAMPLES, progress=False)
    mask, _ = region(model, stats, q=0.1, largest=False)
    layer = find_linear_layers(model)[0]
    assert mask.masks[layer.name].shape == (layer.d_out, layer.d_in)
    with pytest.raises(ValueError, match="both utility and p"):
        region(model, stats, stats, q=0.1)
    with pytest.raises(ValueError, match="method must be"):
        region(model, stats, q=0.1, method="fisher")
    with pytest.raises(ValueError, match="no SNIP statistics"):
        region(model, stats, q=0.1, method="snip")
