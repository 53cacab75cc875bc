"""One counting rule: counts and fractions of a whole, for weights and ranks alike."""

from __future__ import annotations

import copy

import pytest
import torch
from test_calibrate import tiny_llama
from test_data import tokenizer
from test_lowrank import SAFETY

import pyattr
from pyattr.analysis import chance_similarity, similarities
from pyattr.counts import Amount, amount, count, count_for, fraction, resolve


def test_amounts_say_whether_they_count_or_divide():
    assert amount(16) == count(16) == Amount(16, False)
    assert amount(0.9) == fraction(0.9) and amount(1.0) == fraction(1)
    assert amount("16") == count(16) and amount("0.9") == fraction(0.9)
    assert amount("90%") == fraction(0.9) and amount(" 5% ") == fraction(0.05)
    assert resolve(1, 16, "r") == 1 and resolve(1.0, 16, "r") == 16
    assert resolve(count(1), 16) == 1 and resolve(fraction(1), 16) == 16
    assert resolve("29%", 100) == resolve(0.29, 100) == count_for(0.29, 100) == 29
    assert resolve(None, 5) is None
    with pytest.raises(ValueError, match="must be a count .16. or a fraction"):
        amount("ten")
    with pytest.raises(TypeError, match="must be a count or a fraction"):
        amount(True)
    with pytest.raises(ValueError, match=r"layer.3: r = 17 is outside \[0, R\] = \[0, 16\]"):
        resolve(17, 16, "r", whole="R", where="layer.3")
    with pytest.raises(ValueError, match=r"q = 1.5 as a fraction of n must lie in \[0, 1\]"):
        resolve(1.5, 16, "q")


def test_ranks_count_alike_in_edits_and_analysis():
    """A fraction of R means the same count in ``edit_ranks`` and in the similarity tables
    (the analysis once rounded a small fraction up to one rank and clamped counts to R)."""
    model = tiny_llama(torch.float32)
    stats = pyattr.calibrate(model, tokenizer(), SAFETY, collect=("covariance",), progress=False)
    bases = pyattr.eigenbases(model, stats, progress=False)
    name, basis = next(iter(bases.items()))
    edited = copy.deepcopy(model)
    report = pyattr.edit_ranks(edited, "remove", bases, r="25%", layers=[name])
    assert report.layers[name]["rank"] == basis.rank // 4
    values = similarities(bases, bases, r_u=0.25, r_s="25%")
    assert values[name] == pytest.approx(1.0)
    chance = chance_similarity(bases, r_u=fraction(0.25), r_s=count(1))
    assert chance[name] == pytest.approx(max(basis.rank // 4, 1) / basis.vectors.shape[0])
    with pytest.raises(ValueError, match="is outside"):
        similarities(bases, bases, r_u=basis.rank + 1, r_s=1)
