"""Artefacts between stages: statistics and masks as safetensors, and the edits a mask makes.

Files are written atomically (a temporary file in the same folder, then a rename), so an
interrupted run never leaves a file that looks complete. Each file's metadata records the
format, the pyattr version, the model identifier, a fingerprint of the data set and the options
given; loading with ``model=`` checks that every layer exists there with the same shape.
Masks are stored bit-packed (8 entries per byte).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .calibrate import Stats
from .covariance import CovarianceStats
from .data import Example
from .models import LinearLayer, find_linear_layers
from .ops.selection import pack_bits

__all__ = [
    "Mask",
    "atomic_write",
    "fingerprint",
    "load_mask",
    "load_stats",
    "prune",
    "restore",
    "save_mask",
    "save_stats",
    "weight_digest",
]

_STATS_FORMAT, _MASK_FORMAT = "pyattr.stats/1", "pyattr.mask/1"


def fingerprint(examples: Iterable[Example]) -> str:
    """A short hash of a data set's prompts and responses."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.prompt.encode())
        h.update(b"\0")
        h.update(ex.response.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def weight_digest(w: torch.Tensor) -> str:
    """Shape, dtype, sum and absolute sum of a tensor: tells whether a weight is still the one
    something was computed from (one read, no copy). Meta tensors digest their shape only."""
    blob = f"{tuple(w.shape)}{w.dtype}".encode()
    if w.device.type != "meta":
        with torch.no_grad():
            sums = torch.stack(
                [torch.sum(w, dtype=torch.float64), w.abs().sum(dtype=torch.float64)]
            )
        blob += sums.cpu().numpy().tobytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def _atomic(path: str | Path, write) -> Path:
    """``write(temporary path)``, then rename it to ``path``; nothing is left on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600: give it the mode any tool's file has
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write a file atomically (a temporary file in the same folder, then a rename)."""
    blob = data.encode() if isinstance(data, str) else data
    return _atomic(path, lambda tmp: Path(tmp).write_bytes(blob))


def _atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict) -> Path:
    payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in metadata.items()}

    def write(tmp: str) -> None:
        save_file(payload, tmp, metadata=meta)
        _sort_header(tmp)

    return _atomic(path, write)


def _sort_header(path: str) -> None:
    """Rewrite a safetensors header with its keys sorted, in place and at the same length:
    safetensors writes the metadata in hash-map order, which differs from run to run, so the
    same statistics would otherwise never give the same bytes twice."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        blob = text.encode()
        if len(blob) > length:  # cannot happen for the same content; never corrupt a file
            return
        f.seek(8)
        f.write(blob + b" " * (length - len(blob)))


def _version() -> str:
    from . import __version__

    return __version__


def _read(path: str | Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for a foreign file
        message = f"{path} is not a {expected_format} file (not safetensors: {exc})"
        raise ValueError(message) from None
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != expected_format:
            raise ValueError(
                f"{path} is not a {expected_format} file (format: {meta.get('format')!r})"
            )
        # safe_open handles are not iterable: keys() is their API.
        return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118


def _check_fits(path, shapes: dict[str, tuple[int, int]], model: nn.Module) -> None:
    layers = {layer.name: layer for layer in find_linear_layers(model)}
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
        "format": _STATS_FORMAT,
        "pyattr": _version(),
        "model": model_id,
        "data": data,
        "samples": stats.samples,
        "tokens": stats.tokens,
        "layer_group": json.dumps(stats.layer_group),
        "n": json.dumps(counts),
        "shapes": json.dumps(shapes),
        "options": json.dumps(options or {}),
    }
    return _atomic_save(tensors, path, meta)


def load_stats(path: str | Path, *, model: nn.Module | None = None) -> Stats:
    """Read statistics; with ``model``, check they were made for a model of its shapes."""
    tensors, meta = _read(path, _STATS_FORMAT)
    layer_group, counts = json.loads(meta["layer_group"]), json.loads(meta["n"])
    shapes = {name: tuple(shape) for name, shape in json.loads(meta["shapes"]).items()}
    if model is not None:
        _check_fits(path, shapes, model)
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
        "format": _MASK_FORMAT,
        "pyattr": _version(),
        "model": model_id,
        "shapes": json.dumps(shapes),
        "sparsity": json.dumps(mask.sparsity()),
        "options": json.dumps(options or {}),
    }
    return _atomic_save(tensors, path, meta)


def load_mask(path: str | Path, *, model: nn.Module | None = None) -> Mask:
    """Read a mask; with ``model``, check it fits that model's layers."""
    tensors, meta = _read(path, _MASK_FORMAT)
    shapes = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
    if model is not None:
        _check_fits(path, shapes, model)
    bits = torch.arange(8, dtype=torch.uint8)
    masks = {}
    for name, packed in tensors.items():
        d_out, d_in = shapes[name]
        unpacked = (packed[:, :, None] >> bits) & 1
        masks[name] = unpacked.reshape(d_out, -1)[:, :d_in].bool()
    return Mask(masks)


def _layers_for(model: nn.Module, mask: Mask) -> dict[str, LinearLayer]:
    layers = {layer.name: layer for layer in find_linear_layers(model)}
    for name, m in mask.masks.items():
        layer = layers.get(name)
        if layer is None:
            raise ValueError(f"the mask names layer {name!r}, which {type(model).__name__} lacks")
        if tuple(m.shape) != (layer.d_out, layer.d_in):
            raise ValueError(
                f"mask for {name} is {tuple(m.shape)}, the weight is {(layer.d_out, layer.d_in)}"
            )
    return layers


@torch.no_grad()
def prune(model: nn.Module, mask: Mask) -> None:
    """Set the masked weights to zero, in place (dtype and device kept)."""
    layers = _layers_for(model, mask)
    for name, m in mask.masks.items():
        w = layers[name].weight
        w.masked_fill_(m.to(w.device), 0)


@torch.no_grad()
def restore(model: nn.Module, source: nn.Module, mask: Mask) -> None:
    """Copy the masked weights from ``source`` (a base or original model) into ``model``, in
    place: rewinding and "recover from base"."""
    layers = _layers_for(model, mask)
    src = _layers_for(source, mask)
    for name, m in mask.masks.items():
        w, s = layers[name].weight, src[name].weight
        m = m.to(w.device)
        w.copy_(torch.where(m, s.to(device=w.device, dtype=w.dtype), w))
