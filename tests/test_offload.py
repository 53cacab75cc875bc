"""Editing a model whose weights stay on the CPU or disk (accelerate offload), layer by layer:
every edit gives the weights and outputs of the same edit on the model in memory, bit for bit;
a journal puts the model back exactly; a checkpoint the offload reads from is never written."""

from __future__ import annotations

import copy
import gc
import hashlib
import json

import pytest
import torch
import transformers
from test_calibrate import tiny_llama
from test_data import tokenizer
from test_edits import subject  # noqa: F401 (a fixture)

import pyattr
from pyattr import lowrank
from pyattr.edit import prune, rewind
from pyattr.masks import random_like, region
from pyattr.models import find_linear_layers
from pyattr.offload import Journal, has_offloaded, read, writable
from pyattr.sweep import Editor, Point, ResultsTable, run_points

accelerate = pytest.importorskip("accelerate")

KINDS = ("cpu_offload", "disk_offload", "dispatch_disk", "checkpoint_disk")
REST = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"}
REST |= {"lm_head": "cpu"}


def offloaded(kind: str, tmp_path, dtype=torch.float32):
    """The tiny model with its weights offloaded one of four ways, computing on the CPU."""
    model = tiny_llama(dtype)
    if kind == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device="cpu")
    if kind == "disk_offload":
        return accelerate.disk_offload(model, tmp_path / "offload", execution_device="cpu")
    if kind == "dispatch_disk":  # block 0 resident, block 1 on disk
        device_map = REST | {"model.layers.0": "cpu", "model.layers.1": "disk"}
        return accelerate.dispatch_model(
            model, device_map=device_map, offload_dir=tmp_path / "offload"
        )
    model.save_pretrained(tmp_path / "checkpoint")  # transformers reads disk weights from it
    device_map = REST | {"model.layers.0": "disk", "model.layers.1": "disk"}
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "checkpoint",
        device_map=device_map,
        offload_folder=tmp_path / "offload",
        dtype=dtype,
    ).eval()


def weights(model) -> dict[str, torch.Tensor]:
    return {layer.name: read(layer).clone() for layer in find_linear_layers(model)}


def assert_same_weights(got, want):
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def logits(model) -> torch.Tensor:
    ids = tokenizer()(["how do i bake bread", "tell me a story"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def chain(statistics):
    """Edits that can follow one another on one model (a rank edit checks its basis against
    the unedited weights, so it comes first)."""
    every = edits(statistics)
    return [every[name] for name in ("orthogonal", "set_difference", "random_weights")]


def checkpoint_digest(tmp_path, folder: str = "checkpoint") -> str:
    files = sorted((tmp_path / folder).glob("*.safetensors"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


@pytest.fixture(scope="module")
def statistics(subject):  # noqa: F811 (the fixture imported above)
    model, safety, utility = subject
    bases = [lowrank.eigenbases(model, s, progress=False) for s in (safety, utility)]
    return safety, utility, bases


def edits(statistics):
    """Each edit as f(model): pruning a set difference and its random control, every rank edit
    and the random rank control, all applied through the public functions."""
    safety, utility, (s_bases, u_bases) = statistics

    def set_difference(model):
        prune(model, region(model, safety, utility, q=0.2, p=0.2)[0])

    def random_weights(model):
        prune(model, random_like(region(model, safety, utility, q=0.2, p=0.2)[0], seed=3))

    def orthogonal(model):
        lowrank.edit_ranks(model, "orthogonal", s_bases, u_bases, r_u=8, r_s=4)

    def random_ranks(model):
        like = lowrank.edit_ranks(model, "orthogonal", s_bases, u_bases, r_u=8, r_s=4, apply=False)
        lowrank.remove_random(model, like, seed=1)

    return {
        "set_difference": set_difference,
        "random_weights": random_weights,
        "actsvd_remove": lambda model: lowrank.edit_ranks(model, "remove", s_bases, r=3),
        "actsvd_keep": lambda model: lowrank.edit_ranks(model, "keep", s_bases, r=0.75),
        "orthogonal": orthogonal,
        "random_ranks": random_ranks,
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_edit_of_an_offloaded_model_equals_the_edit_in_memory(kind, statistics, tmp_path):
    for name, edit in edits(statistics).items():
        model = offloaded(kind, tmp_path / name)
        assert has_offloaded(model)
        want = tiny_llama(torch.float32)
        edit(want)
        edit(model)
        assert_same_weights(model, want)
        torch.testing.assert_close(logits(model), logits(want), rtol=1e-6, atol=1e-6)


def test_the_checkpoint_an_offload_reads_is_never_written(statistics, tmp_path):
    model = offloaded("checkpoint_disk", tmp_path)
    before = checkpoint_digest(tmp_path)
    for edit in chain(statistics):
        edit(model)
    assert checkpoint_digest(tmp_path) == before
    edited = sorted(p.name for p in (tmp_path / "offload").rglob("*.safetensors"))
    assert edited and all(".layers." in n for n in edited)  # pyattr's files, beside the offload
    del model
    gc.collect()  # the edited weights go with the model
    assert not list((tmp_path / "offload").rglob("pyattr-edits-*"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_journal_puts_the_model_back_bit_for_bit(kind, statistics, tmp_path):
    model = offloaded(kind, tmp_path)
    pristine = weights(model)
    journal = Journal()
    with journal:
        for edit in chain(statistics):
            edit(model)
    assert len(journal) == len(pristine)
    assert any(
        not torch.equal(read(layer), pristine[layer.name]) for layer in find_linear_layers(model)
    )
    journal.restore()
    for layer in find_linear_layers(model):
        assert torch.equal(read(layer), pristine[layer.name]), layer.name
    torch.testing.assert_close(logits(model), logits(tiny_llama(torch.float32)), rtol=0, atol=0)
    assert not list((tmp_path).rglob("pyattr-edits-*/*.safetensors"))  # edited files removed


def test_a_journal_after_edits_outside_it_restores_those_edits(statistics, tmp_path):
    """An edit made before the journal is its original: restoring keeps it, and each weight
    has one file of pyattr's at a time (an earlier one is removed when it is replaced)."""
    safety, utility, _ = statistics
    model = offloaded("disk_offload", tmp_path)
    first = region(model, safety, utility, q=0.2, p=0.2)[0]
    prune(model, first)
    prune(model, first)  # replaces its own file
    before = weights(model)
    files = sorted(tmp_path.rglob("pyattr-edits-*/*.safetensors"))
    assert len(files) == len(first.masks)
    journal = Journal()
    with journal:
        prune(model, random_like(first, seed=4))
        prune(model, random_like(first, seed=5))
    assert any(
        not torch.equal(read(layer), before[layer.name]) for layer in find_linear_layers(model)
    )
    journal.restore()
    after = weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert sorted(tmp_path.rglob("pyattr-edits-*/*.safetensors")) == files


def test_rewinding_from_an_offloaded_source(statistics, tmp_path):
    safety, utility, _ = statistics
    source = offloaded("disk_offload", tmp_path / "source")
    mask = region(source, safety, utility, q=0.3, p=0.1)[0]
    attacked = offloaded("cpu_offload", tmp_path / "attacked")
    with torch.no_grad():
        for layer in find_linear_layers(attacked):
            with writable(layer) as w:
                w.mul_(-1)
    want = tiny_llama(torch.float32)
    for layer in find_linear_layers(want):
        layer.weight.data.mul_(-1)
    rewind(want, tiny_llama(torch.float32), mask)
    rewind(attacked, source, mask)
    assert_same_weights(attacked, want)


def test_bfloat16_weights_on_disk_keep_their_dtype(statistics, tmp_path):
    safety, utility, _ = statistics
    model = offloaded("disk_offload", tmp_path, torch.bfloat16)
    want = tiny_llama(torch.bfloat16)
    mask = region(want, safety, utility, q=0.2, p=0.2)[0]
    prune(want, mask)
    prune(model, mask)
    assert all(read(layer).dtype == torch.bfloat16 for layer in find_linear_layers(model))
    assert_same_weights(model, want)


def test_a_body_that_raises_writes_nothing(tmp_path):
    model = offloaded("disk_offload", tmp_path)
    layer = find_linear_layers(model)[0]
    before = read(layer).clone()
    with pytest.raises(RuntimeError, match="midway"), writable(layer) as w:
        w.zero_()
        raise RuntimeError("midway")
    assert torch.equal(read(layer), before)


def test_a_meta_weight_with_no_offload_hook_is_refused():
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_llama().config)
    with pytest.raises(ValueError, match="on the meta device with no accelerate hook"):
        read(find_linear_layers(model)[0])


POINTS = [
    Point("set_difference", {"p": 0.2, "q": 0.2}),
    Point("random_weights", {"p": 0.2, "q": 0.2}),
    Point("actsvd_remove", {"r": 3}),
    Point("none", {}),
    Point("orthogonal", {"r_u": 8, "r_s": 4}),
    Point("random_ranks", {"r_u": 8, "r_s": 4}),
    Point("rewind", {"region": "set_difference", "p": 0.1, "q": 0.3}),
]


def test_a_sweep_of_an_offloaded_model_edits_in_place_and_matches_copies(statistics, tmp_path):
    safety, utility, bases = statistics

    def measure(model):
        return {"logits": logits(model).double().sum().item()}

    source = tiny_llama(torch.float32)
    with torch.no_grad():  # a source that differs, so that rewinding changes something
        for layer in find_linear_layers(source):
            layer.weight.add_(0.01)
    copies = Editor(tiny_llama(torch.float32), safety, utility, source=source, bases=bases)
    assert not copies.in_place
    want = run_points(
        copies, POINTS, ResultsTable(tmp_path / "a.jsonl", {}), measure, progress=False
    )

    model = offloaded("disk_offload", tmp_path / "model")
    pristine = weights(model)
    editor = Editor(model, safety, utility, source=source, bases=bases)
    assert editor.in_place
    got = run_points(
        editor, POINTS, ResultsTable(tmp_path / "b.jsonl", {}), measure, progress=False
    )
    for g, w in zip(got, want, strict=True):
        assert (g["key"], g["removed"], g["logits"]) == (w["key"], w["removed"], w["logits"])
    for layer in find_linear_layers(model):
        assert torch.equal(read(layer), pristine[layer.name])  # put back after the last point


def test_an_in_place_sweep_refuses_edits_that_need_a_copy_before_any_work(statistics, tmp_path):
    safety, utility, bases = statistics
    editor = Editor(offloaded("cpu_offload", tmp_path), safety, utility, bases=bases)
    table = ResultsTable(tmp_path / "r.jsonl", {})
    points = [
        Point("set_difference", {"p": 0.2, "q": 0.2}),
        Point("finetune", {"n": 2, "steps": 1}),
    ]
    with pytest.raises(ValueError, match="finetune points need a copy of the whole model"):
        run_points(editor, points, table, lambda m: {}, progress=False)
    assert ResultsTable(tmp_path / "r.jsonl", {}).rows == []
    with pytest.raises(ValueError, match="sequential pruning points need a copy"):
        editor.check(Point("top", {"q": 0.1, "sequential": True}))


def test_an_editor_of_a_resident_model_can_edit_in_place(statistics, tmp_path):
    safety, utility, bases = statistics
    model = tiny_llama(torch.float32)
    pristine = copy.deepcopy(model)
    editor = Editor(model, safety, utility, bases=bases, in_place=True)
    edited, removed, unit = editor.edited(Point("actsvd_remove", {"r": 3}))
    assert edited is model and unit == "ranks" and removed > 0
    editor.restore()
    assert_same_weights(model, pristine)


def test_the_command_line_calibrates_and_edits_a_model_it_keeps_on_disk(tmp_path):
    from pyattr import toy
    from pyattr.__main__ import main
    from pyattr.cli import load_model

    model, tok = toy.load(progress=False)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    on_disk = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu"}
    on_disk |= {"model.rotary_emb": "cpu", "lm_head": "cpu"}
    place = ["--device-map", json.dumps(on_disk), "--offload-folder", str(tmp_path / "off")]
    m, d = ["--model", str(folder)], tmp_path

    def calibrate(out, *extra):
        assert (
            main(["calibrate", *m, "--collect", "norms", "covariance", *extra, "--out", out]) == 0
        )

    calibrate(str(d / "s"))
    calibrate(str(d / "s_disk"), *place)
    calibrate(str(d / "u"), "--toy-set", "utility")
    want, got = pyattr.load_stats(d / "s"), pyattr.load_stats(d / "s_disk")
    for name in want.layers():
        torch.testing.assert_close(got.sq_norms(name), want.sq_norms(name), rtol=1e-5, atol=0)
    stats = ["--safety", str(d / "s"), "--utility", str(d / "u")]
    assert main(["mask", *stats, "--q", "0.15", "--p", "0.1", "--out", str(d / "mask")]) == 0
    assert main(["lowrank", "eigen", *m, "--stats", str(d / "s"), "--out", str(d / "es")]) == 0
    assert main(["lowrank", "eigen", *m, "--stats", str(d / "u"), "--out", str(d / "eu")]) == 0
    before = checkpoint_digest(tmp_path, "model")
    prune = ["prune", *m, "--mask", str(d / "mask")]
    project = ["lowrank", "edit", *m, "--safety", str(d / "es"), "--utility", str(d / "eu")]
    project += ["--r-u", "0.5", "--r-s", "0.25"]
    for command, name in ((prune, "pruned"), (project, "projected")):
        assert main([*command, "--out", str(d / name)]) == 0
        assert main([*command, *place, "--out", str(d / f"{name}_disk")]) == 0
        a = load_model(str(d / name))[0].state_dict()
        b = load_model(str(d / f"{name}_disk"))[0].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert checkpoint_digest(tmp_path, "model") == before
    with pytest.raises(SystemExit, match="--device-map 'everywhere'"):
        main(["prune", *m, "--device-map", "everywhere", "--mask", str(d / "mask"), "--out", "x"])
    with pytest.raises(SystemExit, match="--max-memory 'lots'"):
        main([*prune, *place, "--max-memory", "lots", "--out", str(d / "x")])
    with pytest.raises(SystemExit, match="need --device-map"):
        main([*prune, "--offload-folder", str(d / "off"), "--out", str(d / "x")])
