"""Edits a mask makes to a model: zero the region (pruning) or copy it from another model
(rewinding, "recover from base"). In place; dtype and device kept. One layer at a time through
``pyattr.offload``: weights offloaded by accelerate (CPU or disk) are edited on their execution
device and written back, and ``device`` runs the edit elsewhere than the weights live."""

from __future__ import annotations

import torch
from torch import nn

from .masks import Mask
from .models import LinearLayer, layers_by_name
from .offload import read, writable

__all__ = ["layers_for", "prune", "restore", "rewind"]


def layers_for(model: nn.Module, mask: Mask) -> dict[str, LinearLayer]:
    """The model's layers by name, after checking that every layer the mask names is there with
    the mask's shape."""
    layers = layers_by_name(model)
    for name, m in mask.masks.items():
        layer = layers.get(name)
        if layer is None:
            raise ValueError(f"the mask names layer {name!r}, which {type(model).__name__} lacks")
        if tuple(m.shape) != (layer.d_out, layer.d_in):
            raise ValueError(
                f"mask for {name} is {tuple(m.shape)}, the weight is {(layer.d_out, layer.d_in)}"
            )
    return layers


Device = torch.device | str | None


@torch.no_grad()
def prune(model: nn.Module, mask: Mask, *, device: Device = None) -> None:
    """Set the masked weights to zero, in place (dtype and device kept). ``device``: where the
    edit runs (default: where each layer computes)."""
    layers = layers_for(model, mask)
    for name, m in mask.masks.items():
        with writable(layers[name], device, model=model) as w:
            w.masked_fill_(m.to(w.device), 0)


@torch.no_grad()
def rewind(
    model: nn.Module,
    source: nn.Module,
    mask: Mask,
    *,
    device: Device = None,
) -> None:
    """Copy the masked weights from ``source`` (a base or original model, resident or
    offloaded) into ``model``, in place: rewinding and "recover from base"."""
    layers = layers_for(model, mask)
    src = layers_for(source, mask)
    for name, m in mask.masks.items():
        with writable(layers[name], device, model=model) as w:
            s = read(src[name], w.device)
            w.copy_(torch.where(m.to(w.device), s.to(w.dtype), w))


restore = rewind  # the earlier name of ``rewind``
