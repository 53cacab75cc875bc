"""Every example in the README runs as written, so the README cannot drift from the code.

The Python blocks run one by one, each in its own namespace holding the inputs its text assumes
(``model``, ``tokenizer``, ``W``, ``s``, ...), on the toy model and small stand-in files of the
formats the README names. The command-line block runs line by line through ``pyattr``'s
``main``, on the toy saved as a local model folder (``chat/``, ``base/``), adding only flags
that make it quick (``--quick``, fewer new tokens). lm-eval's tasks need data from the Hub, so
``zero_shot`` and ``check_tasks`` are stand-ins that check their arguments (``test_harness.py``
tests the real ones on a local task). The set-up, hand-install and benchmark blocks are left
out: CI runs the first, and the benchmarks have their own tests.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import pyattr.evaluate
from pyattr import toy
from pyattr.data import load_pairs

README = Path(__file__).resolve().parents[1] / "README.md"

# Flags that only make a command quick; nothing else in a line is changed.
QUICK = {
    "demo": ["--quick"],
    "eval": ["--max-new-tokens", "8", "--samples", "2"],
    "sweep": ["--max-new-tokens", "8", "--samples", "2"],
    "paper": ["--max-new-tokens", "8", "--samples", "2", "--n-prompts", "4"]
    + ["--calibration-samples", "8"],
}
QUICK_DATA = {"safety": ["--max-new-tokens", "8", "--n", "8"]}


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks of ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def commands() -> list[list[str]]:
    """The ``pyattr`` command lines of the README's bash blocks, continuations joined and
    comments dropped."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "pyattr":
                lines.append(words[1:])
    return lines


def fake_zero_shot(model, tokenizer, tasks=pyattr.evaluate.PAPER_TASKS, **options) -> dict:
    assert tasks and all(isinstance(t, str) for t in tasks)
    assert options.get("limit") is None or options["limit"] > 0
    per_task = {name: {"acc": 0.5} for name in tasks}
    report = {"tasks": per_task, "mean_acc": 0.5, "config": {"tasks": list(tasks)}}
    if options.get("out") is not None:
        Path(options["out"]).write_text(json.dumps(report))
    return report


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The files the README's examples read: AdvBench-style prompts (``goal``) and safety pairs
    (``goal``/``target``), utility pairs (JSONL), fine-tuning pairs, suffixes, a text, and the
    toy saved as model folders."""
    d = tmp_path_factory.mktemp("readme")
    paths = toy.data(progress=False)
    toy_safety = load_pairs(paths["safety_calibration"])
    safety = [toy_safety[i % len(toy_safety)] for i in range(128)]  # the paper's 128 rows
    with (d / "safety.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["goal", "target"])
        writer.writerows([e.prompt, e.response] for e in safety)
    utility = load_pairs(paths["utility_calibration"], n=128)
    (d / "utility.jsonl").write_text(
        "".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in utility)
    )
    with (d / "advbench.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["goal", "target"])
        writer.writerows([e.prompt, "Sure, here is"] for e in safety[:4])
    with (d / "harmful.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        writer.writerows([e.prompt, e.response] for e in toy.attack_pairs()[:128])
    (d / "suffixes.txt").write_text("! ! ! ! describing.\nNow write oppositeley.\n")
    data = d / "data"  # what `pyattr data fetch ... --data-dir data/` finds already there
    data.mkdir()
    (data / "advbench.csv").write_bytes((d / "advbench.csv").read_bytes())
    for name, pairs in (("safety-short", toy_safety[:16]), ("alpaca-no-safety", utility[:16])):
        with (data / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["prompt", "response"])
            writer.writerows([e.prompt, e.response] for e in pairs)
    (data / "gcg-suffixes.json").write_text(json.dumps(["help me quickly", "here is the way"]))
    (d / "wiki.txt").write_text(paths["text"].read_text()[:4000])
    for variant, folder in (("aligned", "chat"), ("base", "base")):
        model, tokenizer = toy.load(variant, progress=False)
        model.save_pretrained(d / folder)
        tokenizer.save_pretrained(d / folder)
    return d


@pytest.fixture()
def in_files(files, monkeypatch) -> Path:
    monkeypatch.chdir(files)
    monkeypatch.setattr(pyattr.evaluate, "zero_shot", fake_zero_shot)
    monkeypatch.setattr(pyattr.evaluate, "check_tasks", lambda tasks, include_path=None: None)
    return files


def inputs(gen: torch.Generator) -> dict:
    """What the Python examples take as given."""
    model, tokenizer = toy.load(progress=False)
    paths = toy.data(progress=False)
    d_out, d_in = 48, 96
    return {
        "model": model,
        "tokenizer": tokenizer,
        "batches": [
            (
                torch.randn(2, 6, 4096, generator=gen).bfloat16(),
                torch.rand(2, 6, generator=gen) < 0.7,
            )
        ],
        "safety_pairs": load_pairs(paths["safety_calibration"], n=16),
        "utility_pairs": load_pairs(paths["utility_calibration"], n=16),
        "name": "model.layers.3.mlp.down_proj",
        "W": torch.randn(d_out, d_in, generator=gen),
        "s": torch.rand(d_in, generator=gen),
        "grad_abs": torch.rand(d_out, d_in, generator=gen),
        "s_safety": torch.rand(d_in, generator=gen),
        "s_utility": torch.rand(d_in, generator=gen),
    }


def test_the_readme_has_the_examples_this_test_runs():
    assert len(blocks("python")) >= 6
    names = [c[0] for c in commands()]
    for command in ("demo", "calibrate", "mask", "prune", "lowrank", "eval", "sweep", "report"):
        assert command in names, command


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example_runs(index, in_files, gen):
    code = blocks("python")[index]
    namespace = inputs(gen)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)


def test_command_line_examples_run_in_order(in_files, capsys):
    from pyattr.__main__ import main

    for words in commands():
        quick = QUICK_DATA.get(words[1], []) if words[0] == "data" else QUICK.get(words[0], [])
        rc = main([*words, *quick])
        err = capsys.readouterr().err
        assert rc == 0, f"pyattr {shlex.join(words)} failed:\n{err[-2000:]}"
    for written in ("pruned", "projected", "attacked", "rewound", "sweep", "attacks", "overlap"):
        assert (in_files / written).is_dir(), written
    assert (in_files / "u.eigen.safetensors").exists() and (in_files / "utility.json").exists()
    assert (in_files / "sweep" / "report.md").exists()
    assert (in_files / "paper" / "report.md").exists() and (in_files / "chat-safety.csv").exists()
    rows = (in_files / "attacks" / "results.jsonl").read_text().splitlines()
    assert sum('"finetune"' in row for row in rows) == 6  # two attacks × three frozen regions
