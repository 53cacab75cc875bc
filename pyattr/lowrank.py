"""The rank level (DESIGN.md, "ActSVD", "orthogonal projection", "subspace similarity").

For a layer with weight W (d_out × d_in) and input covariance C = Σ x xᵀ over n counted tokens,
``A = W (C/n) Wᵀ`` is the covariance of the layer's outputs; its eigenvectors U (eigenvalues
descending) are the right singular vectors of X Wᵀ, the data-aware directions of ActSVD. They
are computed once per layer and data set (``eigenbases``), cached as safetensors, and every rank
setting of a sweep is then a pair of thin products:

- remove the top r ranks: ``W ← W − U_r (U_rᵀ W)``; keep only the top r: ``W ← U_r (U_rᵀ W)``;
- orthogonal projection: ``ΔW = (I − Π_u) Π_s W`` with ``Π_s W = U_s (U_sᵀ W)`` and
  ``(I − Π_u) Y = Y − U_u (U_uᵀ Y)``, ``W ← W − ΔW``. In the paper's convention ``(r_u, r_s)``
  count the least important ranks each projection drops: ``Π_u`` keeps the top ``R − r_u``
  utility directions, ``Π_s`` the top ``R − r_s`` safety directions; ``keep_u``/``keep_s``
  give the kept counts directly.

No d_out × d_out identity or projector is formed. R is ``min(d_out, d_in)``, which is rank(W)
for every full-rank weight (all trained LLM weights); computing rank(W) exactly would cost an SVD
per layer for no change in practice. An eigenbasis keeps its leading ``keep`` eigenvectors (all R
by default; fewer saves memory when only small kept ranks are swept, and an edit that needs more
is refused by name).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .calibrate import Stats
from .counts import Amount, resolve
from .io import all_finite, load_tensors, meta_value, save_tensors, tensor_of, weight_digest
from .models import LinearLayer, find_linear_layers, layers_by_name
from .offload import read, writable

__all__ = [
    "Eigenbasis",
    "RankEdit",
    "edit_ranks",
    "eigenbasis",
    "eigenbases",
    "keep_top",
    "load_eigenbases",
    "orthogonal_projection",
    "remove_random",
    "remove_top",
    "save_eigenbases",
    "subspace_similarity",
    "weight_digest",
]

_FORMAT = "pyattr.eigen/1"


@dataclass
class Eigenbasis:
    """The eigendecomposition of one layer's ``A = W (C/n) Wᵀ``.

    values: the top R eigenvalues, descending; vectors: the leading ``k <= R`` eigenvectors as
    columns (d_out, k); rank: R = min(d_out, d_in); digest: ``weight_digest`` of the W used.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    rank: int
    digest: str

    @property
    def kept(self) -> int:
        return self.vectors.shape[1]

    @property
    def d_out(self) -> int:
        return self.vectors.shape[0]

    def top(self, k: int, *, what: str = "rank") -> torch.Tensor:
        """The leading k eigenvectors (d_out, k)."""
        check_top(k, self.rank, self.kept, what)
        return self.vectors[:, :k]


def check_top(k: int, rank: int, kept: int, what: str = "rank") -> None:
    """Refuse a count of leading eigenvectors outside [0, R] or beyond those kept."""
    if not 0 <= k <= rank:
        raise ValueError(f"{what} {k} is outside [0, R] = [0, {rank}]")
    if k > kept:
        raise ValueError(
            f"{what} {k} needs {k} eigenvectors but this eigenbasis keeps {kept}; "
            "compute it again with a larger keep="
        )


def _check_covariance(name: str, covariance: torch.Tensor, n: int, d_in: int) -> None:
    if tuple(covariance.shape) != (d_in, d_in):
        raise ValueError(
            f"{name}: the covariance is {tuple(covariance.shape)}, but the layer's input has "
            f"{d_in} features (statistics from another model?)"
        )
    if n <= 0:
        raise ValueError(f"{name}: no counted token reached this layer (n = {n})")
    if not all_finite(covariance):  # without copies of the matrix
        raise ValueError(f"{name}: the covariance has NaN or Inf entries (non-finite activations)")


@torch.no_grad()
def eigenbasis(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    n: int,
    *,
    keep: int | None = None,
    dtype: torch.dtype = torch.float64,
    name: str = "layer",
    route: Literal["auto", "direct", "input"] = "auto",
) -> Eigenbasis:
    """The eigenbasis of ``A = W (C/n) Wᵀ`` for one weight (d_out, d_in), on the weight's
    device, in ``dtype`` (float64 or float32).

    route: "direct" decomposes the d_out × d_out A; "input" works on the d_in side: with
    ``C/n = F Fᵀ`` (F = V Λ^½ from C's d_in × d_in eigendecomposition) and ``B = W F``,
    A = B Bᵀ, so A's eigenvectors are B's left singular vectors (a thin SVD, d_out × d_in) and
    its eigenvalues the squared singular values. "auto" takes "input" when d_out > d_in
    (gate/up projections: A has rank ≤ d_in, and the direct route spends (d_out/d_in)³ the
    work on its null space, besides holding d_out² entries). Both give the same eigenvalues
    and, where eigenvalues are distinct, the same eigenvectors up to sign; where A's
    eigenvalues are zero (C of low rank) each returns some orthonormal completion."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"eigenbases are computed in float32 or float64, not {dtype}")
    if route not in ("auto", "direct", "input"):
        raise ValueError(f"route must be 'auto', 'direct' or 'input', got {route!r}")
    d_out, d_in = weight.shape
    _check_covariance(name, covariance, n, d_in)
    rank = min(d_out, d_in)
    keep = rank if keep is None else keep
    if not 0 <= keep <= rank:
        raise ValueError(f"{name}: keep={keep} is outside [0, R] = [0, {rank}]")
    w = weight.detach().to(dtype)
    c = covariance.to(device=w.device, dtype=dtype) / n
    if route == "input" or (route == "auto" and d_out > d_in):
        values, vectors = _input_side(w, c, rank, keep)
    else:
        a = w @ c @ w.T
        a = (a + a.T) / 2  # exactly symmetric for eigh
        values, vectors = torch.linalg.eigh(a)
        values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :keep]
    return Eigenbasis(values.contiguous(), vectors.contiguous(), rank, weight_digest(weight))


def _input_side(
    w: torch.Tensor, c: torch.Tensor, rank: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``rank`` eigenvalues and ``keep`` eigenvectors of W C Wᵀ from d_in-sized
    problems (see ``eigenbasis``): A = B Bᵀ with B = W F, so A's eigenvectors are B's left
    singular vectors and its eigenvalues their squared singular values."""
    lam, v = torch.linalg.eigh((c + c.T) / 2)
    f = v * lam.clamp(min=0).sqrt()  # C = F Fᵀ
    u, sigma, _ = torch.linalg.svd(w @ f, full_matrices=False)  # thin: (d_out, min(d_out, d_in))
    return (sigma[:rank] ** 2), u[:, :keep]


def _covariance_for(stats: Stats, layer: LinearLayer) -> tuple[torch.Tensor, int]:
    if layer.name not in stats.layer_group:
        raise ValueError(
            f"no statistics for layer {layer.name!r} (statistics from another model?); they "
            f"cover {stats.layers()[:3]}..."
        )
    shape = stats.shapes.get(layer.name)
    if shape is not None and tuple(shape) != (layer.d_out, layer.d_in):
        raise ValueError(
            f"{layer.name}: the statistics were made for a {tuple(shape)} weight, this one is "
            f"{(layer.d_out, layer.d_in)} (statistics from another model?)"
        )
    return stats.covariance(layer.name), stats._group(layer.name).n


def eigenbases(
    model: nn.Module,
    stats: Stats,
    *,
    layers: Sequence[LinearLayer] | None = None,
    keep: int | None = None,
    dtype: torch.dtype = torch.float64,
    offload: bool = True,
    progress: bool = True,
    route: Literal["auto", "direct", "input"] = "auto",
) -> dict[str, Eigenbasis]:
    """The eigenbasis of every layer (or of ``layers``) from ``stats``' covariances.

    Each is computed on its weight's device and, with ``offload``, moved to the CPU as soon as
    it is done: the R leading eigenvectors of all layers take d_out·R·(4 or 8) bytes per layer,
    about as much as the model in fp32 (22 GB per data set for a 7B model); ``keep`` bounds
    them when only small kept ranks are swept (the edits move what they need back). ``route``:
    see ``eigenbasis`` (layers with d_out > d_in are decomposed on their input side by default).
    """
    from tqdm.auto import tqdm

    layers = list(layers) if layers is not None else find_linear_layers(model)
    out = {}
    for layer in tqdm(layers, desc="eigenbases", unit="layer", disable=not progress):
        covariance, n = _covariance_for(stats, layer)
        basis = eigenbasis(
            read(layer),
            covariance,
            n,
            keep=None if keep is None else min(keep, layer.d_out, layer.d_in),
            dtype=dtype,
            name=layer.name,
            route=route,
        )
        if offload:
            basis.values, basis.vectors = basis.values.cpu(), basis.vectors.cpu()
        out[layer.name] = basis
    return out


def save_eigenbases(
    bases: dict[str, Eigenbasis], path: str | Path, *, model_id: str = "", data: str = ""
) -> Path:
    """Write eigenbases to ``path`` (safetensors, atomically)."""
    tensors = {}
    for name, b in bases.items():
        tensors[f"values/{name}"] = b.values
        tensors[f"vectors/{name}"] = b.vectors
    meta = {
        "model": model_id,
        "data": data,
        "rank": json.dumps({name: b.rank for name, b in bases.items()}),
        "digest": json.dumps({name: b.digest for name, b in bases.items()}),
    }
    return save_tensors(tensors, path, format=_FORMAT, metadata=meta)


def load_eigenbases(path: str | Path, *, model: nn.Module | None = None) -> Mapping:
    """Read eigenbases: a file of ``save_eigenbases``, or a folder of ``stream_eigenbases``
    (an ``EigenStore``, read lazily); with ``model``, check each layer exists with the same
    d_out and R."""
    if Path(path).is_dir():
        from .eigenstore import EigenStore

        bases: Mapping = EigenStore(path)
        shapes = {name: (e["d_out"], e["rank"]) for name, e in bases.layers.items()}
    else:
        tensors, meta = load_tensors(path, _FORMAT)
        ranks = meta_value(path, meta, "rank", dict)
        digests = meta_value(path, meta, "digest", dict)
        bases = {}
        for name, r in ranks.items():
            if name not in digests:
                raise ValueError(f"{path}: metadata 'digest' has no entry for {name}")
            values = tensor_of(path, tensors, f"values/{name}")
            vectors = tensor_of(path, tensors, f"vectors/{name}")
            bases[name] = Eigenbasis(values, vectors, r, digests[name])
        shapes = {name: (b.vectors.shape[0], b.rank) for name, b in bases.items()}
    if model is not None:
        layers = layers_by_name(model)
        for name, (d_out, rank) in shapes.items():
            layer = layers.get(name)
            if layer is None:
                raise ValueError(f"{path} has layer {name!r}, which {type(model).__name__} lacks")
            if (layer.d_out, min(layer.d_out, layer.d_in)) != (d_out, rank):
                raise ValueError(
                    f"{path} was made for another model: {name} has d_out {d_out} and R "
                    f"{rank} there, {layer.d_out} and {min(layer.d_out, layer.d_in)} here"
                )
    return bases


def _check_basis(w: torch.Tensor, basis: Eigenbasis, what: str, check: bool) -> None:
    label = f"{what} eigenbasis".strip()
    if basis.d_out != w.shape[0]:
        raise ValueError(
            f"the {label} is for d_out = {basis.d_out}, the weight has {w.shape[0]} rows"
        )
    if check and basis.digest != weight_digest(w):
        raise ValueError(
            f"the {label} was computed from other weights (another model, or this layer was "
            "edited since); pass check=False to apply it anyway"
        )


def _project(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """U (Uᵀ x) with thin factors."""
    return u @ (u.T @ x)


def _write(w: torch.Tensor, new: torch.Tensor) -> None:
    w.copy_(new.to(device=w.device, dtype=w.dtype))


@torch.no_grad()
def remove_top(w: torch.Tensor, basis: Eigenbasis, r: int, *, check: bool = True) -> int:
    """``W ← W − U_r (U_rᵀ W)`` in place; returns the bound on rank(ΔW), r."""
    _check_basis(w, basis, "", check)
    u = basis.top(r).to(w.device)
    x = w.to(u.dtype)
    _write(w, x - _project(u, x))
    return r


@torch.no_grad()
def keep_top(w: torch.Tensor, basis: Eigenbasis, r: int, *, check: bool = True) -> int:
    """``W ← U_r (U_rᵀ W)`` in place; returns the bound on rank(ΔW), R − r."""
    _check_basis(w, basis, "", check)
    u = basis.top(r).to(w.device)
    _write(w, _project(u, w.to(u.dtype)))
    return basis.rank - r


def _kept_counts(
    rank: int, r_u: int | None, r_s: int | None, keep_u: int | None, keep_s: int | None
) -> tuple[int, int]:
    if (r_u is None) == (keep_u is None) or (r_s is None) == (keep_s is None):
        raise ValueError("give exactly one of r_u and keep_u, and one of r_s and keep_s")
    for label, value in (("r_u", r_u), ("r_s", r_s), ("keep_u", keep_u), ("keep_s", keep_s)):
        if value is not None and not 0 <= value <= rank:
            raise ValueError(f"{label} = {value} is outside [0, R] = [0, {rank}]")
    return (rank - r_u if keep_u is None else keep_u), (rank - r_s if keep_s is None else keep_s)


@torch.no_grad()
def orthogonal_projection(
    w: torch.Tensor,
    utility: Eigenbasis,
    safety: Eigenbasis,
    *,
    r_u: int | None = None,
    r_s: int | None = None,
    keep_u: int | None = None,
    keep_s: int | None = None,
    check: bool = True,
    tolerance: float | None = None,
) -> int:
    """``W ← W − (I − Π_u) Π_s W`` in place; returns rank(ΔW), counted numerically.

    ΔW = B (U_sᵀ W) with B = (I − Π_u) U_s; U_sᵀ W has full row rank for a full-rank W, so
    rank(ΔW) = rank(B), the number of B's singular values (sines of the principal angles
    between the two subspaces) above ``tolerance`` (1e-6 in float64, 1e-3 in float32).
    """
    _check_basis(w, utility, "utility", check)
    _check_basis(w, safety, "safety", check)
    b, us = _orthogonal_factors(utility, safety, w.device, r_u, r_s, keep_u, keep_s)
    x = w.to(b.dtype)
    _write(w, x - b @ (us.T @ x))
    return _numerical_rank(b, tolerance)


def _orthogonal_factors(
    utility: Eigenbasis,
    safety: Eigenbasis,
    device: torch.device | None,
    r_u: int | None,
    r_s: int | None,
    keep_u: int | None,
    keep_s: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, U_s) of the projection ΔW = B (U_sᵀ W), B = (I − Π_u) U_s, on ``device`` (None:
    where the utility eigenvectors are)."""
    if utility.rank != safety.rank:
        raise ValueError(f"the eigenbases have R = {utility.rank} and {safety.rank}")
    ku, ks = _kept_counts(utility.rank, r_u, r_s, keep_u, keep_s)
    uu = utility.top(ku, what="kept utility rank")
    uu = uu if device is None else uu.to(device)
    us = safety.top(ks, what="kept safety rank").to(device=uu.device, dtype=uu.dtype)
    return us - _project(uu, us), us


def _numerical_rank(b: torch.Tensor, tolerance: float | None) -> int:
    if b.shape[1] == 0:
        return 0
    tolerance = tolerance if tolerance is not None else (1e-6 if b.dtype == torch.float64 else 1e-3)
    return int((torch.linalg.svdvals(b) > tolerance).sum())


def subspace_similarity(utility: Eigenbasis, safety: Eigenbasis, r_u: int, r_s: int) -> float:
    """``‖U_uᵀ U_s‖_F² / min(r_u, r_s)`` over the top r_u utility and r_s safety directions: 1
    when one subspace contains the other, about ``max(r_u, r_s)/d_out`` for random ones."""
    if min(r_u, r_s) <= 0:
        raise ValueError(f"r_u and r_s must be positive, got {r_u}, {r_s}")
    uu = utility.top(r_u, what="r_u")
    us = safety.top(r_s, what="r_s").to(device=uu.device, dtype=uu.dtype)
    return float((uu.T @ us).pow(2).sum()) / min(r_u, r_s)


@dataclass
class RankEdit:
    """What an edit removed: per layer R and rank(ΔW), and the overall fraction Σrank/ΣR."""

    layers: dict[str, dict[str, int]]

    @property
    def fraction(self) -> float:
        total = sum(v["R"] for v in self.layers.values())
        return sum(v["rank"] for v in self.layers.values()) / total if total else 0.0

    def per_layer(self) -> dict[str, float]:
        return {name: v["rank"] / v["R"] for name, v in self.layers.items()}


def _resolve(model: nn.Module, names: Iterable[str]) -> list[LinearLayer]:
    layers = layers_by_name(model)
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"{type(model).__name__} has no layer {missing[0]!r}")
    return [layers[n] for n in names]


def edit_ranks(
    model: nn.Module,
    mode: Literal["remove", "keep", "orthogonal"],
    safety: dict[str, Eigenbasis],
    utility: dict[str, Eigenbasis] | None = None,
    *,
    r: Amount | int | float | str | None = None,
    r_u: Amount | int | float | str | None = None,
    r_s: Amount | int | float | str | None = None,
    keep_u: Amount | int | float | str | None = None,
    keep_s: Amount | int | float | str | None = None,
    layers: Sequence[str] | None = None,
    check: bool = True,
    device: torch.device | str | None = None,
    apply: bool = True,
) -> RankEdit:
    """Apply a rank edit to every layer that has an eigenbasis (or to ``layers``), in place.

    mode "remove"/"keep": the top ``r`` ranks of ``safety`` (ActSVD); "orthogonal": the
    projection with ``utility`` and ``(r_u, r_s)`` or ``(keep_u, keep_s)``. Each rank is an
    amount (``pyattr.counts``): a count (``count(16)``, an int, "16") or a fraction of the
    layer's R rounded down (``fraction(0.9)``, a float, "0.9", "90%"), so one setting can serve
    layers of different R (grouped-query k/v projections). One layer at a time through
    ``pyattr.offload``: ``device`` is where each edit runs (default: where the layer computes,
    the execution device of an offloaded one);; with
    ``apply=False`` only the ranks are counted (the report of a random control) and no weight
    is read or written.
    """
    if mode not in ("remove", "keep", "orthogonal"):
        raise ValueError(f"mode must be 'remove', 'keep' or 'orthogonal', got {mode!r}")
    if mode == "orthogonal" and utility is None:
        raise ValueError("the orthogonal projection needs the utility eigenbases")
    if mode != "orthogonal" and r is None:
        raise ValueError(f"mode {mode!r} needs r, the number of top ranks")
    names = list(layers) if layers is not None else list(safety)
    for name in names:
        if name not in safety or (mode == "orthogonal" and name not in utility):
            raise ValueError(f"no eigenbasis for layer {name!r}")
    out: dict[str, dict[str, int]] = {}
    for layer in _resolve(model, names):
        basis, rank = safety[layer.name], safety[layer.name].rank
        if mode in ("remove", "keep"):
            k = resolve(r, rank, "r", whole="R", where=layer.name)
            check_top(k, rank, basis.kept)
            if apply:
                with writable(layer, device, model=model) as w:
                    changed = (remove_top if mode == "remove" else keep_top)(
                        w, basis, k, check=check
                    )
            else:
                changed = k if mode == "remove" else rank - k
        else:
            counts = {
                k: resolve(v, rank, k, whole="R", where=layer.name)
                for k, v in (("r_u", r_u), ("r_s", r_s), ("keep_u", keep_u), ("keep_s", keep_s))
            }
            if apply:
                with writable(layer, device, model=model) as w:
                    changed = orthogonal_projection(
                        w, utility[layer.name], basis, check=check, **counts
                    )
            else:
                b, _ = _orthogonal_factors(utility[layer.name], basis, device, **counts)
                changed = _numerical_rank(b, None)
        out[layer.name] = {"R": rank, "rank": changed}
    return RankEdit(out)


@torch.no_grad()
def remove_random(
    model: nn.Module,
    like: RankEdit,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> RankEdit:
    """The control of a rank edit: per layer, remove as many uniformly random directions as
    ``like`` removed ranks (``W ← W − Q (Qᵀ W)``, Q a random orthonormal d_out × rank), one
    layer at a time as ``edit_ranks``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in _resolve(model, list(like.layers)):
        k = like.layers[layer.name]["rank"]
        g = torch.randn(layer.d_out, k, generator=gen, dtype=torch.float64)
        with writable(layer, device, model=model) as w:
            q = torch.linalg.qr(g).Q.to(w.device)
            x = w.to(q.dtype)
            _write(w, x - _project(q, x))
        out[layer.name] = {"R": like.layers[layer.name]["R"], "rank": k}
    return RankEdit(out)
