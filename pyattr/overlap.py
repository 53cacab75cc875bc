"""One overlap map across granularities: direction, ranks, weights and heads, block by block.

For each decoder block:

- ``{writer}:safety`` / ``{writer}:utility``: how much of the refusal direction lies in the
  safety and the utility subspace of each layer of the block that writes to the residual stream
  (o_proj, down_proj): ``‖U_rᵀ r̂‖``, ``U_r`` the top-r eigenvectors of that layer's
  ``W C Wᵀ`` (the rank level's ActSVD bases), a value in [0, 1]; a random direction gives
  about ``sqrt(r / d)`` (``chance_projection``);
- ``jaccard``: the mean Jaccard index of the block's matrices between the top safety and top
  utility weights (the weight level), with its chance level;
- ``probe_max`` / ``probe_mean``: the best and the mean held-out accuracy of the block's head
  probes (``pyattr.probe``; chance 0.5).

``overlap_map`` builds the rows from whichever of these it is given; ``plot_overlap`` draws them
as one figure of three panels sharing the block axis, the direction's own block marked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .direction import residual_writers
from .models import decoder_blocks, layers_by_name

__all__ = ["chance_projection", "overlap_map", "plot_overlap", "projection_norm"]


def projection_norm(vectors: torch.Tensor, direction: torch.Tensor) -> float:
    """``‖Uᵀ r̂‖`` for orthonormal columns ``vectors`` (d, r) and a direction (d,)."""
    if vectors.dim() != 2 or vectors.shape[0] != direction.shape[0]:
        raise ValueError(
            f"vectors must be (d, r) with d = {direction.shape[0]}, got {tuple(vectors.shape)}"
        )
    unit = direction.double() / direction.double().norm()
    return float((vectors.double().T @ unit.to(vectors.device)).norm())


def chance_projection(r: int, d: int) -> float:
    """sqrt(r / d): the root-mean-square projection norm of a random unit vector onto an r-dim
    subspace of d dimensions."""
    return math.sqrt(r / d)


def _short(name: str, block: int) -> str:
    return re.sub(rf"^.*?\.{block}\.", "", name)


def overlap_map(
    model: nn.Module,
    *,
    direction: torch.Tensor | None = None,
    direction_layer: int | None = None,
    safety_bases: Mapping | None = None,
    utility_bases: Mapping | None = None,
    r: int = 16,
    jaccard: Mapping[str, float] | None = None,
    jaccard_chance: Mapping[str, float] | None = None,
    probe=None,
) -> list[dict]:
    """One row per block (see the module's docstring); columns for what is given. ``r``: the
    eigenvectors of each subspace (at most what the bases keep)."""
    if direction is None and jaccard is None and probe is None:
        raise ValueError("give at least one of direction (with bases), jaccard or probe")
    if direction is not None and safety_bases is None and utility_bases is None:
        raise ValueError("the direction's overlap needs the safety or utility eigenbases")
    _, blocks = decoder_blocks(model)
    layers = layers_by_name(model)
    writers = residual_writers(model) if direction is not None else []
    if probe is not None and probe.accuracy.shape[0] != len(blocks):
        raise ValueError(f"the probe has {probe.accuracy.shape[0]} blocks, the model {len(blocks)}")
    rows = []
    for block in range(len(blocks)):
        row: dict = {"block": block}
        if direction is not None:
            row["direction_block"] = direction_layer if direction_layer is not None else ""
            width = direction.shape[0]
            row["chance_projection"] = round(chance_projection(r, width), 4)
            for name in (w for w in writers if layers[w].block == block):
                for kind, bases in (("safety", safety_bases), ("utility", utility_bases)):
                    if bases is None:
                        continue
                    if name not in bases:
                        raise ValueError(f"the {kind} eigenbases have no layer {name!r}")
                    vectors = bases[name].top(min(r, bases[name].rank), what="r")
                    value = projection_norm(vectors, direction)
                    row[f"{_short(name, block)}:{kind}"] = round(value, 4)
        if jaccard is not None:
            mine = [v for n, v in jaccard.items() if n in layers and layers[n].block == block]
            row["jaccard"] = round(sum(mine) / len(mine), 4) if mine else float("nan")
            if jaccard_chance is not None:
                chance = [
                    v for n, v in jaccard_chance.items() if n in layers and layers[n].block == block
                ]
                row["jaccard_chance"] = round(sum(chance) / len(chance), 4) if chance else ""
        if probe is not None:
            accuracy = probe.accuracy[block]
            row["probe_max"] = round(float(accuracy.max()), 4)
            row["probe_mean"] = round(float(accuracy.mean()), 4)
            row["probe_best_head"] = int(accuracy.argmax())
        rows.append(row)
    return rows


def plot_overlap(rows: list[dict], path: str | Path, *, title: str = "") -> Path:
    """The overlap map as one PNG (atomically): the direction in each writer's safety and utility
    subspace, the Jaccard index of the weight regions and the head probes' accuracy, per block,
    each against its chance level."""
    from ._plot import pyplot, save_png

    plt = pyplot()
    if not rows:
        raise ValueError("no rows to plot")
    blocks = [r["block"] for r in rows]
    projections = [k for k in rows[0] if k.endswith((":safety", ":utility"))]
    panels = [
        name
        for name, present in (
            ("direction", bool(projections)),
            ("jaccard", "jaccard" in rows[0]),
            ("probe", "probe_max" in rows[0]),
        )
        if present
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.0, 2.6 * len(panels)), sharex=True)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "direction":
            writers = list(dict.fromkeys(k.rsplit(":", 1)[0] for k in projections))
            colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            for i, writer in enumerate(writers):
                for kind, style in (("safety", "-"), ("utility", "--")):
                    key = f"{writer}:{kind}"
                    if key in rows[0]:
                        values = [r[key] for r in rows]
                        ax.plot(
                            blocks,
                            values,
                            style,
                            marker="o",
                            c=colours[i % len(colours)],
                            label=f"{writer}, {kind} subspace",
                        )
            ax.axhline(
                rows[0]["chance_projection"], color="grey", lw=1, ls=":", label="random direction"
            )
            chosen = rows[0].get("direction_block")
            if chosen not in ("", None):
                ax.axvline(chosen, color="red", lw=1, alpha=0.6, label="direction's block")
            ax.set_ylabel("‖U_rᵀ r̂‖")
            ax.set_ylim(0, 1.02)
            ax.set_title("refusal direction in each writer's top-r subspace", fontsize=9)
        elif panel == "jaccard":
            ax.plot(blocks, [r["jaccard"] for r in rows], marker="o", label="safety vs utility")
            if "jaccard_chance" in rows[0]:
                ax.plot(
                    blocks, [r["jaccard_chance"] for r in rows], ":", c="grey", label="random sets"
                )
            ax.set_ylabel("Jaccard index")
            ax.set_ylim(0, 1.02)
            ax.set_title("top safety vs top utility weights (mean over the block)", fontsize=9)
        else:
            ax.plot(blocks, [r["probe_max"] for r in rows], marker="o", label="best head")
            ax.plot(blocks, [r["probe_mean"] for r in rows], "--", marker=".", label="mean head")
            ax.axhline(0.5, color="grey", lw=1, ls=":", label="chance")
            ax.set_ylabel("probe accuracy")
            ax.set_ylim(0.4, 1.02)
            ax.set_title("head probes, harmful vs harmless (held out)", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("decoder block")
    axes[-1].set_xticks(blocks[:: max(1, len(blocks) // 16)])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
