"""Sequential editing (the released code's top-down pruning and ActSVD) against an independent
implementation: for each block in turn, a full forward pass of the partly edited model with
hooks on that block's layers, the definition applied in float64, the block edited."""

from __future__ import annotations

import copy

import pytest
import torch
from test_calibrate import tiny_llama
from test_data import tokenizer
from test_lowrank import SAFETY

from pyattr.data import encode_all
from pyattr.masks import region
from pyattr.models import find_linear_layers
from pyattr.sequential import sequential_actsvd, sequential_region


def _inputs_of_block(model, tok, block: int) -> dict[str, torch.Tensor]:
    """The counted input rows (response tokens and EOS) of each layer of ``block``, float64,
    one example at a time through the whole model."""
    layers = [layer for layer in find_linear_layers(model) if layer.block == block]
    rows: dict[str, list] = {layer.name: [] for layer in layers}
    handles = []
    for layer in layers:

        def hook(_m, args, name=layer.name):
            rows[name].append(args[0][0].double())

        handles.append(layer.module.register_forward_pre_hook(hook))
    try:
        for e in encode_all(tok, SAFETY):
            with torch.no_grad():
                model(input_ids=e.input_ids[None])
            for name in rows:
                rows[name][-1] = rows[name][-1][e.counted]
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(r) for name, r in rows.items()}


def _row_top(scores: torch.Tensor, q: float) -> torch.Tensor:
    """Per row the ⌊q·d_in⌋ largest, ties to the lower column (a stable sort)."""
    k = int(q * scores.shape[1])
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def test_sequential_wanda_equals_block_by_block_pruning_by_hand():
    model, tok = tiny_llama(torch.float32), tokenizer()  # the selection kernels take fp32
    found = sequential_region(copy.deepcopy(model), tok, SAFETY, q=0.3, progress=False)
    reference = copy.deepcopy(model)
    blocks = sorted({layer.block for layer in find_linear_layers(model)})
    one_pass = region(model, _stats(model, tok), score="wanda", q=0.3)[0]
    for block in blocks:
        xs = _inputs_of_block(reference, tok, block)
        layers = {layer.name: layer for layer in find_linear_layers(reference)}
        for name, x in xs.items():
            w = layers[name].weight
            s = (x**2).mean(0)
            want = _row_top(w.detach().abs().double() * s.sqrt(), 0.3)
            assert torch.equal(found.masks[name], want), name
            with torch.no_grad():
                w.masked_fill_(want, 0)
    names = [layer.name for layer in find_linear_layers(model)]
    first = [n for n in names if ".0." in n]
    later = [n for n in names if ".0." not in n]
    assert all(torch.equal(found.masks[n], one_pass.masks[n]) for n in first)  # block 0 alike
    assert any(not torch.equal(found.masks[n], one_pass.masks[n]) for n in later)


def _stats(model, tok):
    import pyattr

    return pyattr.calibrate(model, tok, SAFETY, progress=False)


def test_sequential_actsvd_equals_block_by_block_projection_by_hand():
    model, tok = tiny_llama(torch.float64), tokenizer()
    edited = copy.deepcopy(model)
    report = sequential_actsvd(
        edited, tok, SAFETY, r=2, progress=False, accumulate_dtype=torch.float64
    )
    reference = copy.deepcopy(model)
    for block in sorted({layer.block for layer in find_linear_layers(model)}):
        xs = _inputs_of_block(reference, tok, block)
        layers = {layer.name: layer for layer in find_linear_layers(reference)}
        for name, x in xs.items():
            w = layers[name].weight
            y = x @ w.detach().double().T  # A = Yᵀ Y = W C Wᵀ
            u = torch.linalg.eigh(y.T @ y).eigenvectors.flip(-1)[:, :2]
            with torch.no_grad():
                w.copy_(w - u @ (u.T @ w))
    for a, b in zip(find_linear_layers(edited), find_linear_layers(reference), strict=True):
        torch.testing.assert_close(a.weight, b.weight, atol=1e-9, rtol=1e-6)
    assert all(v["rank"] == 2 for v in report.layers.values())


def test_sequential_mode_refuses_scores_that_need_gradients():
    model, tok = tiny_llama(torch.float64), tokenizer()
    with pytest.raises(ValueError, match="backward pass through the whole model"):
        sequential_region(model, tok, SAFETY, score="snip", q=0.1, progress=False)
    import pyattr

    with pytest.raises(ValueError, match="after_block needs layerwise=True"):
        pyattr.calibrate(model, tok, SAFETY, after_block=lambda b, s: None, progress=False)


def test_command_line_sequential_mask(tmp_path, capsys):
    import pyattr
    from pyattr import toy
    from pyattr.__main__ import main
    from pyattr.data import load_pairs

    out, folder = tmp_path / "m.safetensors", tmp_path / "pruned"
    args = ["mask", "--sequential", "--q", "0.05", "--out", str(out), "--pruned-out", str(folder)]
    assert main(args) == 0
    assert "sequential mask of" in capsys.readouterr().out
    mask = pyattr.load_mask(out)
    model, tok = toy.load(progress=False)
    want = sequential_region(
        model,
        tok,
        load_pairs(toy.data(progress=False)["safety_calibration"]),
        q=0.05,
        progress=False,
    )
    assert all(torch.equal(mask.masks[n], want.masks[n]) for n in want.masks)
    pruned, _ = pyattr.cli.load_model(str(folder))
    for layer in find_linear_layers(pruned):
        assert bool((layer.weight[mask.masks[layer.name]] == 0).all())
    with pytest.raises(SystemExit, match="not set differences"):
        main(["mask", "--sequential", "--q", "0.05", "--p", "0.05", "--out", str(out)])
