"""Calibration and evaluation data: (prompt, response) pairs, chat formatting, token masks.

Pairs come from CSV, JSON (a list of objects) or JSONL files, or from any sequence of mappings
(a ``datasets.Dataset`` included), with configurable column names (AdvBench: ``goal``/
``target``). Prompts are formatted with the tokenizer's chat template when it has one, else in
the Llama-2 format ``[INST] <<SYS>>…<</SYS>> prompt [/INST]``; a prompt already wrapped in
``[INST] … [/INST]`` (as in the paper's safety CSV) is used as it is, never wrapped twice.
Tokens are prompt ids followed by response ids (so the boundary is exact) and end with EOS;
by default only response tokens count for the statistics (the paper's "disentangle" mode).
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

__all__ = [
    "Encoded",
    "Example",
    "encode",
    "encode_all",
    "is_wrapped",
    "load_pairs",
    "load_prompts",
    "prompt_ids",
    "sample",
    "SAMPLINGS",
]

_WRAPPED = re.compile(r"\[INST\].*\[/INST\]", re.DOTALL)


@dataclass(frozen=True)
class Example:
    """One calibration pair."""

    prompt: str
    response: str


@dataclass(frozen=True)
class Encoded:
    """input_ids: (L,) int64; counted: (L,) bool, True for the tokens whose activations count."""

    input_ids: torch.Tensor
    counted: torch.Tensor


def _load_from_disk(path: Path, split: str | None) -> Sequence[Mapping]:
    """A data set saved with ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{path} is a directory, read as a saved `datasets` data set, which needs the "
            "`datasets` package: pip install 'pyattr[data]'"
        ) from err
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise ValueError(
                f"{path}: choose a split with split=...; the splits found are {splits}"
                if split is None
                else f"{path}: no split {split!r}; the splits found are {splits}"
            )
        loaded = loaded[split]
    return loaded


def _text(path: Path) -> str:
    """A data file's text: UTF-8, with or without the byte-order mark spreadsheet programs
    write; anything else is an error naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None


def _objects(path: Path, rows: list, where) -> list[Mapping]:
    """Rows that are JSON objects; the first that is not is named with ``where(i)``."""
    odd = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
    if odd is not None:
        raise ValueError(
            f"{path}: {where(odd)} is a {type(rows[odd]).__name__}, not an object with columns"
        )
    return rows


def _read_rows(path: Path, split: str | None = None) -> Sequence[Mapping]:
    if path.is_dir():
        return _load_from_disk(path, split)
    if split is not None:
        raise ValueError(f"{path}: split={split!r} applies only to a saved `datasets` directory")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(_text(path), newline="")))
    if suffix == ".jsonl":
        rows, lines = [], _text(path).splitlines()
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        objects = [r for _, r in rows]
        return _objects(path, objects, lambda i: f"line {rows[i][0]}")
    if suffix == ".json":
        try:
            rows = json.loads(_text(path))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        return _objects(path, rows, lambda i: f"item {i}")
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .json or .jsonl)")


def load_pairs(
    source: str | Path | Sequence[Mapping],
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    n: int | None = None,
    seed: int = 0,
    split: str | None = None,
) -> list[Example]:
    """(prompt, response) pairs from a file (.csv, .json, .jsonl), a directory saved with
    ``datasets``' ``save_to_disk`` (``split`` picks one of a DatasetDict) or a sequence of
    mappings; ``n`` samples that many (seeded). Rows with an empty response are skipped, and a
    warning counts them."""
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    rows = _read_rows(Path(source), split) if isinstance(source, (str, Path)) else source
    if len(rows) == 0:
        raise ValueError(f"{name}: the data set is empty")
    columns = list(rows.column_names if hasattr(rows, "column_names") else rows[0].keys())
    for column in (prompt_column, response_column):
        if column not in columns:
            raise ValueError(f"{name}: no column {column!r}; the columns found are {columns}")
    examples, empty = [], 0
    for row in rows:
        prompt, response = row.get(prompt_column), row.get(response_column)
        if not prompt or not response or not str(response).strip():
            empty += 1
            continue
        examples.append(Example(str(prompt), str(response)))
    if empty:
        warnings.warn(
            f"{name}: skipped {empty} of {len(rows)} rows with an empty prompt or response",
            stacklevel=2,
        )
    if not examples:
        raise ValueError(f"{name}: no row has both a prompt and a response")
    return sample(examples, n, seed) if n is not None else examples


def load_prompts(
    source: str | Path, *, column: str = "goal", split: str | None = None
) -> list[str]:
    """Evaluation prompts: a text file with one per line, or a column of a CSV/JSON(L) file or
    of a saved ``datasets`` directory."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no prompt file {path}")
    if path.suffix.lower() in (".txt", "") and not path.is_dir():
        prompts = [line.strip() for line in _text(path).splitlines()]
        prompts = [p for p in prompts if p]
    else:
        rows = _read_rows(path, split)
        if len(rows) and column not in rows[0]:
            raise ValueError(
                f"{path}: no column {column!r}; the columns found are {list(rows[0].keys())}"
            )
        prompts = [str(r[column]) for r in rows if r.get(column)]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


SAMPLINGS = ("pyattr", "datasets")


def sample(
    items: Sequence, n: int, seed: int = 0, method: Literal["pyattr", "datasets"] = "pyattr"
) -> list:
    """``n`` items drawn without replacement, the same for the same seed. ``method``:
    "pyattr" (Python's ``random.Random(seed).sample``) or "datasets": the rows
    ``Dataset.shuffle(seed=seed).select(range(n))`` gives (numpy's ``default_rng(seed)``
    permutation, its first n), what the released code did."""
    if not 0 <= n <= len(items):
        raise ValueError(f"cannot sample n={n} from {len(items)} examples")
    if method == "datasets":
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(items))[:n]
        return [items[int(i)] for i in order]
    if method != "pyattr":
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {method!r}")
    return random.Random(seed).sample(list(items), n)


def is_wrapped(prompt: str) -> bool:
    """Whether a prompt is already in the Llama-2 chat format ``[INST] … [/INST]``."""
    return bool(_WRAPPED.search(prompt))


def _ids(result) -> list[int]:
    """Token ids from a tokenizer call or ``apply_chat_template`` (a list or a BatchEncoding)."""
    if isinstance(result, Mapping) or hasattr(result, "keys"):
        result = result["input_ids"]
    if result and isinstance(result[0], list):
        result = result[0]
    return list(result)


def _prompt_text(
    tokenizer, prompt: str, system_prompt: str | None, wrapped: bool | None
) -> tuple[str, bool]:
    """A formatted prompt as text and whether tokenizing it adds special tokens: what
    ``prompt_ids`` tokenizes (``apply_chat_template`` tokenizes its text without adding any)."""
    if wrapped if wrapped is not None else is_wrapped(prompt):
        bos = tokenizer.bos_token
        return prompt, not (bos and prompt.startswith(bos))
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # templates that reject a system turn (Gemma) raise here
            if not system_prompt or "system" not in str(exc).lower():
                raise
            messages = [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return text, False
    system = f"<<SYS>>\n{system_prompt}\n<</SYS>>\n\n" if system_prompt else ""
    return f"[INST] {system}{prompt} [/INST]", True


def prompt_ids(
    tokenizer, prompt: str, system_prompt: str | None = None, wrapped: bool | None = None
) -> list[int]:
    """Token ids of a formatted prompt, ending where the response begins: the chat template
    with its generation prompt, the Llama-2 ``[INST]`` format without one, or the prompt as it
    is when already wrapped (``wrapped=None`` detects it)."""
    text, special = _prompt_text(tokenizer, prompt, system_prompt, wrapped)
    return _ids(tokenizer(text, add_special_tokens=special))


def encode(
    tokenizer,
    example: Example,
    *,
    system_prompt: str | None = None,
    count: Literal["response", "all"] = "response",
    wrapped: bool | None = None,
    eos: bool = True,
) -> Encoded:
    """Token ids of the formatted prompt followed by the response and EOS, and which count.

    wrapped: None detects an existing ``[INST] … [/INST]`` wrapper; True/False forces it.
    eos: append EOS after the response (counted with it). The released code does not: its
    statistics cover the response tokens only, about 8-10% fewer tokens on short responses.
    """
    prompt = prompt_ids(tokenizer, example.prompt, system_prompt, wrapped)
    response = _ids(tokenizer(example.response, add_special_tokens=False))
    return _joined(tokenizer, prompt, response, count, eos)


def _joined(tokenizer, prompt: list[int], response: list[int], count: str, eos: bool) -> Encoded:
    if count not in ("response", "all"):
        raise ValueError(f"count must be 'response' or 'all', got {count!r}")
    if eos and tokenizer.eos_token_id is not None:
        response = [*response, tokenizer.eos_token_id]
    ids = torch.tensor(prompt + response, dtype=torch.long)
    counted = torch.ones(len(ids), dtype=torch.bool)
    if count == "response":
        counted[: len(prompt)] = False
    return Encoded(ids, counted)


def encode_all(
    tokenizer,
    examples: Iterable[Example],
    *,
    max_length: int | None = None,
    system_prompt: str | Sequence[str | None] | None = None,
    count: Literal["response", "all"] = "response",
    wrapped: bool | None = None,
    eos: bool = True,
) -> list[Encoded]:
    """``encode`` each example (the same ids), cut to ``max_length`` tokens; one warning counts
    the cut ones. ``system_prompt``: one for every example, or a sequence of one per example.
    The formatted prompts and the responses are tokenized in batches, one tokenizer call for
    all of them instead of two per example: several times faster on thousands of examples."""
    if count not in ("response", "all"):
        raise ValueError(f"count must be 'response' or 'all', got {count!r}")
    examples = list(examples)
    if system_prompt is None or isinstance(system_prompt, str):
        systems = [system_prompt] * len(examples)
    else:
        systems = list(system_prompt)
        if len(systems) != len(examples):
            raise ValueError(f"{len(systems)} system prompts for {len(examples)} examples")
    pairs = zip(examples, systems, strict=True)
    texts = [_prompt_text(tokenizer, e.prompt, s, wrapped) for e, s in pairs]
    prompts: list[list[int]] = [[] for _ in examples]
    for special in (True, False):  # one call per add_special_tokens setting
        rows = [i for i, (_, adds) in enumerate(texts) if adds == special]
        if rows:
            ids = tokenizer([texts[i][0] for i in rows], add_special_tokens=special)["input_ids"]
            for i, row in zip(rows, ids, strict=True):
                prompts[i] = list(row)
    responses = [e.response for e in examples]
    responses = tokenizer(responses, add_special_tokens=False)["input_ids"] if examples else []
    out, cut = [], 0
    for prompt, response in zip(prompts, responses, strict=True):
        enc = _joined(tokenizer, prompt, list(response), count, eos)
        if max_length is not None and len(enc.input_ids) > max_length:
            cut += 1
            enc = Encoded(enc.input_ids[:max_length], enc.counted[:max_length])
        out.append(enc)
    if cut:
        warnings.warn(
            f"{cut} of {len(out)} examples are longer than {max_length} tokens and were truncated",
            stacklevel=2,
        )
    return out
