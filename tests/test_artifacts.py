"""Saving and loading statistics and masks; prune and restore."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest
import torch
from test_calibrate import EXAMPLES, tiny_llama
from test_data import tokenizer
from test_models import build

import pyattr
from pyattr.edit import prune, restore
from pyattr.io import fingerprint
from pyattr.masks import Mask, load_mask, save_mask
from pyattr.models import find_linear_layers
from pyattr.stats import load_stats, save_stats


def test_stats_round_trip(tmp_path):
    model = tiny_llama(torch.float32)
    stats = pyattr.calibrate(
        model, tokenizer(), EXAMPLES, collect=("norms", "covariance", "snip"), progress=False
    )
    path = save_stats(
        stats,
        tmp_path / "safety.safetensors",
        model_id="tiny-llama",
        data=fingerprint(EXAMPLES),
        options={"count": "response"},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["safety.safetensors"]
    back = load_stats(path, model=model)
    assert back.samples == stats.samples and back.tokens == stats.tokens
    assert back.layer_group == stats.layer_group and back.shapes == stats.shapes
    for name in stats.layers():
        assert torch.equal(back.sq_norms(name), stats.sq_norms(name))
        assert torch.equal(back.covariance(name), stats.covariance(name))
        assert torch.equal(back.grad(name), stats.grad(name))
    with pytest.raises(ValueError, match="made for another model"):
        load_stats(path, model=build("gpt2"))
    norms_only = pyattr.calibrate(model, tokenizer(), EXAMPLES, progress=False)
    back = load_stats(save_stats(norms_only, tmp_path / "utility.safetensors"), model=model)
    assert back.shapes == norms_only.shapes and not back.grad_abs
    name = norms_only.layers()[0]
    assert torch.equal(back.sq_norms(name), norms_only.sq_norms(name))


def test_mask_round_trip_prune_and_restore(tmp_path, gen):
    model = build("gpt2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    layers = find_linear_layers(model)
    masks = {
        layer.name: torch.rand(layer.d_out, layer.d_in, generator=gen) < 0.3 for layer in layers
    }
    mask = Mask(masks)
    path = save_mask(mask, tmp_path / "region.safetensors", model_id="tiny-gpt2")
    back = load_mask(path, model=model)
    assert all(torch.equal(back.masks[k], masks[k]) for k in masks)
    sparsity = back.sparsity()
    assert 0.2 < sparsity["overall"] < 0.4
    prune(model, back)
    for layer in layers:
        assert bool((layer.weight[masks[layer.name]] == 0).all())
        kept = ~masks[layer.name]
        assert torch.equal(layer.weight[kept], original[layer.name + ".weight"].T[kept])
    base = build("gpt2")
    restore(model, base, back)
    for layer in layers:
        assert torch.equal(layer.weight, original[layer.name + ".weight"].T)
    with pytest.raises(ValueError, match="lacks"):
        prune(tiny_llama(), back)
    with pytest.raises(ValueError, match="made for another model"):
        load_mask(path, model=tiny_llama())


def test_failed_writes_leave_no_file(tmp_path, monkeypatch):
    import pyattr.io

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pyattr.io, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_mask(Mask({"a": torch.ones(2, 3, dtype=torch.bool)}), tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_wrong_files_are_refused(tmp_path):
    path = save_mask(Mask({"a": torch.ones(2, 3, dtype=torch.bool)}), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not a pyattr.stats/1 file"):
        load_stats(path)
    with pytest.raises(FileNotFoundError):
        load_mask(Path(tmp_path) / "missing.safetensors")


def test_written_files_take_the_users_umask(tmp_path):
    from pyattr.io import atomic_write

    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        os.umask(0o022)
        path = atomic_write(tmp_path / "b.txt", b"y")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def _save_mask_in_a_child(path: str) -> None:
    torch.manual_seed(0)
    model = tiny_llama(torch.float32)
    masks = {
        layer.name: torch.rand(layer.weight.shape) < 0.3 for layer in find_linear_layers(model)
    }
    pyattr.save_mask(pyattr.Mask(masks), path)


def test_the_same_content_gives_the_same_bytes(tmp_path):
    """safetensors writes its metadata in hash-map order, which changes from process to
    process; pyattr sorts the header, so a rerun of a command writes identical files."""
    ctx = multiprocessing.get_context("spawn")
    paths = [str(tmp_path / f"m{i}.safetensors") for i in range(2)]
    for path in paths:
        child = ctx.Process(target=_save_mask_in_a_child, args=(path,))
        child.start()
        child.join()
        assert child.exitcode == 0
    first, second = (Path(p).read_bytes() for p in paths)
    assert first == second
    loaded = pyattr.load_mask(paths[0])
    assert loaded.sparsity()["overall"] > 0.2
