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

import torch
from torch import nn

from . import edits
from .data import Example
from .io import RecordLog
from .stats import Stats

__all__ = ["Attack", "Editor", "Point", "ResultsTable", "draws_of", "run_points"]

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

    def close(self) -> None:
        """Release the table for another run (``run_points`` does when it ends)."""
        self._log.close()

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
    """One point of a sweep: an ``edit`` of ``pyattr.edits`` (``names()``) and its parameters,
    e.g. ``Point("set_difference", {"score": "wanda", "p": 0.05, "q": 0.05})``."""

    edit: str
    params: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.edit}({args})"

    def check(self) -> None:
        """Refuse an unknown edit or parameters it does not take, before any work."""
        edits.get(self.edit).check(self.params)


def draws_of(point: Point, draws: int = 1) -> list[Point]:
    """A random control drawn ``draws`` times: the point as it is for one draw, else one point
    per seed 0 … draws − 1. One draw is a sample of the control, and on a small model a single
    draw can move ASR further than the mean of a few (benchmarks/RESULTS.md, "Random controls,
    draw by draw"); the report pools the draws into their mean and range (``report.pool_draws``)."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a whole number of at least 1, got {draws!r}")
    if not edits.is_control(point.edit, point.params):
        raise ValueError(f"{point.key} is not a random control; only controls are drawn")
    if "seed" in point.params:
        raise ValueError(f"{point.key} already names its seed; draws_of sets the seeds")
    if draws == 1:
        return [point]
    return [Point(point.edit, point.params | {"seed": k}) for k in range(draws)]


@dataclass(frozen=True)
class Attack:
    """What the sweep's fine-tuning points train on: the tokenizer, (prompt, harmful answer)
    pairs to draw n from, and the optimizer's settings (``finetune.finetune``'s)."""

    tokenizer: Any
    pairs: Sequence[Example]
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0
    optimizer: str = "adamw"


class Editor:
    """A model with its safety and utility statistics: applies a point's edit to a copy and says
    how much it removed (a fraction of the weights or of the ranks; nothing for a fine-tuning
    attack). The eigenbases are computed once, on first use, from the statistics' covariances,
    unless given (``bases``: [safety] or [safety, utility], e.g. from ``pyattr lowrank eigen``).
    ``attack``: what fine-tuning points train on; ``source``: the model rewind points copy
    from; ``direction``: the refusal direction (d,) that direction points orthogonalise;
    ``calibration``: (tokenizer, safety pairs) that sequential points calibrate on (each needed
    only by those points).

    ``in_place``: edit the model itself, layer by layer, and put it back bit for bit before the
    next point (``pyattr.offload.Journal``) instead of editing a deep copy: the way for a model
    offloaded by accelerate or too large to hold twice (default: when any weight is offloaded).
    Only edits with ``layerwise`` run so; ``restore()`` puts the last point's edit back."""

    def __init__(
        self,
        model: nn.Module,
        safety: Stats,
        utility: Stats | None = None,
        attack: Attack | None = None,
        *,
        source: nn.Module | None = None,
        bases: list | None = None,
        direction: torch.Tensor | None = None,
        calibration: tuple | None = None,
        in_place: bool | None = None,
    ) -> None:
        from .offload import Journal, has_offloaded

        self.model, self.safety, self.utility = model, safety, utility
        self.attack, self.source, self.direction = attack, source, direction
        self.calibration = calibration
        self._bases = bases
        self.in_place = has_offloaded(model) if in_place is None else in_place
        self._journal = Journal()

    @property
    def bases(self) -> list:
        from .lowrank import eigenbases

        if self._bases is None:
            stats = [s for s in (self.safety, self.utility) if s is not None]
            self._bases = [eigenbases(self.model, s, progress=False) for s in stats]
        return self._bases

    def check(self, point: Point) -> None:
        """Refuse a malformed point, or one this editor cannot apply in place, before any work."""
        point.check()
        if self.in_place and (
            not edits.get(point.edit).layerwise or point.params.get("sequential")
        ):
            sequential = bool(point.params.get("sequential"))
            what = "sequential pruning" if sequential else point.edit
            hint = " (or prune in one pass: pyattr paper --no-sequential)" if sequential else ""
            raise ValueError(
                f"{what} points need a copy of the whole model, which this in-place editor "
                f"(an offloaded model) does not make: run them on a model that fits in memory{hint}"
            )

    def edited(self, point: Point) -> tuple[nn.Module, float, str]:
        """(the edited model, the fraction it removed, "weights" or "ranks"): a copy, or in
        place the model itself after the previous point's edit is put back."""
        self.check(point)
        edit = edits.get(point.edit)
        if not self.in_place:
            model = copy.deepcopy(self.model)
            return model, edit.apply(self, model, point.params), edit.unit
        self.restore()
        with self._journal:
            removed = edit.apply(self, self.model, point.params)
        return self.model, removed, edit.unit

    def restore(self) -> None:
        """Put back what the last in-place edit changed (nothing for an editor of copies)."""
        self._journal.restore()


def run_points(
    editor: Editor,
    points: Sequence[Point],
    table: ResultsTable,
    measure: Callable[[nn.Module], dict],
    *,
    progress: bool = True,
) -> list[dict]:
    """Edit, measure and append each point not in ``table`` yet; returns all rows. Every point
    is checked before the first one runs; the table is released (for another run) at the end,
    also when a point fails."""
    from tqdm.auto import tqdm

    try:
        for point in points:
            editor.check(point)
        bar = tqdm(points, desc="sweep", unit="point", disable=not progress)
        for point in bar:
            bar.set_postfix_str(point.key)
            if table.done(point.key):
                continue
            start = time.perf_counter()
            model, removed, unit = editor.edited(point)
            row = {"key": point.key, "edit": point.edit, "params": point.params}
            row |= {"removed": removed, "unit": unit, **measure(model)}
            row["seconds"] = round(time.perf_counter() - start, 2)
            table.append(row)
    finally:
        editor.restore()
        table.close()
    return table.rows
