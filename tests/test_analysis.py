"""Overlap analysis: Jaccard indices and subspace similarities per layer, tables and heat maps."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from test_calibrate import sentences, tiny_llama
from test_data import tokenizer

import pyattr
from pyattr.analysis import (
    chance_jaccard,
    chance_similarity,
    heatmap,
    jaccard,
    overlap_table,
    save_table,
    similarities,
)
from pyattr.lowrank import eigenbases, subspace_similarity
from pyattr.masks import region

SAFETY, UTILITY = sentences(24, 1, refuse=True), sentences(24, 2, refuse=False)


@pytest.fixture(scope="module")
def world():
    model, tok = tiny_llama(torch.float32), tokenizer()
    collect = ("norms", "covariance")
    safety = pyattr.calibrate(model, tok, SAFETY, collect=collect, progress=False)
    utility = pyattr.calibrate(model, tok, UTILITY, collect=collect, progress=False)
    return model, safety, utility


def test_jaccard_per_layer_is_the_overlap_of_the_two_top_sets(world):
    model, safety, utility = world
    _, counts = region(model, safety, utility, q=0.3, p=0.2)
    values = jaccard(counts)
    for layer in pyattr.find_linear_layers(model):
        w = layer.weight.detach()
        q = pyattr.wanda_mask(w, safety.sq_norms(layer.name), fraction=0.3)
        p = pyattr.wanda_mask(w, utility.sq_norms(layer.name), fraction=0.2)
        want = int((p & q).sum()) / int((p | q).sum())
        assert values[layer.name] == pytest.approx(want)


def test_similarities_and_tables(world, tmp_path):
    model, safety, utility = world
    s, u = eigenbases(model, safety, progress=False), eigenbases(model, utility, progress=False)
    values = similarities(u, s, r_u=0.25, r_s=4)
    name = "model.layers.1.mlp.down_proj"  # R = 32: r_u = 8
    assert values[name] == pytest.approx(subspace_similarity(u[name], s[name], 8, 4))
    assert all(0 <= v <= 1 + 1e-9 for v in values.values())
    rows = overlap_table(values, model)
    assert [r["layer"] for r in rows] == [lay.name for lay in pyattr.find_linear_layers(model)]
    assert {r["module"] for r in rows} == {
        *("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        *("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    }
    assert {r["block"] for r in rows} == {0, 1}
    with pytest.raises(ValueError, match="has no layer 'x'"):
        overlap_table({"x": 1.0}, model)

    csv_path = save_table(rows, tmp_path / "out" / "similarity.csv")
    read = list(csv.DictReader(csv_path.open()))
    assert [float(r["value"]) for r in read] == pytest.approx([r["value"] for r in rows])
    json_path = save_table(rows, tmp_path / "similarity.json")
    assert json.loads(json_path.read_text()) == rows
    with pytest.raises(ValueError, match=".csv or .json"):
        save_table(rows, tmp_path / "t.xlsx")
    with pytest.raises(ValueError, match="no rows"):
        save_table([], tmp_path / "t.csv")


def test_heatmap_is_a_png(world, tmp_path):
    pytest.importorskip("matplotlib")
    model, safety, utility = world
    _, counts = region(model, safety, utility, q=0.3, p=0.2)
    rows = overlap_table(jaccard(counts), model, chance_jaccard(counts, model))
    path = heatmap(rows, tmp_path / "jaccard.png", title="J", label="J")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jaccard.png"]
    with pytest.raises(ValueError, match="no rows"):
        heatmap([], tmp_path / "empty.png")


def test_chance_levels_are_what_random_sets_and_subspaces_give(world):
    model, safety, utility = world
    _, counts = region(model, safety, utility, q=0.3, p=0.2)
    chance = chance_jaccard(counts, model)
    gen = torch.Generator().manual_seed(0)
    for layer in pyattr.find_linear_layers(model)[:3]:
        c, n = counts[layer.name], layer.weight.numel()
        draws = []
        for _ in range(400):  # random sets of the same sizes
            p = torch.zeros(n, dtype=torch.bool)
            q = torch.zeros(n, dtype=torch.bool)
            p[torch.randperm(n, generator=gen)[: c.size_p]] = True
            q[torch.randperm(n, generator=gen)[: c.size_q]] = True
            draws.append(int((p & q).sum()) / int((p | q).sum()))
        assert chance[layer.name] == pytest.approx(sum(draws) / len(draws), rel=0.05)
    s = eigenbases(model, safety, progress=False)
    levels = chance_similarity(s, r_u=4, r_s=2)
    name = "model.layers.1.mlp.down_proj"
    d = s[name].vectors.shape[0]
    assert levels[name] == pytest.approx(4 / d)
    draws = []
    for _ in range(300):  # random subspaces of ranks 4 and 2 in d dimensions
        a = torch.linalg.qr(torch.randn(d, 4, generator=gen, dtype=torch.float64))[0]
        b = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))[0]
        draws.append(float((a.T @ b).square().sum()) / 2)
    assert levels[name] == pytest.approx(sum(draws) / len(draws), rel=0.1)
    rows = overlap_table(jaccard(counts), model, chance)
    assert all(r["chance"] == chance[r["layer"]] for r in rows)
