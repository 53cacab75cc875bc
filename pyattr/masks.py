"""Whole-model regions from calibration statistics: the paper's top, bottom and set-difference
regions over every linear layer, and a random control of the same size.

Each layer's mask comes from the selection ops (``pyattr.selection``) on that layer's weight and
statistics; nothing here depends on the backend. GPT-2's transposed Conv1D weights are scored
as (d_out, d_in) like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from . import scoring
from .artifacts import Mask
from .calibrate import Stats
from .models import LinearLayer, find_linear_layers
from .selection import SetDifference, set_difference_mask, topk_mask

__all__ = ["random_like", "region"]


def _weight(layer: LinearLayer) -> torch.Tensor:
    w = layer.weight.detach()
    return w if w.stride(1) == 1 else w.contiguous()


def region(
    model: nn.Module,
    safety: Stats | None,
    utility: Stats | None = None,
    *,
    method: str = "wanda",
    q: float,
    p: float | None = None,
    granularity: Literal["row", "matrix"] = "row",
    largest: bool = True,
    layers: Sequence[LinearLayer] | None = None,
) -> tuple[Mask, dict[str, SetDifference]]:
    """The region of every layer, and per layer the sizes for the Jaccard index.

    With ``utility`` and ``p``: the set difference top_q(safety) \\ top_p(utility) (the paper's
    safety-critical region). Without: the top-q safety entries (``largest=False``: the bottom
    q). The second value is empty unless a set difference was taken. ``method``: any name in
    ``pyattr.scoring.names()`` ("wanda", "snip", "snip_signed", "magnitude", ...); a method
    that needs no data ("magnitude") takes ``safety=None``.
    """
    if (utility is None) != (p is None):
        raise ValueError("give both utility and p for a set difference, or neither")
    scoring.get(method)
    layers = list(layers) if layers is not None else find_linear_layers(model)
    masks, counts = {}, {}
    for layer in layers:
        w = _weight(layer)
        shape = (layer.d_out, layer.d_in)
        s = scoring.statistic(method, safety, layer.name, shape).to(w.device)
        if utility is None:
            masks[layer.name] = topk_mask(
                w, s, fraction=q, largest=largest, granularity=granularity
            )
        else:
            u = scoring.statistic(method, utility, layer.name, shape).to(w.device)
            masks[layer.name], counts[layer.name] = set_difference_mask(
                w, s, u, q=q, p=p, granularity=granularity
            )
    return Mask(masks), counts


def random_like(mask: Mask, *, seed: int = 0) -> Mask:
    """A control region: per layer, as many entries as ``mask`` selects, uniformly at random."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in mask.masks.items():
        k = int(m.sum())
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=gen)[:k]] = True
        out[name] = flat.view(m.shape).to(m.device)
    return Mask(out)
