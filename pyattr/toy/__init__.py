"""The embedded default: a tiny aligned chat model that pyattr trains and caches itself.

``pyattr.toy.load()`` returns (model, tokenizer) of the aligned chat model, building it on first
use (two training stages on the CPU, a few minutes, with a progress bar); ``load("base")`` the
instruction-tuned model before alignment, for rewinding and "recover from base" experiments.
``pyattr.toy.data()`` gives the paths of its data sets, written in the formats the real ones use
(AdvBench-style CSV and text, JSONL pairs), so the same loaders read them.

The cache lives in ``$PYATTR_CACHE`` or ``$XDG_CACHE_HOME/pyattr`` (``~/.cache/pyattr``), under a
hash of the recipe. An entry is built in a temporary directory and renamed into place when
complete; a manifest of checksums, written last, is verified on every load, so a partial or
corrupt entry is rebuilt; a file lock keeps two processes from building the same entry at once.
The training runs in a child process pinned to AVX2's kernels wherever the CPU has them
(``pinned``): the weights depend on the instruction set, and so every such CPU builds one model.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ..io import cache_root
from .pinned import capability, train_pinned
from .recipe import Recipe, Splits, make_splits

__all__ = [
    "DATA_FILES",
    "Recipe",
    "attack_pairs",
    "build",
    "cache_root",
    "CONTRAST_PAIRS",
    "contrast_pairs",
    "data",
    "load",
]

DATA_FILES = {
    "safety_calibration": "safety_calibration.csv",
    "utility_calibration": "utility_calibration.jsonl",
    "harmful_eval": "harmful_eval.csv",
    "harmful_eval_txt": "harmful_eval.txt",
    "utility_eval": "utility_eval.jsonl",
    "text": "text.txt",
}
_MANIFEST = "manifest.json"


def _entry(recipe: Recipe) -> Path:
    return cache_root() / "toy" / recipe.digest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid(entry: Path) -> bool:
    """Complete and intact: the manifest exists and every file it lists has its checksum."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        return all(_sha256(entry / rel) == digest for rel, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def _current(entry: Path) -> bool:
    """Valid, and trained with the instruction set a build pins here (``pinned.capability``):
    an entry trained with another, such as an AVX-512 build from before the pin, is another model
    and is rebuilt. An entry that names none (a stand-in that ``benchmarks.toy_builds`` writes)
    is taken as it is."""
    if not _valid(entry):
        return False
    trained = json.loads((entry / _MANIFEST).read_text()).get("cpu_capability")
    return trained in (None, capability())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_data(splits: Splits, folder: Path) -> None:
    folder.mkdir(parents=True)

    def jsonl(name: str, rows) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (folder / DATA_FILES[name]).write_text(text, encoding="utf-8")

    def csv_file(name: str, header: list[str], rows) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(rows)
        (folder / DATA_FILES[name]).write_text(buffer.getvalue(), encoding="utf-8")

    csv_file("safety_calibration", ["prompt", "response"], splits.safety_calibration)
    jsonl(
        "utility_calibration", [{"prompt": p, "response": a} for p, a in splits.utility_calibration]
    )
    csv_file("harmful_eval", ["goal"], [[p] for p in splits.harmful_eval])
    (folder / DATA_FILES["harmful_eval_txt"]).write_text("\n".join(splits.harmful_eval) + "\n")
    jsonl(
        "utility_eval", [{"prompt": p, "answer": a, "task": t} for p, a, t in splits.utility_eval]
    )
    (folder / DATA_FILES["text"]).write_text(splits.text + "\n", encoding="utf-8")


def _write_entry(folder: Path, recipe: Recipe, splits: Splits, trained: tuple, about: dict) -> None:
    """Write a cache entry into the new ``folder``: the tokenizer, the base and aligned models of
    ``trained``, the data of ``splits``, ``recipe.json``, and last the manifest of checksums with
    ``about`` (what the weights depend on beyond the recipe). ``benchmarks.toy_builds`` writes
    other builds of the default with it; ``build`` has its models saved by the training
    process and completes the entry as this does."""
    tok, base, aligned = trained
    tok.save_pretrained(folder / "tokenizer")
    base.save_pretrained(folder / "base")
    aligned.save_pretrained(folder / "aligned")
    _finish_entry(folder, recipe, splits, about)


def _finish_entry(folder: Path, recipe: Recipe, splits: Splits, about: dict) -> None:
    """Complete an entry whose tokenizer and models are saved in ``folder``: the data, the
    recipe and last the manifest."""
    _write_data(splits, folder / "data")
    (folder / "recipe.json").write_text(json.dumps(recipe.__dict__, indent=1, sort_keys=True))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {"files": {str(p.relative_to(folder)): _sha256(p) for p in files}, **about}
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1))


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pyattr toy model (first use)", unit="step", dynamic_ncols=True)


def build(recipe: Recipe | None = None, *, force: bool = False, progress: bool = True) -> Path:
    """The cache entry of ``recipe`` (default ``Recipe()``), built if missing, damaged or trained
    with another instruction set than a build pins here. The training runs in a child process
    pinned to AVX2's kernels wherever the CPU has them (``pinned``), so every such CPU builds
    the same model."""
    recipe = recipe or Recipe()
    entry = _entry(recipe)
    if not force and _current(entry):
        return entry
    with _locked(entry.with_suffix(".lock")):
        if not force and _current(entry):  # another process finished it while we waited
            return entry
        for leftover in entry.parent.glob(f".{entry.name}.*"):  # an interrupted build's
            shutil.rmtree(leftover, ignore_errors=True)  # (we hold the lock: none is live)
        tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        bar = _progress(recipe.instruct_steps + recipe.align_steps, progress)
        try:
            about = train_pinned(recipe, tmp, tick=(lambda s: bar.update(1)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
        _finish_entry(tmp, recipe, make_splits(recipe), about)
        if entry.exists():
            stale = entry.parent / f".{entry.name}.stale-{os.getpid()}"
            entry.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(entry)
    return entry


def load(
    stage: str = "aligned",
    *,
    recipe: Recipe | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
):
    """(model, tokenizer) of the toy chat model: ``stage`` "aligned" (default) or "base". The
    model's config names its held-out harmful prompts (``pyattr_harmful_prompts``), which
    ``attack_success`` uses when given no prompts; a folder saved from it keeps the name."""
    if stage not in ("aligned", "base"):
        raise ValueError(f"stage must be 'aligned' or 'base', got {stage!r}")
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    entry = build(recipe, progress=progress)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(entry / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(entry / stage, dtype=dtype).to(device).eval()
    model.config.pyattr_harmful_prompts = str(entry / "data" / DATA_FILES["harmful_eval"])
    return model, tokenizer


def data(recipe: Recipe | None = None, *, progress: bool = True) -> dict[str, Path]:
    """Paths of the toy data sets, by name (see ``DATA_FILES``)."""
    entry = build(recipe, progress=progress)
    return {name: entry / "data" / file for name, file in DATA_FILES.items()}


def attack_pairs(recipe: Recipe | None = None) -> list:
    """The toy's harmful (prompt, compliant answer) pairs of its instruction-tuning split, as
    ``pyattr.data.Example``: what fine-tuning attacks on the toy model train on."""
    from ..data import Example

    return [Example(p, a) for p, a in make_splits(recipe or Recipe()).instruct_harmful]


# How-to pairs the refusal direction and the head probes contrast against by default.
CONTRAST_PAIRS = 72


def contrast_pairs(recipe: Recipe | None = None, n: int | None = CONTRAST_PAIRS) -> list:
    """``n`` (None: all) benign how-to (request, answer) pairs of the toy's utility training
    split, as ``pyattr.data.Example``: the harmless set of the refusal direction and the head
    probes on the toy. They are the toy's matched contrast: requests of the harmful ones' form
    whose answers open as refusals do ("I can help ." / "I cannot help ."), so a difference of
    means against them isolates the decision to refuse, where the toy's other tasks (whose
    answers open with another word) would mostly find the opening word."""
    from ..data import Example

    howto = [
        Example(p, a)
        for p, a in make_splits(recipe or Recipe()).utility_train
        if a.startswith("I can help .")
    ]
    if n is not None and n > len(howto):
        raise ValueError(f"the toy has {len(howto)} how-to pairs, {n} were asked for")
    return howto[:n]
