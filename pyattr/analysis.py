"""Overlap between safety and utility, per layer and module type (the paper's overlap analysis).

Two measures, one value per weight matrix:

- Jaccard index of the top weights, ``|P ∩ Q| / |P ∪ Q|`` with ``P = top_p(S_utility)`` and
  ``Q = top_q(S_safety)`` (from ``masks.region``'s counts, no extra pass);
- subspace similarity of the top ranks, ``‖U_uᵀ U_s‖_F² / min(r_u, r_s)`` (``lowrank``).

``overlap_table`` arranges such values by decoder block and module type (``self_attn.q_proj``,
``mlp.down_proj``…); ``save_table`` writes it as CSV or JSON and ``heatmap`` as a PNG (blocks ×
module types), both atomically. Plots need matplotlib (``pip install 'pyattr[plot]'``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from .counts import resolve
from .io import atomic_write
from .lowrank import Eigenbasis, subspace_similarity
from .models import find_linear_layers, layers_by_name
from .selection import SetDifference

__all__ = [
    "chance_jaccard",
    "chance_similarity",
    "heatmap",
    "jaccard",
    "overlap_table",
    "save_table",
    "similarities",
]


def jaccard(counts: Mapping[str, SetDifference]) -> dict[str, float]:
    """Per layer, the Jaccard index of the two top sets of a set difference."""
    return {name: float(c.jaccard) for name, c in counts.items()}


def chance_jaccard(counts: Mapping[str, SetDifference], model: nn.Module) -> dict[str, float]:
    """Per layer, the Jaccard index two random sets of the same sizes would have: with
    ``E|P ∩ Q| = |P|·|Q|/n`` for n entries, ``E∩ / (|P| + |Q| − E∩)`` (for p = q = 5%, 0.026).
    An index near it says the two top sets overlap no more than chance."""
    sizes = {layer.name: layer.weight.numel() for layer in find_linear_layers(model)}
    out = {}
    for name, c in counts.items():
        meet = c.size_p * c.size_q / sizes[name]
        union = c.size_p + c.size_q - meet
        out[name] = meet / union if union else 1.0
    return out


def _rank_count(value: int | float | str, rank: int, name: str, layer: str) -> int:
    """Ranks as the rank-level edits count them (``pyattr.counts``: a count, or a fraction of
    the layer's R rounded down)."""
    return resolve(value, rank, name, whole="R", where=layer)


def chance_similarity(
    safety: Mapping[str, Eigenbasis], r_u: int | float, r_s: int | float
) -> dict[str, float]:
    """Per layer, the subspace similarity of two random subspaces of the same ranks in the
    layer's d_out dimensions: ``E‖U_uᵀ U_s‖_F² = r_u·r_s/d``, so ``max(r_u, r_s)/d``."""
    out = {}
    for name, b in safety.items():
        ru, rs = _rank_count(r_u, b.rank, "r_u", name), _rank_count(r_s, b.rank, "r_s", name)
        out[name] = max(ru, rs) / b.d_out
    return out


def similarities(
    utility: Mapping[str, Eigenbasis],
    safety: Mapping[str, Eigenbasis],
    r_u: int | float,
    r_s: int | float,
) -> dict[str, float]:
    """Per layer present in both, the subspace similarity of the top ``r_u`` utility and
    ``r_s`` safety ranks (counts, or fractions of the layer's R: ``pyattr.counts``)."""
    return {
        name: subspace_similarity(
            utility[name],
            safety[name],
            _rank_count(r_u, b.rank, "r_u", name),
            _rank_count(r_s, b.rank, "r_s", name),
        )
        for name, b in safety.items()
        if name in utility
    }


def overlap_table(
    values: Mapping[str, float], model: nn.Module, chance: Mapping[str, float] | None = None
) -> list[dict]:
    """Rows ``{"layer", "block", "module", "value"}`` in the model's layer order, with a
    ``"chance"`` column (the value at random, ``chance_jaccard``/``chance_similarity``) when
    given."""
    layers = layers_by_name(model)
    unknown = [name for name in values if name not in layers]
    if unknown:
        raise ValueError(f"{type(model).__name__} has no layer {unknown[0]!r}")
    rows = []
    for name, layer in layers.items():
        if name in values:
            module = re.sub(rf"^.*?\.{layer.block}\.", "", name)
            row = {"layer": name, "block": layer.block, "module": module, "value": values[name]}
            if chance is not None:
                row["chance"] = chance[name]
            rows.append(row)
    return rows


def save_table(rows: list[dict], path: str | Path) -> Path:
    """Write rows as CSV (``.csv``) or JSON (``.json``), atomically; a CSV's columns are every
    row's keys in the order first seen (a key a row lacks is an empty cell)."""
    path = Path(path)
    if not rows:
        raise ValueError("no rows to write")
    if path.suffix == ".json":
        return atomic_write(path, (json.dumps(rows, indent=1) + "\n").encode())
    if path.suffix != ".csv":
        raise ValueError(f"a table is written as .csv or .json, not {path.suffix!r}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue().encode())


def heatmap(rows: list[dict], path: str | Path, *, title: str = "", label: str = "") -> Path:
    """A blocks × module types heat map of ``overlap_table`` rows, as a PNG, atomically. When
    the rows carry a ``"chance"`` column, the chance level is marked on the colour bar and named
    in the title, so that a cell can be read against what random sets would give."""
    from ._plot import pyplot, save_png

    plt = pyplot()
    if not rows:
        raise ValueError("no rows to plot")
    blocks = sorted({r["block"] for r in rows})
    modules = list(dict.fromkeys(r["module"] for r in rows))
    grid = [[float("nan")] * len(blocks) for _ in modules]
    for r in rows:
        grid[modules.index(r["module"])][blocks.index(r["block"])] = r["value"]
    width = max(6.0, 0.35 * len(blocks) + 3.0)
    fig, ax = plt.subplots(figsize=(width, 0.45 * len(modules) + 1.6))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    step = max(1, len(blocks) // 16)  # at most 16 block labels
    ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]])
    ax.set_yticks(range(len(modules)), modules)
    ax.set_xlabel("decoder block")
    ax.set_title(title, fontsize=10)
    if len(blocks) <= 12:  # few enough cells to print their values
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:
                    color = "white" if value < 0.6 else "black"
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, c=color)
    bar = fig.colorbar(image, ax=ax, label=label)
    chance = sorted({round(r["chance"], 3) for r in rows if r.get("chance") is not None})
    if chance:
        for level in chance:
            bar.ax.axhline(level, color="red", linewidth=1.5)
        span = f"{chance[0]:.3f}" if len(chance) == 1 else f"{chance[0]:.3f}–{chance[-1]:.3f}"
        ax.set_title(f"{title}\nchance level (red on the colour bar): {span}", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)
