"""Sequential editing, as the released code prunes: block by block, top-down, each block's
statistics taken from the model whose earlier blocks are already edited.

pyattr's default is one pass (every block's statistics from the unedited model), the paper's
definition. The released code instead runs the calibration set through the model a block at a
time and prunes (or projects, for ActSVD) each block before its outputs feed the next, so a
block's scores see the edits above it; its masks differ from one-pass masks in 38–55% of the
selected entries of every block after the first. This module is that mode, through the
layer-by-layer runner (``calibrate(..., layerwise=True, after_block=...)``): one forward of
each block for its statistics and one, after the edit, for the next block's inputs.

Statistics from forward passes only: Wanda (norms) and magnitude regions, ActSVD
(covariance). SNIP needs a backward pass through the whole model per sample and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .masks import Mask, region
from .models import LinearLayer, find_linear_layers

__all__ = ["sequential_actsvd", "sequential_region"]


def _layers(model: nn.Module, layers: Sequence[LinearLayer] | None) -> list[LinearLayer]:
    return list(layers) if layers is not None else find_linear_layers(model)


def _blockwise(model, tokenizer, examples, collect, layers, edit, device, progress, options):
    """One layer-by-layer calibration whose ``edit(block, stats)`` runs before each block's
    outputs move on."""
    from .calibrate import calibrate

    calibrate(
        model,
        tokenizer,
        examples,
        collect=collect,
        layers=layers,
        layerwise=True,
        device=device,
        after_block=edit,
        progress=progress,
        **options,
    )


def sequential_region(
    model: nn.Module,
    tokenizer,
    examples,
    *,
    score: str = "wanda",
    q: float,
    largest: bool = True,
    granularity: Literal["row", "matrix"] = "row",
    layers: Sequence[LinearLayer] | None = None,
    prune: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    **calibrate_options,
) -> Mask:
    """The top-q (``largest=False``: bottom-q) region of every layer by ``score``, found block
    by block with each block pruned (``prune``) before the next block's statistics are taken;
    the model is left pruned. Returns the mask. ``calibrate_options``: ``calibrate``'s
    (batch_size, max_length, eos, count, system_prompt, ...)."""
    from . import scores
    from .edit import prune as zero

    method = scores.get(score)
    if method.collect not in (None, "norms"):
        raise ValueError(
            f"the {score} score needs {method.collect!r}, which takes a backward pass through "
            "the whole model: sequential mode runs one block at a time (wanda, magnitude)"
        )
    chosen = _layers(model, layers)
    masks: dict[str, torch.Tensor] = {}

    def edit(block: int, stats) -> None:
        mine = [layer for layer in chosen if layer.block == block]
        found, _ = region(
            model, stats, score=score, q=q, largest=largest, granularity=granularity, layers=mine
        )
        if prune:
            zero(model, found)
        masks.update({name: m.cpu() for name, m in found.masks.items()})

    _blockwise(
        model, tokenizer, examples, ("norms",), chosen, edit, device, progress, calibrate_options
    )
    return Mask({layer.name: masks[layer.name] for layer in chosen})


def sequential_actsvd(
    model: nn.Module,
    tokenizer,
    examples,
    *,
    mode: Literal["remove", "keep"] = "remove",
    r,
    layers: Sequence[LinearLayer] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **calibrate_options,
):
    """ActSVD block by block: each block's eigenbases from the covariance of the model whose
    earlier blocks are already projected, its top ``r`` safety ranks removed (or kept only)
    before the next block runs; in place. Returns the ``RankEdit`` of all layers."""
    from .lowrank import RankEdit, edit_ranks, eigenbases

    chosen = _layers(model, layers)
    done: dict[str, dict[str, int]] = {}

    def edit(block: int, stats) -> None:
        mine = [layer for layer in chosen if layer.block == block]
        bases = eigenbases(model, stats, layers=mine, progress=False)
        report = edit_ranks(model, mode, bases, r=r, layers=[layer.name for layer in mine])
        done.update(report.layers)

    collect = ("norms", "covariance")
    _blockwise(
        model, tokenizer, examples, collect, chosen, edit, device, progress, calibrate_options
    )
    return RankEdit({layer.name: done[layer.name] for layer in chosen})
