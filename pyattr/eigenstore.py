"""Streamed eigenbases: one layer at a time, to disk as it finishes, read back lazily.

``eigenbases`` keeps every layer's eigenvectors in memory: d_out·R·8 bytes per layer in fp64,
about 45 GB per data set for a 7B model and several hundred for 70B. ``stream_eigenbases``
computes one layer's basis on the layer's device, writes it to its own safetensors file
(atomically, straight from the tensor's memory) and drops it before the next; with the lean
route (``lean_eigenbasis``, the default) the host holds under twice one layer's basis above
the model and its statistics. The eigenvectors are stored
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

from ._version import __version__
from .io import atomic_write, weight_digest
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


CHUNK = 1024  # rows of W or C converted to the eigen dtype at a time by the lean route


@torch.no_grad()
def lean_eigenbasis(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    n: int,
    *,
    keep: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(values (R,), eigenvectors transposed (keep, d_out), R) of ``A = W (C/n) Wᵀ`` in little
    memory: neither W nor C is copied whole into ``dtype`` (chunks of ``CHUNK`` rows are), and
    no d_out × d_out or d_out × d_in work matrix is made beyond the output itself.

    d_out ≤ d_in: A is accumulated chunk by chunk of C's rows (and W's) and decomposed
    (``eigh``).
    d_out > d_in (gate/up): from C/n = F Fᵀ and the Gram matrix G = WᵀW (accumulated by row
    chunks), M = Fᵀ G F (d_in × d_in) has A's nonzero eigenvalues, and its eigenvectors Q map to
    A's as U = W F Q Σ^{-1}, written row chunk by row chunk into the output; directions of A's
    zero eigenvalues are an orthonormal completion (seeded), and one CholeskyQR pass keeps the
    rows orthonormal to rounding while every prefix spans the same leading subspace.

    Accuracy: both branches form the squared problem, as the direct route (``lowrank.
    eigenbasis(route="direct")``) does; the input route's SVD is more accurate for the bottom
    of the spectrum. Eigenvalues agree with it to rounding; leading eigenvectors up to sign."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"eigenbases are computed in float32 or float64, not {dtype}")
    d_out, d_in = weight.shape
    rank = min(d_out, d_in)
    keep = rank if keep is None else keep
    if not 0 <= keep <= rank:
        raise ValueError(f"keep={keep} is outside [0, R] = [0, {rank}]")
    device = weight.device
    if d_out <= d_in:
        w = weight.detach()
        a = torch.zeros(d_out, d_out, dtype=dtype, device=device)
        for k in range(0, d_in, CHUNK):  # A += W[:, K] (C[K, :] Wᵀ), Wᵀ's columns by chunks
            rows = covariance[k : k + CHUNK].to(device=device, dtype=dtype)
            part = torch.empty(rows.shape[0], d_out, dtype=dtype, device=device)
            for j in range(0, d_out, CHUNK):
                part[:, j : j + CHUNK] = rows @ w[j : j + CHUNK].to(dtype).T
            a.addmm_(w[:, k : k + CHUNK].to(dtype), part)
        del rows, part
        _trim()
        a.div_(n)
        values, vectors = torch.linalg.eigh(a)  # reads the lower triangle
        del a
        return values.flip(0)[:rank].contiguous(), vectors.flip(1)[:, :keep].T.contiguous(), rank
    lam, f = torch.linalg.eigh(covariance.to(device=device, dtype=dtype))
    f.mul_(lam.clamp(min=0).div(n).sqrt())  # C/n = F Fᵀ
    del lam
    g = torch.zeros(d_in, d_in, dtype=dtype, device=device)
    for k in range(0, d_out, CHUNK):
        rows = weight[k : k + CHUNK].detach().to(dtype)
        g.addmm_(rows.T, rows)
    del rows
    _trim()
    gf = g @ f
    del g
    m = f.T @ gf
    del gf
    sigma2, q = torch.linalg.eigh(m)
    del m
    sigma2, q = sigma2.flip(0).clamp(min=0), q.flip(1)[:, :keep]
    t = f @ q
    del f, q
    top = sigma2[0] if sigma2.numel() else torch.zeros((), dtype=dtype)
    good = sigma2[:keep] > top * d_in * torch.finfo(dtype).eps
    t[:, good] /= sigma2[:keep][good].sqrt()
    out = torch.empty(keep, d_out, dtype=dtype, device=device)
    for k in range(0, d_out, CHUNK):
        out[:, k : k + CHUNK] = t.T @ weight[k : k + CHUNK].detach().to(dtype).T
    del t
    _trim()
    # A's null space (C of low rank): any orthonormal completion of the rows found, which are
    # a prefix (the eigenvalues descend), made a block of rows at a time against the rows above
    found = int(good.sum())
    gen = torch.Generator().manual_seed(seed)
    for start in range(found, keep, CHUNK // 4):
        rows = min(CHUNK // 4, keep - start)
        fill = torch.randn(rows, d_out, generator=gen, dtype=dtype).to(device)
        for _ in range(2):  # twice: orthogonal to rounding
            fill.addmm_(fill @ out[:start].T, out[:start], alpha=-1)
        out[start : start + rows] = torch.linalg.qr(fill.T).Q.T
        del fill
    _trim()
    if keep:  # CholeskyQR: out ← L⁻¹ out with L Lᵀ = out outᵀ (row k stays in rows ≤ k's span)
        gram = out @ out.T  # symmetric: its transpose is the same matrix, column-major
        torch.linalg.cholesky(gram.mT, out=gram.mT)  # in place (no copy): gram now holds Lᵀ
        for k in range(0, d_out, CHUNK):  # out[:, K] ← L⁻¹ out[:, K], as Xᵀ Lᵀ = out[:, K]ᵀ
            block = out[:, k : k + CHUNK].mT
            out[:, k : k + CHUNK] = torch.linalg.solve_triangular(
                gram, block, upper=True, left=False
            ).mT
        del gram
        _trim()
    return sigma2[:rank].contiguous(), out, rank


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; nothing elsewhere): the
    many mid-sized temporaries of a decomposition otherwise stay in the process's resident
    memory after they are freed."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _write_layer(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """A safetensors file written straight from the tensors' memory (``save_file`` makes a
    bytes copy of each first), keys and metadata sorted, atomically."""
    from .io import write_atomically

    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    names = sorted(tensors)
    arrays = {name: tensors[name].detach().contiguous().cpu() for name in names}
    for name in names:
        t = arrays[name]
        size = t.numel() * t.element_size()
        dtype = {torch.float64: "F64", torch.float32: "F32"}[t.dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name in names:
                f.write(memoryview(arrays[name].numpy()).cast("B"))

    write_atomically(path, write)


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
    route: str = "lean",
    progress: bool = True,
) -> EigenStore:
    """Every layer's eigenbasis computed on its weight's device, written to ``folder`` one
    file per layer as it finishes, then freed; returns the lazy store. ``keep``: eigenvectors
    kept per layer (all R by default); ``dtype``: float64 on the CPU, float32 on a GPU unless
    given. ``route``: "lean" (``lean_eigenbasis``: host memory under twice one layer's basis)
    or a route of ``pyattr.lowrank.eigenbasis`` ("auto", "direct", "input": the bases of
    ``pyattr.eigenbases`` bit for bit)."""
    from tqdm.auto import tqdm

    from .lowrank import _check_covariance, _covariance_for, eigenbasis

    folder = Path(folder)
    (folder / INDEX).unlink(missing_ok=True)  # the old index goes first: no stale mix
    chosen = list(layers) if layers is not None else find_linear_layers(model)
    entries: dict[str, dict] = {}
    bar = tqdm(chosen, desc="eigenbases (streamed)", unit="layer", disable=not progress)
    for index, layer in enumerate(bar):
        covariance, n = _covariance_for(stats, layer)
        w = read(layer)
        kind = dtype or (torch.float32 if w.device.type == "cuda" else torch.float64)
        kept = None if keep is None else min(keep, layer.d_out, layer.d_in)
        digest = weight_digest(w)  # first, while its temporary |W| is the only one
        if route == "lean":
            _check_covariance(layer.name, covariance, n, layer.d_in)
            values, vectors_t, rank = lean_eigenbasis(w, covariance, n, keep=kept, dtype=kind)
        else:
            basis = eigenbasis(
                w, covariance, n, keep=kept, dtype=kind, name=layer.name, route=route
            )
            values, vectors_t, rank = basis.values, basis.vectors.T, basis.rank
            del basis
        file = _file_name(index, layer.name)
        tensors = {"values": values, "vectors_t": vectors_t}
        metadata = {"format": FORMAT, "pyattr": __version__, "layer": layer.name}
        _write_layer(folder / file, tensors, metadata)
        entries[layer.name] = {
            "file": file,
            "rank": rank,
            "kept": vectors_t.shape[0],
            "d_out": layer.d_out,
            "digest": digest,
            "dtype": str(kind).removeprefix("torch."),
        }
        del values, vectors_t, tensors, covariance, w
        _trim()
    payload = {
        "format": "pyattr.eigen-store/1",
        "layers": entries,
        "settings": {"keep": keep, "route": route, "samples": stats.samples},
    }
    atomic_write(folder / INDEX, json.dumps(payload, indent=1) + "\n")
    return EigenStore(folder)
