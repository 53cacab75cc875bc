"""Selection operators ``torch.ops.pyattr.*``: which weights score highest, as custom ops.

Scores are ``|W_ij| · |a|`` in fp32 with a factor ``a`` read per column (a (d_in,) vector:
Wanda's √s, magnitude's ones) or per entry (W's shape: SNIP's Σ|∂L_b/∂W|); the factor's rank
tells which. Every op returns the number of NaN or negative scores as an int64 scalar tensor
(the caller raises when it is not 0) and never writes anything when it is not 0.

    row_topk(W, a, k, largest, packed) -> (mask, bad)        k per row, ties to the lower column
    matrix_topk(W, a, k, largest, packed) -> (mask, bad)     k of the matrix, ties row-major
    nm(W, a, n, m, largest, packed) -> (mask, bad)           n of every m consecutive entries
    set_difference(W, a_q, a_p, kq, kp, per_row, packed)     top_q(a_q) \\ top_p(a_p)
        -> (mask, |P ∩ Q|, bad)

``mask`` is bool (W's shape) or, with ``packed``, uint8 (d_out, ⌈d_in/8⌉), column 8j+b in bit
b of byte j. Each op has an in-place twin ``*_zero_`` that zeroes the selected entries of W
instead of returning a mask. On CUDA the ops run the Triton kernels of ``pyattr.kernels``
(imported on first use; rows wider than 32768 columns take the PyTorch path); on the CPU they
run the PyTorch path here, which selects the same entries bit for bit. ``force_backend``
switches either way (Triton on the CPU needs ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import selection_backend

__all__ = [
    "matrix_topk_torch",
    "nm_torch",
    "pack_bits",
    "row_topk_torch",
    "scores",
]


def scores(weight: Tensor, factor: Tensor) -> Tensor:
    """(d_out, d_in) fp32 ``|W| · |a|``, the factor per column (d_in,) or per entry (W's shape)."""
    a = factor.to(torch.float32)
    if a.dim() == 1:
        a = a[None, :]
    # abs() allocates (``.to(float32)`` of an fp32 weight would alias it); mul_ then reuses it.
    return torch.abs(weight.to(torch.float32)).mul_(a.abs())


def pack_bits(mask: Tensor) -> Tensor:
    """(r, c) bool → (r, ⌈c/8⌉) uint8, column 8j+b in bit b of byte j (the kernels' layout)."""
    r, c = mask.shape
    padded = torch.zeros(r, (c + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :c] = mask
    weights = 1 << torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (padded.view(r, -1, 8) * weights).sum(2, dtype=torch.uint8)


def row_topk_torch(scores: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """Each row's k-th score by ``topk`` of the smaller side (a partial selection, not a sort),
    every score beyond it, and the first ties equal to it; the running count that orders ties
    runs only on rows where the ties straddle the threshold."""
    d_out, d_in = scores.shape
    if k == 0:
        return torch.zeros(d_out, d_in, dtype=torch.bool, device=scores.device)
    if k == d_in:
        return torch.ones(d_out, d_in, dtype=torch.bool, device=scores.device)
    if k <= d_in - k + 1:
        vals = scores.topk(k, dim=1, largest=largest, sorted=False).values
    else:
        vals = scores.topk(d_in - k + 1, dim=1, largest=not largest, sorted=False).values
    kth = vals.amin(1, keepdim=True) if largest == (k <= d_in - k + 1) else vals.amax(1, True)
    beyond = scores > kth if largest else scores < kth
    eq = scores == kth
    need = k - beyond.sum(1, keepdim=True)
    selected = beyond | eq
    straddle = (eq.sum(1, keepdim=True) > need).squeeze(1).nonzero().squeeze(1)
    if straddle.numel():
        ties = eq[straddle]
        selected[straddle] = beyond[straddle] | (ties & (ties.cumsum(1) <= need[straddle]))
    return selected


def matrix_topk_torch(scores: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """A two-level radix select on the int32 keys of the scores (as in the kernels): a
    32768-bin histogram of the high 16 bits finds the bucket holding the k-th key, a ``topk``
    inside that bucket finds the key; no sort of the matrix."""
    flat = scores.contiguous().view(-1)
    n = flat.numel()
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    keys = flat.view(torch.int32)
    if not largest:
        keys = 0x7FFFFFFF - keys
    high = keys >> 16
    hist = torch.bincount(high, minlength=1 << 15)
    from_top = hist.flip(0).cumsum(0)
    pos = int((from_top >= k).nonzero()[0])
    bucket = (1 << 15) - 1 - pos
    above = int(from_top[pos]) - int(hist[bucket])
    kth = keys[high == bucket].topk(k - above, sorted=False).values.min()
    beyond = keys > kth
    eq = keys == kth
    need = k - int(beyond.sum())
    if int(eq.sum()) > need:
        eq &= eq.cumsum(0) <= need
    return (beyond | eq).view(scores.shape)


def nm_torch(scores: Tensor, n: int, m: int, *, largest: bool = True) -> Tensor:
    """Each group of m is a row of length m for ``row_topk_torch``."""
    d_out, d_in = scores.shape
    return row_topk_torch(scores.reshape(-1, m), n, largest=largest).reshape(d_out, d_in)


# ----------------------------------------------------------------------------------------------
# One selection, either path. ``kind`` is "row", "matrix", "nm" or "setdiff"; ``params`` its
# integers and flags; the result is (output or None when a score is bad, |P ∩ Q|, bad count).


def _count(value: Tensor | int) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(torch.int64).sum()
    return torch.tensor(value, dtype=torch.int64)


def _torch_path(kind: str, weight: Tensor, factors: list[Tensor], params: tuple):
    per_score = [scores(weight, f) for f in factors]
    bad = _count(0).to(weight.device)
    for s, f in zip(per_score, factors, strict=True):
        negative = f < 0 if f.dim() == 2 else (f < 0)[None, :]
        bad = bad + (torch.isnan(s) | negative).sum()
    if kind == "row":
        return row_topk_torch(per_score[0], params[0], largest=params[1]), None, bad
    if kind == "matrix":
        return matrix_topk_torch(per_score[0], params[0], largest=params[1]), None, bad
    if kind == "nm":
        n, m, largest = params
        return nm_torch(per_score[0], n, m, largest=largest), None, bad
    kq, kp, per_row = params
    select = row_topk_torch if per_row else matrix_topk_torch
    q, p = select(per_score[0], kq), select(per_score[1], kp)
    return q & ~p, (q & p).sum(), bad


def _triton_path(kind: str, weight: Tensor, factors: list[Tensor], params: tuple, out: str):
    """The Triton launchers, imported here on first use (``import pyattr`` never needs Triton)."""
    per_entry = factors[0].dim() == 2
    with torch.no_grad():
        if kind == "row":
            from pyattr.kernels.row_topk import row_topk_triton as launch
        elif kind == "matrix":
            from pyattr.kernels.matrix_topk import matrix_topk_triton as launch
        elif kind == "nm":
            from pyattr.kernels.nm import nm_triton

            n, m, largest = params
            result, bad = nm_triton(
                weight, factors[0], n, m, per_entry=per_entry, largest=largest, out=out
            )
            return result, None, bad
        else:
            from pyattr.kernels.set_difference import set_difference_triton

            kq, kp, per_row = params
            return set_difference_triton(
                weight, *factors, kq, kp, per_entry=per_entry, per_row=per_row, out=out
            )
        k, largest = params
        result, bad = launch(weight, factors[0], k, per_entry=per_entry, largest=largest, out=out)
        return result, None, bad


def _row_kernel(kind: str, params: tuple) -> bool:
    """Whether the Triton path holds whole rows in registers (per-row top-k or set difference):
    those kernels are limited in width, and check their scores row by row."""
    return kind == "row" or (kind == "setdiff" and params[2])


def _uses_triton(kind: str, weight: Tensor, params: tuple) -> bool:
    return selection_backend(weight, per_row=_row_kernel(kind, params)) == "triton"


def _select(kind: str, weight: Tensor, factors: list[Tensor], params: tuple, out: str):
    if _uses_triton(kind, weight, params):
        if out == "zero" and (_row_kernel(kind, params) or kind == "nm"):
            # These kernels zero W row by row (or group by group) as they check it; the
            # matrix-wide ones check in their first pass. One extra read here, so that an error
            # never leaves W half edited.
            bad = _count(torch.isnan(weight).sum())
            for f in factors:
                bad = bad + (~(f >= 0)).sum()
            if int(bad):
                return None, _count(0), bad
        result, inter, bad = _triton_path(kind, weight, factors, params, out)
        bad = _count(bad)
        inter = _count(0 if inter is None else inter)
        return (result if not int(bad) else None), inter, bad
    mask, inter, bad = _torch_path(kind, weight, factors, params)
    inter = _count(0 if inter is None else inter)
    if int(bad):
        return None, inter, bad
    if out == "bool":
        return mask, inter, bad
    if out == "packed":
        return pack_bits(mask), inter, bad
    with torch.no_grad():
        weight.masked_fill_(mask, 0)
    return weight, inter, bad


def _mask_shape(weight: Tensor, packed: bool) -> tuple[tuple[int, int], torch.dtype]:
    d_out, d_in = weight.shape
    return ((d_out, (d_in + 7) // 8), torch.uint8) if packed else ((d_out, d_in), torch.bool)


def _mask_op(kind: str, n_factors: int):
    """The implementation of ``pyattr::<kind>``: (mask, [|P ∩ Q|,] bad)."""

    def impl(weight: Tensor, *rest):
        factors, params, packed = list(rest[:n_factors]), tuple(rest[n_factors:-1]), rest[-1]
        result, inter, bad = _select(kind, weight, factors, params, "packed" if packed else "bool")
        if result is None:
            shape, dtype = _mask_shape(weight, packed)
            result = torch.zeros(shape, dtype=dtype, device=weight.device)
        counts = (inter, bad) if kind == "setdiff" else (bad,)
        return result, *(c.to(weight.device) for c in counts)

    return impl


def _zero_op(kind: str, n_factors: int):
    """The implementation of the in-place twin: ([|P ∩ Q|,] bad), selected entries of W zeroed."""

    def impl(weight: Tensor, *rest):
        factors, params = list(rest[:n_factors]), tuple(rest[n_factors:])
        _, inter, bad = _select(kind, weight, factors, params, "zero")
        if kind == "setdiff":
            return inter.to(weight.device), bad.to(weight.device)
        return bad.to(weight.device)

    return impl


def _fake_op(kind: str, returns_mask: bool):
    """Output shapes for torch.compile and meta tensors: nothing is computed."""

    def fake(weight: Tensor, *rest):
        counts = [weight.new_empty((), dtype=torch.int64) for _ in range(1 + (kind == "setdiff"))]
        if returns_mask:
            shape, dtype = _mask_shape(weight, rest[-1])
            return weight.new_empty(shape, dtype=dtype), *counts
        return tuple(counts) if len(counts) > 1 else counts[0]

    return fake


# ----------------------------------------------------------------------------------------------
# Registration with ``torch.library.Library`` (as the C++ operators are), not ``custom_op``:
# custom_op wraps every call in a dynamo guard that imports torch._dynamo, and with it Triton,
# on the first CPU selection. One implementation serves the CPU and CUDA keys: ``_select`` asks
# ``selection_backend``, which sends CUDA tensors to Triton and CPU tensors to PyTorch unless
# ``force_backend`` says otherwise, so one function decides for the ops and ``backends()``.

_lib = torch.library.Library("pyattr", "FRAGMENT")
_OPERATORS = {
    # name: (kind, number of factors, arguments after the weight)
    "row_topk": ("row", 1, "Tensor factor, int k, bool largest"),
    "matrix_topk": ("matrix", 1, "Tensor factor, int k, bool largest"),
    "nm": ("nm", 1, "Tensor factor, int n, int m, bool largest"),
    "set_difference": (
        "setdiff",
        2,
        "Tensor factor_q, Tensor factor_p, int kq, int kp, bool per_row",
    ),
}

for _name, (_kind, _factors, _args) in _OPERATORS.items():
    _counts = "Tensor, Tensor" if _kind == "setdiff" else "Tensor"
    _lib.define(f"{_name}(Tensor weight, {_args}, bool packed) -> (Tensor, {_counts})")
    _lib.define(f"{_name}_zero_(Tensor(a!) weight, {_args}) -> ({_counts})")
    for _op, _impl, _fake in (
        (_name, _mask_op(_kind, _factors), _fake_op(_kind, True)),
        (f"{_name}_zero_", _zero_op(_kind, _factors), _fake_op(_kind, False)),
    ):
        _lib.impl(_op, _impl, "CPU")
        _lib.impl(_op, _impl, "CUDA")
        torch.library.register_fake(f"pyattr::{_op}", _fake, lib=_lib)
