"""The edit registry the sweep, the demo and the command line share: every edit kind applied
through ``Editor``, parameters checked before any work, rewinding, cached eigenbases reused."""

from __future__ import annotations

import copy

import pytest
import torch
from test_calibrate import tiny_llama
from test_data import tokenizer
from test_lowrank import SAFETY, UTILITY

import pyattr
from pyattr import edits, lowrank
from pyattr.masks import region
from pyattr.sweep import Editor, Point, ResultsTable, run_points


@pytest.fixture(scope="module")
def subject():
    model = tiny_llama(torch.float32)
    tok = tokenizer()
    collect = ("norms", "covariance")
    safety = pyattr.calibrate(model, tok, SAFETY, collect=collect, progress=False)
    utility = pyattr.calibrate(model, tok, UTILITY, collect=collect, progress=False)
    return model, safety, utility


def test_registry_names_every_edit_the_sweep_runs():
    assert edits.names() == [
        "none",
        "top",
        "set_difference",
        "random_weights",
        "actsvd_remove",
        "actsvd_keep",
        "orthogonal",
        "random_ranks",
        "finetune",
        "rewind",
        "direction",
        "random_direction",
    ]
    assert edits.get("random_ranks").control_of == "orthogonal"
    assert edits.get("random_direction").control_of == "direction"
    with pytest.raises(ValueError, match="edit must be one of"):
        edits.get("prune")
    assert edits.row_edit({"method": "top"}) == "top"  # results written before the rename
    assert edits.row_score({"like": "snip"}) == edits.row_score({"score": "snip"}) == "snip"


def test_points_are_checked_before_any_work(subject, tmp_path):
    model, safety, utility = subject
    measured = []
    points = [Point("none"), Point("set_difference", {"score": "wanda", "q": 0.1})]
    table = ResultsTable(tmp_path / "r.jsonl", {})
    with pytest.raises(ValueError, match=r"'set_difference': missing \['p'\]"):
        run_points(Editor(model, safety, utility), points, table, measured.append, progress=False)
    assert measured == [] and table.rows == []
    with pytest.raises(ValueError, match=r"unknown \['method'\]"):
        Point("top", {"method": "wanda", "q": 0.1}).check()
    with pytest.raises(ValueError, match="the set_difference region needs"):
        Editor(model, safety, utility, source=model).edited(
            Point("rewind", {"region": "set_difference", "q": 0.1})
        )


def test_direction_points_orthogonalise_the_editor_direction(subject, gen):
    from pyattr.direction import ablated, random_direction

    model, safety, utility = subject
    width = model.get_input_embeddings().weight.shape[1]
    r = torch.randn(width, generator=gen)
    with pytest.raises(ValueError, match="need the refusal direction"):
        Editor(model, safety, utility).edited(Point("direction"))
    editor = Editor(model, safety, utility, direction=r)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 7), generator=gen)
    for name, vector in (("direction", r), ("random_direction", random_direction(r, 0))):
        edited, fraction, unit = editor.edited(Point(name))
        assert unit == "ranks" and fraction == pytest.approx(1 / width)
        with torch.no_grad(), ablated(model, vector):
            expected = model(input_ids=ids).logits
        torch.testing.assert_close(edited(input_ids=ids).logits, expected, atol=2e-6, rtol=1e-4)


def test_sequential_top_points_prune_block_by_block(subject):
    from pyattr.sequential import sequential_region

    model, safety, utility = subject
    point = Point("top", {"score": "wanda", "q": 0.2, "sequential": True})
    with pytest.raises(ValueError, match="need the pairs to calibrate on"):
        Editor(model, safety, utility).edited(point)
    tok = tokenizer()
    edited, removed, _ = Editor(model, safety, utility, calibration=(tok, SAFETY)).edited(point)
    reference = copy.deepcopy(model)
    mask = sequential_region(reference, tok, SAFETY, q=0.2, progress=False)
    assert removed == pytest.approx(mask.sparsity()["overall"])
    for a, b in zip(
        pyattr.find_linear_layers(edited), pyattr.find_linear_layers(reference), strict=True
    ):
        assert torch.equal(a.weight, b.weight)


def test_each_edit_removes_what_it_says(subject):
    model, safety, utility = subject
    editor = Editor(model, safety, utility)
    sd = {"score": "wanda", "p": 0.1, "q": 0.2}
    pruned, removed, unit = editor.edited(Point("set_difference", sd))
    mask, _ = region(model, safety, utility, score="wanda", q=0.2, p=0.1)
    assert unit == "weights" and removed == pytest.approx(mask.sparsity()["overall"])
    for layer in pyattr.find_linear_layers(pruned):
        m = mask.masks[layer.name]
        assert bool((layer.weight[m] == 0).all())
    control, same, _ = editor.edited(Point("random_weights", sd))
    assert same == removed
    other, again, _ = editor.edited(Point("random_weights", sd | {"seed": 1}))
    assert again == removed  # another draw: as many weights, elsewhere
    zeros = [(layer.weight == 0) for layer in pyattr.find_linear_layers(control)]
    moved = [(layer.weight == 0) for layer in pyattr.find_linear_layers(other)]
    assert any(not torch.equal(a, b) for a, b in zip(zeros, moved, strict=True))
    assert [int(z.sum()) for z in zeros] == [int(m.sum()) for m in moved]
    kept, fraction, unit = editor.edited(Point("actsvd_keep", {"r": 0.25}))
    assert unit == "ranks" and 0.7 < fraction <= 0.75
    removed_top, fraction, _ = editor.edited(Point("actsvd_remove", {"r": "25%"}))
    assert 0.2 < fraction <= 0.25
    for layer, a, b in zip(
        pyattr.find_linear_layers(model),
        pyattr.find_linear_layers(kept),
        pyattr.find_linear_layers(removed_top),
        strict=True,
    ):
        # keeping the top ranks and removing them split W in two: the parts add up to W
        torch.testing.assert_close(a.weight + b.weight, layer.weight, rtol=1e-4, atol=1e-5)
    assert all(
        torch.equal(a.weight, b.weight)
        for a, b in zip(
            pyattr.find_linear_layers(model), pyattr.find_linear_layers(model), strict=True
        )
    )


def test_rewinding_the_region_gives_back_the_source(subject):
    """An 'attacked' model (the region zeroed and the rest perturbed) gets the source's weights
    back exactly on the region the source's statistics name, and nowhere else."""
    model, safety, utility = subject
    mask, _ = region(model, safety, utility, score="wanda", q=0.2, p=0.1)
    attacked = copy.deepcopy(model)
    with torch.no_grad():
        for layer in pyattr.find_linear_layers(attacked):
            layer.weight.add_(0.01)
    pyattr.prune(attacked, mask)
    editor = Editor(attacked, safety, utility, source=model)
    params = {"region": "set_difference", "score": "wanda", "p": 0.1, "q": 0.2}
    rewound, removed, _ = editor.edited(Point("rewind", params))
    assert removed == pytest.approx(mask.sparsity()["overall"])
    for a, src, r in zip(
        pyattr.find_linear_layers(attacked),
        pyattr.find_linear_layers(model),
        pyattr.find_linear_layers(rewound),
        strict=True,
    ):
        m = mask.masks[a.name]
        assert torch.equal(r.weight[m], src.weight[m])
        assert torch.equal(r.weight[~m], a.weight[~m])
    with pytest.raises(ValueError, match="need the model to copy from"):
        Editor(attacked, safety, utility).edited(Point("rewind", params))


def test_a_random_region_is_the_freeze_and_rewind_control(subject):
    """A fine-tuning point with ``random_weights`` frozen keeps, bit for bit, the random region
    its seed draws as large as the set difference (``random_like``), and moves the weights
    outside it; a rewind of that region copies exactly it back from the source."""
    from pyattr.masks import random_like
    from pyattr.sweep import Attack

    model, safety, utility = subject
    sd = {"score": "wanda", "p": 0.1, "q": 0.2}
    chosen = region(model, safety, utility, score="wanda", q=0.2, p=0.1)[0]
    mask = random_like(chosen, seed=1)
    editor = Editor(model, safety, utility, attack=Attack(tokenizer(), SAFETY, lr=1e-2))
    frozen = {"n": 4, "steps": 2, "frozen": "random_weights", **sd, "seed": 1}
    attacked, _, _ = editor.edited(Point("finetune", frozen))
    found = (pyattr.find_linear_layers(m) for m in (model, attacked))
    layers = list(zip(*found, strict=True))
    for a, b in layers:
        m = mask.masks[a.name]
        assert torch.equal(b.weight[m], a.weight[m])
        assert (b.weight[~m] != a.weight[~m]).float().mean() > 0.99  # the free weights moved
    assert any(not torch.equal(mask.masks[n], chosen.masks[n]) for n in mask.masks)
    back = {"region": "random_weights", **sd, "seed": 1}
    rewound, removed, _ = Editor(attacked, safety, utility, source=model).edited(
        Point("rewind", back)
    )
    assert removed == pytest.approx(chosen.sparsity()["overall"])
    for (a, b), r in zip(layers, pyattr.find_linear_layers(rewound), strict=True):
        m = mask.masks[a.name]
        assert torch.equal(r.weight[m], a.weight[m]) and torch.equal(r.weight[~m], b.weight[~m])
    with pytest.raises(ValueError, match=r"the random_weights region needs \['p'\]"):
        editor.edited(Point("finetune", {"n": 4, "steps": 1, "frozen": "random_weights", "q": 0.2}))


def test_cached_eigenbases_are_reused(subject, tmp_path, monkeypatch):
    """Bases handed to the editor (as `pyattr lowrank eigen` caches them) are the ones used:
    nothing is recomputed, and the edit equals the one from freshly computed bases."""
    model, safety, utility = subject
    bases = [pyattr.eigenbases(model, s, progress=False) for s in (safety, utility)]
    paths = [
        pyattr.save_eigenbases(b, tmp_path / f"{n}.eigen") for b, n in zip(bases, "su", strict=True)
    ]
    loaded = [pyattr.load_eigenbases(p, model=model) for p in paths]
    fresh, want, _ = Editor(model, safety, utility).edited(
        Point("orthogonal", {"r_u": 0.5, "r_s": 0.25})
    )
    monkeypatch.setattr(lowrank, "eigenbases", lambda *a, **k: pytest.fail("recomputed"))
    cached, got, _ = Editor(model, safety, utility, bases=loaded).edited(
        Point("orthogonal", {"r_u": 0.5, "r_s": 0.25})
    )
    assert got == want
    for a, b in zip(
        pyattr.find_linear_layers(fresh), pyattr.find_linear_layers(cached), strict=True
    ):
        torch.testing.assert_close(a.weight, b.weight)


def test_draws_of_a_control_are_one_point_per_seed(subject):
    from pyattr.sweep import draws_of

    ranks = {"keep_u": 4, "keep_s": 2}
    assert draws_of(Point("random_ranks", ranks)) == [Point("random_ranks", ranks)]
    three = draws_of(Point("random_ranks", ranks), 3)
    assert [p.params for p in three] == [ranks | {"seed": k} for k in range(3)]
    assert len({p.key for p in three}) == 3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="draws must be a whole number"):
            draws_of(Point("random_ranks", ranks), bad)
    with pytest.raises(ValueError, match=r"orthogonal\(.*\) is not a random control"):
        draws_of(Point("orthogonal", ranks), 2)
    attack = {"n": 4, "steps": 1, "score": "wanda", "p": 0.1, "q": 0.2}
    frozen = Point("finetune", attack | {"frozen": "random_weights"})  # the freeze's control
    assert [p.params["seed"] for p in draws_of(frozen, 2)] == [0, 1]
    for kept in ("set_difference", "none"):
        with pytest.raises(ValueError, match="is not a random control"):
            draws_of(Point("finetune", attack | {"frozen": kept}), 2)
    assert edits.is_control("rewind", {"region": "random_weights", "q": 0.1})
    assert not edits.is_control("rewind", {"region": "set_difference", "q": 0.1})
    assert not edits.is_control("prune", {})  # an edit of another version's files
    with pytest.raises(ValueError, match="already names its seed"):
        draws_of(Point("random_direction", {"seed": 4}), 2)
    model, safety, utility = subject
    editor = Editor(model, safety, utility)
    edited = [editor.edited(p) for p in three[:2]]
    assert edited[0][1] == edited[1][1]  # the same rank removed ...
    first, second = (pyattr.find_linear_layers(m) for m, _, _ in edited)
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(first, second, strict=True))
