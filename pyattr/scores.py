"""Score methods: one registry entry per way of scoring a weight's importance.

Every method scores ``S_ij = |W_ij| · a`` with a factor ``a`` read from the calibration
statistics, either per column (a (d_in,) vector, given to the selection ops as the squared
values s with a = √s) or per entry (W's shape). The kernels know only that structural flag;
this module maps a method's name to what it reads, so adding a method is one ``register`` call
(and its tests): the calibration, the regions, the sweep and the command line take their choices
from here.

    wanda        |W_ij| · ‖X_j‖₂          s = mean of x_j² over the counted tokens
    snip         |W_ij| · Σ_b |∂L_b/∂W_ij|  the paper's SNIP (absolute value per sample)
    snip_signed  |W_ij · Σ_b ∂L_b/∂W_ij|   gradients summed before the absolute value
    magnitude    |W_ij|                   no data: the baseline every data-aware score must beat
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ._registry import Registry

if TYPE_CHECKING:
    from .stats import Stats

__all__ = ["ScoreMethod", "get", "names", "register", "statistic"]


@dataclass(frozen=True)
class ScoreMethod:
    """How one method scores a layer's weights.

    collect: the statistic ``calibrate(collect=...)`` must gather (``None``: the method needs no
    data). per_entry: whether its factor has W's shape (else one value per input column).
    read: (stats, layer name, (d_out, d_in)) → the statistic in the selection ops' terms: the
    squared factor s (d_in,) per column, or the factor (d_out, d_in) per entry.
    """

    name: str
    collect: str | None
    per_entry: bool
    read: Callable[[Stats | None, str, tuple[int, int]], torch.Tensor]
    summary: str


_REGISTRY: Registry[ScoreMethod] = Registry("score method")
register, names, get = _REGISTRY.register, _REGISTRY.names, _REGISTRY.get


def statistic(name: str, stats: Stats | None, layer: str, shape: tuple[int, int]) -> torch.Tensor:
    """What the selection ops take for ``layer`` under method ``name``; checks that the
    statistics hold what the method needs before any selection runs."""
    method = get(name)
    if method.collect is not None and stats is None:
        raise ValueError(
            f"the {name} score needs calibration statistics with {method.collect!r} collected"
        )
    value = method.read(stats, layer, shape)
    want = shape if method.per_entry else (shape[1],)
    if tuple(value.shape) != tuple(want):
        raise ValueError(f"{name} read a {tuple(value.shape)} statistic for {layer}, want {want}")
    return value


register(
    ScoreMethod(
        "wanda",
        collect="norms",
        per_entry=False,
        read=lambda stats, layer, shape: stats.sq_norms(layer),
        summary="|W|·‖X‖₂ (Wanda)",
    )
)
register(
    ScoreMethod(
        "snip",
        collect="snip",
        per_entry=True,
        read=lambda stats, layer, shape: stats.grad(layer),
        summary="|W|·Σ_b|∂L_b/∂W| (SNIP, absolute value per sample)",
    )
)
register(
    ScoreMethod(
        "snip_signed",
        collect="grad_sum",
        per_entry=True,
        read=lambda stats, layer, shape: stats.signed_grad(layer).abs(),
        summary="|W·Σ_b ∂L_b/∂W| (SNIP on the summed gradient)",
    )
)
register(
    ScoreMethod(
        "magnitude",
        collect=None,
        per_entry=False,
        read=lambda stats, layer, shape: torch.ones(shape[1]),
        summary="|W| (no data)",
    )
)
