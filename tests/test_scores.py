"""Score methods through the registry: signed SNIP and magnitude end to end (calibration,
statistics files, regions, command line), and a new method added by one registry entry."""

from __future__ import annotations

import pytest
import torch
from pyattr.kernels.matrix_topk import matrix_topk_ref
from pyattr.kernels.row_topk import row_topk_ref
from test_calibrate import EXAMPLES, tiny_llama
from test_data import tokenizer

import pyattr
from pyattr import ops
from pyattr import scores as scoring
from pyattr.masks import region
from pyattr.models import find_linear_layers
from pyattr.selection import count_for


@pytest.fixture(scope="module")
def model_and_stats():
    model = tiny_llama(torch.float32)
    tok = tokenizer()
    stats = pyattr.calibrate(
        model, tok, EXAMPLES, collect=("norms", "snip", "grad_sum"), progress=False
    )
    singles = [
        pyattr.calibrate(model, tok, [ex], collect=("snip", "grad_sum"), progress=False)
        for ex in EXAMPLES
    ]
    return model, stats, singles


def test_registry_lists_the_methods_and_refuses_unknown_names():
    assert scoring.names()[:4] == ["wanda", "snip", "snip_signed", "magnitude"]
    with pytest.raises(ValueError, match=r"method must be one of \['wanda'"):
        scoring.get("fisher")
    with pytest.raises(ValueError, match="already registered"):
        scoring.register(scoring.get("wanda"))


def test_signed_gradient_sums_are_the_gradient_of_the_summed_loss(model_and_stats):
    """Per sample, |Σ ∂L_b/∂W| is SNIP's |∂L_b/∂W|; over the set both are sums of the samples'
    (so one calibration equals the per-sample ones added), and the signed sum is smaller where
    samples disagree in sign: the difference between the two methods."""
    model, stats, singles = model_and_stats
    cancelled = 0
    for layer in find_linear_layers(model):
        name = layer.name
        for one in singles:
            torch.testing.assert_close(one.signed_grad(name).abs(), one.grad(name))
        total = sum(one.signed_grad(name) for one in singles)
        torch.testing.assert_close(stats.signed_grad(name), total, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            stats.grad(name), sum(one.grad(name) for one in singles), rtol=1e-5, atol=1e-7
        )
        assert bool((stats.signed_grad(name).abs() <= stats.grad(name) * (1 + 1e-6)).all())
        cancelled += int((stats.signed_grad(name).abs() < 0.5 * stats.grad(name)).sum())
    assert cancelled > 0


def test_signed_snip_region_scores_the_summed_gradient(model_and_stats, tmp_path):
    model, stats, _ = model_and_stats
    path = pyattr.save_stats(stats, tmp_path / "s.safetensors")
    back = pyattr.load_stats(path, model=model)
    mask, _ = region(model, back, method="snip_signed", q=0.1)
    for layer in find_linear_layers(model):
        scores = layer.weight.detach().float().abs() * stats.signed_grad(layer.name).abs().float()
        want = row_topk_ref(scores, count_for(0.1, layer.d_in))
        assert torch.equal(mask.masks[layer.name], want)
    with pytest.raises(ValueError, match="collect=\\(..., 'grad_sum'\\)"):
        region(
            model,
            pyattr.calibrate(model, tokenizer(), EXAMPLES[:1], progress=False),
            method="snip_signed",
            q=0.1,
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("granularity", ["row", "matrix"])
def test_magnitude_needs_no_data(backend, granularity):
    """The no-data baseline: the largest |W| of each row (or of the matrix), on both backends."""
    model = tiny_llama(torch.float32)
    with ops.force_backend(backend):
        mask, _ = region(model, None, method="magnitude", q=0.2, granularity=granularity)
    for layer in find_linear_layers(model):
        scores = layer.weight.detach().abs()
        if granularity == "row":
            want = row_topk_ref(scores, count_for(0.2, layer.d_in))
        else:
            want = matrix_topk_ref(scores, count_for(0.2, scores.numel()))
        assert torch.equal(mask.masks[layer.name], want)
    with pytest.raises(ValueError, match="the wanda score needs calibration statistics"):
        region(model, None, method="wanda", q=0.2)


def test_a_new_method_is_one_registry_entry(model_and_stats):
    """A method registered here (Wanda with s instead of √s) is usable by region at once."""
    model, stats, _ = model_and_stats
    method = scoring.ScoreMethod(
        "wanda_squared",
        collect="norms",
        per_entry=False,
        read=lambda st, layer, shape: st.sq_norms(layer).square(),
        summary="|W|·s",
    )
    scoring.register(method)
    try:
        mask, _ = region(model, stats, method="wanda_squared", q=0.25)
        for layer in find_linear_layers(model):
            s = stats.sq_norms(layer.name)
            scores = layer.weight.detach().float().abs() * s.float()[None, :]
            want = row_topk_ref(scores, count_for(0.25, layer.d_in))
            assert torch.equal(mask.masks[layer.name], want)
        bad = scoring.ScoreMethod("bad", None, True, lambda *a: torch.ones(3), "wrong shape")
        scoring.register(bad)
        with pytest.raises(ValueError, match=r"bad read a \(3,\) statistic"):
            region(model, stats, method="bad", q=0.1)
    finally:
        scoring._REGISTRY.pop("wanda_squared")
        scoring._REGISTRY.pop("bad")


def test_command_line_takes_its_methods_from_the_registry(tmp_path, capsys):
    from pyattr.__main__ import main

    out = tmp_path / "m"
    assert main(["mask", "--method", "magnitude", "--q", "0.05", "--out", str(out)]) == 0
    assert "mask of 4." in capsys.readouterr().out  # ⌊0.05·d_in⌋ per row
    assert pyattr.load_mask(out).sparsity()["overall"] == pytest.approx(0.05, abs=0.01)
    with pytest.raises(SystemExit, match="--score snip needs --safety"):
        main(["mask", "--method", "snip", "--q", "0.05", "--out", str(tmp_path / "x")])
    stats = tmp_path / "s.safetensors"
    assert main(["calibrate", "--collect", "grad_sum", "--n", "4", "--out", str(stats)]) == 0
    assert pyattr.load_stats(stats).grad_sum
    signed = ["--method", "snip_signed", "--safety", str(stats), "--q", "0.05"]
    assert main(["mask", *signed, "--out", str(tmp_path / "signed")]) == 0
