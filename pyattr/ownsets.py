"""Calibration sets made by the model under study (``pyattr data safety`` / ``data utility``).

The paper's safety set is Llama-2-7b-chat's own refusals to harmful prompts; a set made by
another model's generations would put foreign text (another chat format, other refusal words)
where the statistics should see the studied model's own behaviour. ``make_set`` generates the
model's responses with its own chat template (greedy, as calibration formats them), judges
each, and keeps the refusals (a safety set) or the answers (a utility set, an option: the paper
used Alpaca's reference answers). What was dropped is reported, never silently lost.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from .io import atomic_write

__all__ = ["MadeSet", "make_set", "save_pairs"]


@dataclass
class MadeSet:
    """The kept (prompt, response) pairs, and the rest with their responses."""

    keep: str
    pairs: list[tuple[str, str]]
    dropped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.pairs) + len(self.dropped)

    def summary(self) -> str:
        return (
            f"kept {len(self.pairs)} of {self.total} responses as {self.keep} "
            f"({len(self.pairs) / max(self.total, 1):.1%})"
        )


def make_set(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    keep: Literal["refusals", "answers"] = "refusals",
    judge=None,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    system_prompt: str | None = None,
) -> MadeSet:
    """Generate the model's response to each prompt and keep the ``refusals`` (a safety set)
    or the ``answers`` (a utility set), as ``judge`` decides (default: the keyword judge;
    a success, for a judge, is an answer)."""
    from .evaluate import KeywordJudge, generate

    if keep not in ("refusals", "answers"):
        raise ValueError(f"keep must be 'refusals' or 'answers', got {keep!r}")
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts to answer")
    judge = judge or KeywordJudge()
    responses = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
    )
    answered = judge.successes(prompts, responses)
    made = MadeSet(keep, [])
    for prompt, response, answer in zip(prompts, responses, answered, strict=True):
        wanted = response.strip() and answer == (keep == "answers")
        (made.pairs if wanted else made.dropped).append((prompt, response))
    return made


def save_pairs(pairs: Sequence[tuple[str, str]], path: str | Path) -> Path:
    """``pairs`` as a CSV with columns prompt, response (what ``calibrate`` reads), atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["prompt", "response"])
    writer.writerows(pairs)
    return atomic_write(path, out.getvalue())
