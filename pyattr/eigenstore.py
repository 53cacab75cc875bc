"""Streamed eigenbases: one layer at a time, to disk as it finishes, read back lazily.

``eigenbases`` keeps every layer's eigenvectors in memory: d_out·R·8 bytes per layer in fp64,
about 45 GB per data set for a 7B model and several hundred for 70B. ``stream_eigenbases``
computes one layer's basis on the layer's device, writes it to its own safetensors file
(atomically) and drops it before the next, so the host holds at most one layer's basis (plus
the write's copy of it) above the model and its statistics. The eigenvectors are stored
transposed, row k the k-th eigenvector, so the leading k an edit needs are a contiguous
prefix of the file: ``EigenStore[name].top(k)`` reads only those through a memory map.

Dtype: float64 by default on the CPU, float32 on a GPU (4–10x faster there); the error of
float32 against float64 is measured by ``benchmarks.gpu`` (``eigen-routes``). An index
(``index.json``, written last) lists the layers; a folder without it is an interrupted run and
is refused. Edits take an ``EigenStore`` wherever they take a dict of eigenbases.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .io import atomic_write, save_tensors
from .models import LinearLayer, find_linear_layers
from .offload import read
from .stats import Stats

__all__ = ["EigenStore", "LazyEigenbasis", "stream_eigenbases"]

FORMAT = "pyattr.eigen-layer/1"
INDEX = "index.json"


class LazyEigenbasis:
    """One layer's eigenbasis on disk. ``values`` (R,) is read at once (small); ``top(k)``
    reads the leading k eigenvectors only, as (d_out, k)."""

    def __init__(self, path: Path, entry: dict) -> None:
        from safetensors import safe_open

        self.path, self.rank, self.digest = path, int(entry["rank"]), entry["digest"]
        self.kept, self.d_out = int(entry["kept"]), int(entry["d_out"])
        with safe_open(str(path), framework="pt") as f:
            self.values = f.get_tensor("values")

    def top(self, k: int, *, what: str = "rank") -> torch.Tensor:
        from safetensors import safe_open

        from .lowrank import check_top

        check_top(k, self.rank, self.kept, what)
        with safe_open(str(self.path), framework="pt") as f:
            rows = f.get_slice("vectors_t")[:k]  # only these rows are read
        return rows.T

    @property
    def vectors(self) -> torch.Tensor:
        """Every kept eigenvector (d_out, kept): the whole file's worth."""
        return self.top(self.kept)


class EigenStore(Mapping):
    """The eigenbases ``stream_eigenbases`` wrote, by layer name, each loaded when asked for."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if not index.is_file():
            raise FileNotFoundError(
                f"{self.folder} has no {INDEX}: not streamed eigenbases, or an interrupted run "
                "(compute them again)"
            )
        payload = json.loads(index.read_text(encoding="utf-8"))
        if payload.get("format") != "pyattr.eigen-store/1":
            raise ValueError(f"{index} is not an index of streamed eigenbases")
        self.layers: dict[str, dict] = payload["layers"]
        self.settings: dict = payload.get("settings", {})

    def __getitem__(self, name: str) -> LazyEigenbasis:
        entry = self.layers[name]
        return LazyEigenbasis(self.folder / entry["file"], entry)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def _file_name(index: int, name: str) -> str:
    return f"{index:04d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"


def stream_eigenbases(
    model: nn.Module,
    stats: Stats,
    folder: str | Path,
    *,
    layers: Sequence[LinearLayer] | None = None,
    keep: int | None = None,
    dtype: torch.dtype | None = None,
    route: str = "auto",
    progress: bool = True,
) -> EigenStore:
    """Every layer's eigenbasis (``pyattr.lowrank.eigenbasis``) computed on its weight's device,
    written to ``folder`` one file per layer as it finishes, then freed; returns the lazy
    store. ``keep``: eigenvectors kept per layer (all R by default); ``dtype``: float64 on the
    CPU, float32 on a GPU unless given."""
    from tqdm.auto import tqdm

    from .lowrank import _covariance_for, eigenbasis

    folder = Path(folder)
    (folder / INDEX).unlink(missing_ok=True)  # the old index goes first: no stale mix
    chosen = list(layers) if layers is not None else find_linear_layers(model)
    entries: dict[str, dict] = {}
    bar = tqdm(chosen, desc="eigenbases (streamed)", unit="layer", disable=not progress)
    for index, layer in enumerate(bar):
        covariance, n = _covariance_for(stats, layer)
        w = read(layer)
        kind = dtype or (torch.float32 if w.device.type == "cuda" else torch.float64)
        basis = eigenbasis(
            w,
            covariance,
            n,
            keep=None if keep is None else min(keep, layer.d_out, layer.d_in),
            dtype=kind,
            name=layer.name,
            route=route,
        )
        file = _file_name(index, layer.name)
        tensors = {"values": basis.values, "vectors_t": basis.vectors.T}
        save_tensors(tensors, folder / file, format=FORMAT, metadata={"layer": layer.name})
        entries[layer.name] = {
            "file": file,
            "rank": basis.rank,
            "kept": basis.kept,
            "d_out": layer.d_out,
            "digest": basis.digest,
            "dtype": str(kind).removeprefix("torch."),
        }
        del basis, tensors, covariance
    payload = {
        "format": "pyattr.eigen-store/1",
        "layers": entries,
        "settings": {"keep": keep, "route": route, "samples": stats.samples},
    }
    atomic_write(folder / INDEX, json.dumps(payload, indent=1) + "\n")
    return EigenStore(folder)
