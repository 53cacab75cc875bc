"""Sweeps: edits applied point by point from one set of statistics and eigenbases, each point
measured and appended to a results table that resumes after an interruption.

Rows go to ``results.jsonl`` (one JSON object per line, flushed as each point finishes) under a
first line that holds the sweep's configuration. Opening the same file with the same
configuration resumes: ``done(key)`` says which points are there already. A file made with
another configuration is never overwritten unless asked, so an interrupted or different run
cannot destroy complete results.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .calibrate import Stats
from .data import Example
from .io import RecordLog

__all__ = ["Attack", "Editor", "Point", "ResultsTable", "run_points"]

FORMAT = "pyattr.results/1"


class ResultsTable:
    """``results.jsonl`` of one sweep (a ``pyattr.io.RecordLog``): ``rows`` holds the points
    finished so far, in order; another configuration's file is refused unless ``overwrite``."""

    def __init__(self, path: str | Path, config: dict, *, overwrite: bool = False) -> None:
        self._log = RecordLog(path, config, format=FORMAT, resume=not overwrite)
        self.path, self.config, self.digest = self._log.path, config, self._log.digest

    @property
    def rows(self) -> list[dict]:
        return self._log.records

    def done(self, key: str) -> dict | None:
        """The row of point ``key`` if it finished in this or an earlier run."""
        return next((r for r in self.rows if r.get("key") == key), None)

    def append(self, row: dict) -> None:
        """Add a finished point (it must carry a ``key``) and flush it to disk."""
        if "key" not in row:
            raise ValueError("a results row needs a 'key'")
        self._log.append([row])


@dataclass(frozen=True)
class Point:
    """One point of a sweep: an edit ``method`` and its parameters.

    methods: ``none``; ``top`` (method, q); ``set_difference`` (method, p, q);
    ``random_weights`` (like, p, q: a random region as large as that set difference);
    ``actsvd_remove`` (r); ``orthogonal`` (keep_u/keep_s or r_u/r_s, counts or fractions of R);
    ``random_ranks`` (as orthogonal: random directions of the same ranks); ``finetune`` (n,
    steps, frozen: "none", "set_difference" with method, p, q, or "top_safety" with method, q:
    a fine-tuning attack on n pairs of the editor's ``Attack`` with that region kept bit for
    bit).
    """

    method: str
    params: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.method}({args})"


@dataclass(frozen=True)
class Attack:
    """What the sweep's fine-tuning points train on: the tokenizer, (prompt, harmful answer)
    pairs to draw n from, and the optimizer's settings (``finetune.finetune``'s)."""

    tokenizer: Any
    pairs: Sequence[Example]
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0


FROZEN = ("none", "set_difference", "top_safety")


class Editor:
    """A model with its safety and utility statistics: applies a point's edit to a copy and says
    how much it removed (a fraction of the weights or of the ranks; nothing for a fine-tuning
    attack). The eigenbases are computed once, on first use, from the statistics' covariances.
    ``attack``: what fine-tuning points train on (needed only by them)."""

    def __init__(
        self,
        model: nn.Module,
        safety: Stats,
        utility: Stats | None = None,
        attack: Attack | None = None,
    ) -> None:
        self.model, self.safety, self.utility = model, safety, utility
        self.attack = attack
        self._bases: list | None = None

    @property
    def bases(self) -> list:
        from .lowrank import eigenbases

        if self._bases is None:
            stats = [s for s in (self.safety, self.utility) if s is not None]
            self._bases = [eigenbases(self.model, s, progress=False) for s in stats]
        return self._bases

    def _ranks(self, p: dict) -> dict:
        keys = ("keep_u", "keep_s", "r_u", "r_s")
        return {k: p[k] for k in keys if k in p}

    def edited(self, point: Point) -> tuple[nn.Module, float, str]:
        from .edit import prune
        from .lowrank import edit_ranks, remove_random
        from .masks import random_like, region

        model = copy.deepcopy(self.model)
        p = point.params
        if point.method == "none":
            return model, 0.0, "weights"
        if point.method in ("top", "set_difference", "random_weights"):
            method = p.get("method", p.get("like", "wanda"))
            utility = None if point.method == "top" else self.utility
            mask, _ = region(model, self.safety, utility, method=method, q=p["q"], p=p.get("p"))
            if point.method == "random_weights":
                mask = random_like(mask, seed=0)
            prune(model, mask)
            return model, mask.sparsity()["overall"], "weights"
        if point.method == "actsvd_remove":
            report = edit_ranks(model, "remove", self.bases[0], r=p["r"])
            return model, report.fraction, "ranks"
        if point.method in ("orthogonal", "random_ranks"):
            if self.utility is None:
                raise ValueError(f"{point.key} needs the utility statistics")
            safety, utility = self.bases
            report = edit_ranks(model, "orthogonal", safety, utility, **self._ranks(p))
            if point.method == "random_ranks":
                model = copy.deepcopy(self.model)
                remove_random(model, report, seed=0)
            return model, report.fraction, "ranks"
        if point.method == "finetune":
            return self._finetuned(model, p), 0.0, "weights"
        raise ValueError(f"unknown sweep method {point.method!r}")

    def _finetuned(self, model: nn.Module, p: dict) -> nn.Module:
        from .data import sample
        from .finetune import finetune
        from .masks import region

        if self.attack is None:
            raise ValueError(
                "finetune points need what to train on: Editor(..., attack=Attack(tokenizer, "
                "pairs)) (on the command line, --attack-data)"
            )
        frozen = p.get("frozen", "none")
        if frozen not in FROZEN:
            raise ValueError(f"frozen must be one of {FROZEN}, got {frozen!r}")
        mask = None
        if frozen == "set_difference":
            method = p.get("method", "wanda")
            mask, _ = region(model, self.safety, self.utility, method=method, q=p["q"], p=p["p"])
        elif frozen == "top_safety":
            mask, _ = region(model, self.safety, method=p.get("method", "wanda"), q=p["q"])
        a = self.attack
        pairs = sample(a.pairs, p["n"], seed=a.seed)
        finetune(
            model,
            a.tokenizer,
            pairs,
            frozen=mask,
            steps=p["steps"],
            lr=a.lr,
            batch_size=min(a.batch_size, p["n"]),
            seed=a.seed,
            progress=False,
        )
        return model


def run_points(
    editor: Editor,
    points: Sequence[Point],
    table: ResultsTable,
    measure: Callable[[nn.Module], dict],
    *,
    progress: bool = True,
) -> list[dict]:
    """Edit, measure and append each point not in ``table`` yet; returns all rows."""
    from tqdm.auto import tqdm

    bar = tqdm(points, desc="sweep", unit="point", disable=not progress)
    for point in bar:
        bar.set_postfix_str(point.key)
        if table.done(point.key):
            continue
        start = time.perf_counter()
        model, removed, unit = editor.edited(point)
        row = {"key": point.key, "method": point.method, "params": point.params}
        row |= {"removed": removed, "unit": unit, **measure(model)}
        row["seconds"] = round(time.perf_counter() - start, 2)
        table.append(row)
    return table.rows
