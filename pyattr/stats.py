"""Calibration statistics of one data set (``Stats``) and their files.

What ``pyattr.calibrate`` returns and every later stage reads: per input group n, Σx² and
optionally Σxxᵀ (Wanda's norms, ActSVD's covariance), per layer the SNIP sums. Saved as
safetensors (``pyattr.stats/1``) with the model, data fingerprint, counts and options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .covariance import CovarianceStats
from .io import load_tensors, save_tensors
from .models import layers_by_name

__all__ = ["Stats", "check_fits", "load_stats", "save_stats"]

FORMAT = "pyattr.stats/1"


@dataclass
class Stats:
    """Calibration statistics of one data set.

    groups: per input group (keyed by the group's first layer), the accumulated n, Σx² and
    optionally Σxxᵀ. layer_group: layer name → group key. shapes: layer name → (d_out, d_in).
    grad_abs: layer name → Σ_b |∂L_b/∂W| as (d_out, d_in) fp32 (SNIP). grad_sum: layer name →
    Σ_b ∂L_b/∂W, the signed sum (signed SNIP). samples/tokens: what was counted.
    """

    groups: dict[str, CovarianceStats]
    layer_group: dict[str, str]
    shapes: dict[str, tuple[int, int]]
    grad_abs: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0

    def layers(self) -> list[str]:
        return list(self.layer_group)

    def _group(self, layer: str) -> CovarianceStats:
        if layer not in self.layer_group:
            raise KeyError(f"no statistics for layer {layer!r}; layers: {self.layers()[:4]}...")
        return self.groups[self.layer_group[layer]]

    def sq_norms(self, layer: str) -> torch.Tensor:
        """Wanda's s (d_in,): mean of x² over the counted tokens of the layer's input."""
        return self._group(layer).sq_norms

    def covariance(self, layer: str) -> torch.Tensor:
        """Σ x xᵀ (d_in, d_in) of the layer's input (normalise with ``.n``)."""
        cov = self._group(layer).covariance
        if cov is None:
            raise ValueError(
                "covariance was not collected: calibrate(..., collect=(..., 'covariance'))"
            )
        return cov

    def grad(self, layer: str) -> torch.Tensor:
        """SNIP's Σ_b |∂L_b/∂W| (d_out, d_in) for the layer."""
        if layer not in self.grad_abs:
            raise ValueError(
                f"no SNIP statistics for {layer!r}: calibrate(..., collect=(..., 'snip'))"
            )
        return self.grad_abs[layer]

    def signed_grad(self, layer: str) -> torch.Tensor:
        """Σ_b ∂L_b/∂W (d_out, d_in) for the layer: the gradient of the summed loss."""
        if layer not in self.grad_sum:
            raise ValueError(
                f"no summed gradients for {layer!r}: calibrate(..., collect=(..., 'grad_sum'))"
            )
        return self.grad_sum[layer]


def check_fits(path, shapes: dict[str, tuple[int, int]], model: nn.Module) -> None:
    """Refuse a file made for another model: every layer it names must exist in ``model``
    with the same shape."""
    layers = layers_by_name(model)
    for name, (d_out, d_in) in shapes.items():
        layer = layers.get(name)
        if layer is None:
            raise ValueError(
                f"{path} was made for another model: it has layer {name!r}, which "
                f"{type(model).__name__} lacks"
            )
        if (layer.d_out, layer.d_in) != (d_out, d_in):
            raise ValueError(
                f"{path} was made for another model: {name} is {d_out} x {d_in} "
                f"there but {layer.d_out} x {layer.d_in} here"
            )


def save_stats(
    stats: Stats,
    path: str | Path,
    *,
    model_id: str = "",
    data: str = "",
    options: dict | None = None,
) -> Path:
    """Write ``stats`` to ``path`` (safetensors). data: a fingerprint of the data set."""
    tensors, counts = {}, {}
    for key, group in stats.groups.items():
        tensors[f"sum_sq/{key}"] = group.sum_sq
        if group.covariance is not None:
            tensors[f"covariance/{key}"] = group.covariance
        counts[key] = group.n
    for name, g in stats.grad_abs.items():
        tensors[f"grad_abs/{name}"] = g
    for name, g in stats.grad_sum.items():
        tensors[f"grad_sum/{name}"] = g
    shapes = {name: list(shape) for name, shape in stats.shapes.items()}
    meta = {
        "model": model_id,
        "data": data,
        "samples": stats.samples,
        "tokens": stats.tokens,
        "layer_group": json.dumps(stats.layer_group),
        "n": json.dumps(counts),
        "shapes": json.dumps(shapes),
        "options": json.dumps(options or {}),
    }
    return save_tensors(tensors, path, format=FORMAT, metadata=meta)


def load_stats(path: str | Path, *, model: nn.Module | None = None) -> Stats:
    """Read statistics; with ``model``, check they were made for a model of its shapes."""
    tensors, meta = load_tensors(path, FORMAT)
    layer_group, counts = json.loads(meta["layer_group"]), json.loads(meta["n"])
    shapes = {name: tuple(shape) for name, shape in json.loads(meta["shapes"]).items()}
    if model is not None:
        check_fits(path, shapes, model)
    groups = {
        key: CovarianceStats(
            n=int(n), sum_sq=tensors[f"sum_sq/{key}"], covariance=tensors.get(f"covariance/{key}")
        )
        for key, n in counts.items()
    }

    def grads(kind: str) -> dict[str, torch.Tensor]:
        return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{kind}/")}

    return Stats(
        groups=groups,
        layer_group=layer_group,
        shapes=shapes,
        grad_abs=grads("grad_abs"),
        grad_sum=grads("grad_sum"),
        samples=int(meta["samples"]),
        tokens=int(meta["tokens"]),
    )
