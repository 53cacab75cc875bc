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
from .io import load_tensors, meta_value, save_tensors, tensor_of
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
    architecture: the model's class (``LlamaForCausalLM``), checked when the file is loaded
    for a model.
    """

    groups: dict[str, CovarianceStats]
    layer_group: dict[str, str]
    shapes: dict[str, tuple[int, int]]
    grad_abs: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0
    architecture: str = ""

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
                "covariance was not collected: calibrate(..., collect=(..., 'covariance')), "
                "on the command line `pyattr calibrate --collect norms covariance`"
            )
        return cov

    def grad(self, layer: str) -> torch.Tensor:
        """SNIP's Σ_b |∂L_b/∂W| (d_out, d_in) for the layer."""
        return _gradients(self.grad_abs, layer, "SNIP statistics", "snip")

    def signed_grad(self, layer: str) -> torch.Tensor:
        """Σ_b ∂L_b/∂W (d_out, d_in) for the layer: the gradient of the summed loss."""
        return _gradients(self.grad_sum, layer, "summed gradients", "grad_sum")


def _gradients(sums: dict[str, torch.Tensor], layer: str, what: str, collect: str):
    """One layer's gradient sums, or an error naming how to collect them."""
    if layer not in sums:
        raise ValueError(
            f"no {what} for {layer!r}: calibrate(..., collect=(..., {collect!r})), on the "
            f"command line `pyattr calibrate --collect norms {collect}`"
        )
    return sums[layer]


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
        "architecture": stats.architecture,
        "layer_group": json.dumps(stats.layer_group),
        "n": json.dumps(counts),
        "shapes": json.dumps(shapes),
        "options": json.dumps(options or {}),
    }
    return save_tensors(tensors, path, format=FORMAT, metadata=meta)


def load_stats(
    path: str | Path, *, model: nn.Module | None = None, allow_other_model: bool = False
) -> Stats:
    """Read statistics; with ``model``, check they were made for a model of its class and
    shapes (``allow_other_model=True`` skips the class check: statistics of another model
    with the same shapes, on purpose). Every key and tensor is validated."""
    tensors, meta = load_tensors(path, FORMAT)
    layer_group = meta_value(path, meta, "layer_group", dict)
    counts = meta_value(path, meta, "n", dict)
    raw_shapes = meta_value(path, meta, "shapes", dict)
    shapes = {}
    for name, shape in raw_shapes.items():
        if not (
            isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) for v in shape)
        ):
            raise ValueError(
                f"{path}: metadata 'shapes' has {shape!r} for {name}, not [d_out, d_in]"
            )
        shapes[name] = tuple(shape)
    architecture = meta.get("architecture", "")
    if model is not None:
        here = type(model).__name__
        if architecture and architecture != here and not allow_other_model:
            raise ValueError(
                f"{path} was made for another model: a {architecture}, this model is a "
                f"{here}; pass allow_other_model=True (--allow-other-model) if you mean it"
            )
        check_fits(path, shapes, model)
    groups = {}
    for key, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{path}: metadata 'n' has {n!r} for {key}, not a count")
        covariance = tensors.get(f"covariance/{key}")
        if covariance is not None:
            covariance = tensor_of(path, tensors, f"covariance/{key}")
        groups[key] = CovarianceStats(
            n=n, sum_sq=tensor_of(path, tensors, f"sum_sq/{key}"), covariance=covariance
        )
    missing = sorted(set(layer_group.values()) - set(groups))
    if missing:
        raise ValueError(f"{path}: layers refer to group {missing[0]!r}, which has no statistics")

    def grads(kind: str) -> dict[str, torch.Tensor]:
        keys = [k for k in tensors if k.startswith(f"{kind}/")]
        return {k.split("/", 1)[1]: tensor_of(path, tensors, k) for k in keys}

    return Stats(
        groups=groups,
        layer_group=layer_group,
        shapes=shapes,
        grad_abs=grads("grad_abs"),
        grad_sum=grads("grad_sum"),
        samples=meta_value(path, meta, "samples", int),
        tokens=meta_value(path, meta, "tokens", int),
        architecture=architecture,
    )
