"""Streamed eigenbases: the same bases as in memory, written one layer at a time, read lazily,
usable by every edit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_calibrate import tiny_llama
from test_data import tokenizer
from test_lowrank import SAFETY, SHAPES, UTILITY, layer_data, principal_cosines

import pyattr
from pyattr import eigenstore
from pyattr.eigenstore import EigenStore, lean_eigenbasis, stream_eigenbases
from pyattr.lowrank import eigenbasis


@pytest.fixture(scope="module")
def subject():
    model, tok = tiny_llama(torch.float32), tokenizer()
    collect = ("norms", "covariance")
    safety = pyattr.calibrate(model, tok, SAFETY, collect=collect, progress=False)
    utility = pyattr.calibrate(model, tok, UTILITY, collect=collect, progress=False)
    return model, safety, utility


def test_streamed_bases_equal_the_in_memory_ones(subject, tmp_path):
    model, safety, _ = subject
    memory = pyattr.eigenbases(model, safety, progress=False)
    store = stream_eigenbases(model, safety, tmp_path / "s", route="auto", progress=False)
    assert set(store) == set(memory) and len(store) == len(memory)
    shapes = set()
    for name, basis in memory.items():
        lazy = store[name]
        shapes.add(basis.vectors.shape[0] > basis.rank)  # gate/up: d_out > d_in; else not
        assert lazy.rank == basis.rank and lazy.digest == basis.digest
        assert lazy.d_out == basis.d_out and lazy.kept == basis.kept
        assert torch.equal(lazy.values, basis.values)
        for k in (0, 1, basis.rank // 2, basis.rank):
            assert torch.equal(lazy.top(k), basis.top(k))
    assert shapes == {True, False}  # both routes were taken
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files[-1] == "index.json" and len(files) == len(memory) + 1


def test_edits_take_a_store_and_give_the_same_weights(subject, tmp_path):
    model, safety, utility = subject
    memory = [pyattr.eigenbases(model, s, progress=False) for s in (safety, utility)]
    stores = [
        stream_eigenbases(model, s, tmp_path / n, keep=24, route="auto", progress=False)
        for s, n in ((safety, "s"), (utility, "u"))
    ]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = pyattr.edit_ranks(a, "orthogonal", *memory, keep_u=16, keep_s=3)
    rb = pyattr.edit_ranks(b, "orthogonal", *stores, keep_u=16, keep_s=3)
    assert ra.layers == rb.layers
    for x, y in zip(pyattr.find_linear_layers(a), pyattr.find_linear_layers(b), strict=True):
        assert torch.equal(x.weight, y.weight)
    c = copy.deepcopy(model)
    pyattr.edit_ranks(c, "remove", stores[0], r=2)
    with pytest.raises(ValueError, match="keeps 24"):
        stores[0][next(iter(stores[0]))].top(25)


def test_an_interrupted_stream_is_refused_and_a_rerun_replaces_it(subject, tmp_path):
    model, safety, _ = subject
    folder = tmp_path / "s"
    stream_eigenbases(model, safety, folder, keep=4, progress=False)
    index = json.loads((folder / "index.json").read_text())
    assert index["settings"]["keep"] == 4
    (folder / "index.json").unlink()  # as a run killed before its index
    with pytest.raises(FileNotFoundError, match="interrupted run"):
        EigenStore(folder)
    store = stream_eigenbases(model, safety, folder, keep=8, progress=False)
    assert all(store[n].kept == 8 for n in store)


@pytest.mark.parametrize("shape", [*SHAPES, (61, 17)])
@pytest.mark.parametrize("n", [71, 9], ids=["full-rank C", "rank-deficient C"])
@pytest.mark.parametrize("keep", [None, 7])
def test_the_lean_route_equals_the_direct_one(gen, shape, n, keep, monkeypatch):
    """The lean route (chunks of 5 rows here, so that every chunk boundary is ragged) gives the
    direct route's eigenvalues, at every k with a gap the same span of the top k eigenvectors,
    orthonormal rows, and for a rank-deficient C a completion orthogonal to the rest."""
    monkeypatch.setattr(eigenstore, "CHUNK", 5)
    w, x = layer_data(gen, *shape, n=n)
    c = x.T @ x
    direct = eigenbasis(w, c, n, route="direct")
    values, vectors_t, rank = lean_eigenbasis(w, c, n, keep=keep)
    kept = rank if keep is None else keep
    assert rank == direct.rank and vectors_t.shape == (kept, shape[0])
    scale = float(direct.values[0])
    torch.testing.assert_close(values, direct.values, rtol=0, atol=1e-9 * scale)
    nonzero = int((direct.values > 1e-9 * scale).sum())
    for k in sorted({1, min(nonzero // 2, kept), min(nonzero, kept)}):
        if k == 0 or (k < rank and direct.values[k - 1] - direct.values[k] < 1e-6 * scale):
            continue
        cos = principal_cosines(vectors_t[:k].T, direct.vectors[:, :k])
        torch.testing.assert_close(cos, torch.ones(k, dtype=cos.dtype), rtol=0, atol=1e-7)
    gram = vectors_t @ vectors_t.T
    torch.testing.assert_close(gram, torch.eye(kept, dtype=gram.dtype), rtol=0, atol=1e-10)
    low_values, low, _ = lean_eigenbasis(w.float(), c.float(), n, keep=3, dtype=torch.float32)
    torch.testing.assert_close(low_values.double(), direct.values, rtol=0, atol=1e-4 * scale)
    assert float(principal_cosines(low.double().T, direct.vectors[:, :3]).min()) > 1 - 1e-3
    with pytest.raises(ValueError, match="outside"):
        lean_eigenbasis(w, c, n, keep=rank + 1)


def test_lean_streamed_bases_serve_the_edits_as_the_in_memory_ones(subject, tmp_path):
    model, safety, utility = subject
    memory = [pyattr.eigenbases(model, s, progress=False) for s in (safety, utility)]
    stores = [
        stream_eigenbases(model, s, tmp_path / n, progress=False)
        for s, n in ((safety, "s"), (utility, "u"))
    ]
    for name, basis in memory[0].items():
        lazy = stores[0][name]
        assert lazy.digest == basis.digest and lazy.kept == basis.kept == basis.rank
        scale = float(basis.values[0])
        torch.testing.assert_close(lazy.values, basis.values, rtol=0, atol=1e-9 * scale)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = pyattr.edit_ranks(a, "orthogonal", *memory, r_u=16, r_s=3)
    rb = pyattr.edit_ranks(b, "orthogonal", *stores, r_u=16, r_s=3)
    assert ra.layers == rb.layers
    for x, y in zip(pyattr.find_linear_layers(a), pyattr.find_linear_layers(b), strict=True):
        torch.testing.assert_close(x.weight, y.weight, rtol=0, atol=1e-5)


def test_the_command_line_streams_eigenbases_and_edits_from_the_folder(tmp_path):
    from pyattr.__main__ import main
    from pyattr.cli import load_model

    d = tmp_path
    collect = ["--collect", "norms", "covariance"]
    assert main(["calibrate", *collect, "--out", str(d / "s")]) == 0
    assert main(["calibrate", *collect, "--toy-set", "utility", "--out", str(d / "u")]) == 0
    for role in ("s", "u"):
        stats = ["lowrank", "eigen", "--stats", str(d / role)]
        assert main([*stats, "--out", str(d / f"e{role}.safetensors")]) == 0
        assert main([*stats, "--stream", "--out", str(d / f"e{role}")]) == 0
        assert (d / f"e{role}" / "index.json").is_file()
    ranks = ["--r-u", "0.5", "--r-s", "0.25"]
    for name, suffix in (("file", ".safetensors"), ("folder", "")):
        bases = ["--safety", str(d / f"es{suffix}"), "--utility", str(d / f"eu{suffix}")]
        assert main(["lowrank", "edit", *bases, *ranks, "--out", str(d / name)]) == 0
    a, b = (load_model(str(d / n))[0].state_dict() for n in ("file", "folder"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    (d / "taken").write_text("x")
    with pytest.raises(SystemExit, match="is a file; --stream writes a folder"):
        main(["lowrank", "eigen", "--stats", str(d / "s"), "--stream", "--out", str(d / "taken")])
