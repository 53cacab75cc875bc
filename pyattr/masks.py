"""Masks: a bool (d_out, d_in) mask per weight matrix (``Mask``), its files (bit-packed), the
paper's regions over every linear layer (top, bottom and set difference) and a random control
of the same size.

Each layer's mask comes from the selection ops (``pyattr.selection``) on that layer's weight and
statistics; nothing here depends on the backend. GPT-2's transposed Conv1D weights are scored
as (d_out, d_in) like any other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import scores
from .io import load_tensors, meta_value, save_tensors, tensor_of
from .models import LinearLayer, find_linear_layers
from .offload import read
from .ops.selection import pack_bits
from .selection import SetDifference, set_difference_mask, topk_mask
from .stats import Stats, check_fits

__all__ = ["Mask", "load_mask", "random_like", "region", "save_mask"]

FORMAT = "pyattr.mask/1"


@dataclass
class Mask:
    """Per weight matrix, a bool (d_out, d_in) mask of the selected entries."""

    masks: dict[str, torch.Tensor]

    def sparsity(self) -> dict[str, float]:
        """Fraction of entries selected, per layer and ``"overall"``."""
        out = {name: float(m.float().mean()) for name, m in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        out["overall"] = sum(int(m.sum()) for m in self.masks.values()) / total if total else 0.0
        return out


def save_mask(
    mask: Mask, path: str | Path, *, model_id: str = "", options: dict | None = None
) -> Path:
    """Write ``mask`` bit-packed, with its shapes and achieved sparsity in the metadata."""
    tensors = {name: pack_bits(m.cpu()) for name, m in mask.masks.items()}
    shapes = {name: list(m.shape) for name, m in mask.masks.items()}
    meta = {
        "model": model_id,
        "shapes": json.dumps(shapes),
        "sparsity": json.dumps(mask.sparsity()),
        "options": json.dumps(options or {}),
    }
    return save_tensors(tensors, path, format=FORMAT, metadata=meta)


def load_mask(path: str | Path, *, model: nn.Module | None = None) -> Mask:
    """Read a mask; with ``model``, check it fits that model's layers."""
    tensors, meta = load_tensors(path, FORMAT)
    shapes = {k: tuple(v) for k, v in meta_value(path, meta, "shapes", dict).items()}
    if model is not None:
        check_fits(path, shapes, model)
    bits = torch.arange(8, dtype=torch.uint8)
    masks = {}
    for name, shape in shapes.items():
        packed = tensor_of(path, tensors, name)
        d_out, d_in = shape
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (d_out, (d_in + 7) // 8):
            raise ValueError(
                f"{path}: {name} is {packed.dtype} {tuple(packed.shape)}, not the packed "
                f"uint8 ({d_out}, {(d_in + 7) // 8}) of a {d_out} x {d_in} mask"
            )
        unpacked = (packed[:, :, None] >> bits) & 1
        masks[name] = unpacked.reshape(d_out, -1)[:, :d_in].bool()
    return Mask(masks)


def _weight(layer: LinearLayer) -> torch.Tensor:
    w = read(layer)
    return w if w.stride(1) == 1 else w.contiguous()


def region(
    model: nn.Module,
    safety: Stats | None,
    utility: Stats | None = None,
    *,
    score: str = "wanda",
    q: float,
    p: float | None = None,
    granularity: Literal["row", "matrix"] = "row",
    largest: bool = True,
    layers: Sequence[LinearLayer] | None = None,
    method: str | None = None,
) -> tuple[Mask, dict[str, SetDifference]]:
    """The region of every layer, and per layer the sizes for the Jaccard index.

    With ``utility`` and ``p``: the set difference top_q(safety) \\ top_p(utility) (the paper's
    safety-critical region). Without: the top-q safety entries (``largest=False``: the bottom
    q). The second value is empty unless a set difference was taken. ``score``: any method in
    ``pyattr.scores.names()`` ("wanda", "snip", "snip_signed", "magnitude", ...); a method
    that needs no data ("magnitude") takes ``safety=None``. ``method``: the old name of
    ``score``, still accepted.
    """
    if (utility is None) != (p is None):
        raise ValueError("give both utility and p for a set difference, or neither")
    if method is not None:
        score = method
    scores.get(score)
    layers = list(layers) if layers is not None else find_linear_layers(model)
    masks, counts = {}, {}
    for layer in layers:
        w = _weight(layer)
        shape = (layer.d_out, layer.d_in)
        s = scores.statistic(score, safety, layer.name, shape).to(w.device)
        if utility is None:
            masks[layer.name] = topk_mask(
                w, s, fraction=q, largest=largest, granularity=granularity
            )
        else:
            u = scores.statistic(score, utility, layer.name, shape).to(w.device)
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
