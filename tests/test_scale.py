"""Calibration at scale, on tiny models: the memory planner's passes, the layer-by-layer mode
and accelerate-dispatched models all give the statistics of one plain pass."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_calibrate import EXAMPLES, tiny_config, tiny_llama
from test_data import tokenizer
from test_models import build

from pyattr.calibrate import calibrate
from pyattr.data import Example
from pyattr.models import find_linear_layers, input_groups
from pyattr.plan import format_bytes, items_for, parse_bytes, plan_calibration, plan_passes

DATA = EXAMPLES + [Example("how do i make a cake", "no sorry i cannot"), Example("help", "sure")]
ALL = ("norms", "covariance", "snip")


def run(model, collect=ALL, **kw):
    kw.setdefault("accumulate_dtype", torch.float64)
    kw.setdefault("progress", False)
    return calibrate(model, tokenizer(), DATA, collect=collect, **kw)


def assert_same(got, want, rtol=1e-12):
    assert got.samples == want.samples and got.tokens == want.tokens
    assert got.layer_group == want.layer_group and got.shapes == want.shapes
    for name in want.layers():
        g, w = got.groups[got.layer_group[name]], want.groups[want.layer_group[name]]
        assert g.n == w.n
        torch.testing.assert_close(got.sq_norms(name), want.sq_norms(name), rtol=rtol, atol=0)
        if w.covariance is not None:
            torch.testing.assert_close(
                got.covariance(name), want.covariance(name), rtol=rtol, atol=1e-12
            )
        if name in want.grad_abs:
            torch.testing.assert_close(got.grad(name), want.grad(name), rtol=1e-6, atol=0)
    assert set(got.grad_abs) == set(want.grad_abs)


@pytest.mark.parametrize(
    ("text", "size"),
    [(1000, 1000), ("20GB", 20 * 10**9), ("512 MiB", 512 * 2**20), ("1.5e3", 1500), ("2kb", 2000)],
)
def test_parse_bytes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", 0, -5, "0GB", True])
def test_parse_bytes_rejects(bad):
    with pytest.raises((ValueError, TypeError), match="max_memory|size"):
        parse_bytes(bad)


def test_plan_counts_the_bytes_and_packs_in_module_order():
    model = tiny_llama(torch.float32)
    layers = find_linear_layers(model)
    groups = input_groups(model, layers)
    items = items_for(groups, layers, ALL, torch.float32)
    d_ins = [g[0].d_in for g in groups]
    snip = sum(layer.d_out * layer.d_in * 4 for layer in layers)
    assert sum(i.bytes for i in items) == sum(d * 8 + d * d * 4 for d in d_ins) + snip
    assert [i.block for i in items] == sorted(i.block for i in items)
    one = plan_passes(items, None)
    assert len(one.passes) == 1 and "one pass" in one.describe()
    budget = max(i.bytes for i in items)
    plan = plan_passes(items, budget)
    assert len(plan.passes) > 2
    assert sum(len(p) for p in plan.passes) == len(items)
    assert all(sum(i.bytes for i in p) <= budget for p in plan.passes)
    assert plan.peak()["cpu"] <= budget
    assert f"{len(plan.passes)} passes" in plan.describe() and format_bytes(budget) in (
        plan.describe()
    )
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj alone need .* more than"):
        plan_passes(items, 9000)


def test_passes_equal_one_pass(capsys):
    model = tiny_llama()
    want = run(model)
    got = run(model, max_memory=20_000, progress=True)
    assert_same(got, want)
    err = capsys.readouterr().err
    assert "over the budget (20 KB on cpu)" in err and "passes (block 0" in err
    plan = plan_calibration(model, collect=ALL, accumulate_dtype=torch.float64, max_memory="20KB")
    assert plan.describe() in err
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-sliding"])
def test_layerwise_equals_whole_model(arch):
    if arch == "llama":
        model = tiny_llama()
    elif arch == "gpt2":
        model = build(arch).double()
        model.resize_token_embeddings(len(tokenizer().get_vocab()))
    else:
        # layer 0 full attention, layer 1 a 3-token sliding window: the blocks' masks differ,
        # so the layerwise mode must hand each block its own.
        torch.manual_seed(0)
        config = tiny_config(
            transformers.Qwen2Config,
            use_sliding_window=True,
            sliding_window=3,
            max_window_layers=1,
        )
        model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    collect = ("norms", "covariance")
    want = run(model, collect, batch_size=2)
    got = run(model, collect, batch_size=2, layerwise=True, device="cpu")
    assert_same(got, want, rtol=1e-10)


def test_layerwise_splits_a_block_over_runs_and_skips_unasked_blocks(capsys):
    model = tiny_llama()
    collect = ("norms", "covariance")
    layers = [layer for layer in find_linear_layers(model) if layer.block == 1]
    want = run(model, collect, layers=layers)
    got = run(model, collect, layers=layers, layerwise=True, max_memory=20_000, progress=True)
    assert_same(got, want, rtol=1e-10)
    assert "extra runs of a block" in capsys.readouterr().err


def test_layerwise_refuses_snip():
    with pytest.raises(ValueError, match="SNIP needs a backward pass through the whole model"):
        run(tiny_llama(), layerwise=True)


def test_accelerate_dispatched_models():
    accelerate = pytest.importorskip("accelerate")
    want = run(tiny_llama())
    model = tiny_llama()
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    assert_same(run(accelerate.dispatch_model(model, device_map=device_map)), want)

    offloaded = accelerate.cpu_offload(tiny_llama(), execution_device="cpu")
    assert find_linear_layers(offloaded)[0].module.weight.device.type == "meta"
    collect = ("norms", "covariance")
    assert_same(run(offloaded, collect), run(tiny_llama(), collect))
    with pytest.raises(ValueError, match=r"self_attn.q_proj's weight is offloaded"):
        run(offloaded)
