"""Importance scores and the selection primitive shared by every selection kernel.

Scores (DESIGN.md), always in fp32, computed the same way by the Triton kernels, the PyTorch
path (``pyattr.ops.selection``) and the references so that all three select bit-identical
masks. The kernels know one structural flag, not a method: the factor is read per column
(``PER_ENTRY=False``, a (d_in,) vector) or per entry (``PER_ENTRY=True``, W's shape):

    per column  S_ij = |W_ij| · |a_j|    Wanda: a = sqrt(s) rounded to fp32 once
                                         (``wanda_norms``); magnitude: a = 1
    per entry   S_ij = |W_ij| · |A_ij|   SNIP: A = Σ_b |∂L_b/∂W|; signed SNIP: A = |Σ_b ∂L_b/∂W|
                                         (any float dtype, read as fp32)

|W| is exact in fp32 for bf16/fp16/fp32 weights; the product is rounded once. The statistics
enter as |a| (the same value for valid, non-negative statistics; a negative one is an error,
flagged separately), so a -0.0 statistic scores +0 on every path. Scores are never negative,
so the Triton kernels select on their fp32 bit patterns read as int32, which order exactly like
the scores; for "smallest first" the keys are mirrored (``0x7FFFFFFF - key``), which keeps ties
resolved towards the lower index. The PyTorch paths compare the fp32 scores themselves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["wanda_norms", "scores_ref"]


def wanda_norms(sq_norms: torch.Tensor) -> torch.Tensor:
    """(d_in,) fp32 ``sqrt(s)`` from the mean squared activations ``s`` (d_in,)."""
    return sq_norms.to(torch.float32).sqrt()


def scores_ref(
    weight: torch.Tensor, *, norms: torch.Tensor | None = None, grad_abs: torch.Tensor | None = None
) -> torch.Tensor:
    """(d_out, d_in) fp32 scores: ``|W|·norms`` (Wanda, ``norms`` from ``wanda_norms``) or
    ``|W|·grad_abs`` (SNIP). The single definition every path and test compares with."""
    if (norms is None) == (grad_abs is None):
        raise ValueError("give exactly one of norms (Wanda) or grad_abs (SNIP)")
    aux = norms.to(torch.float32)[None, :] if norms is not None else grad_abs.to(torch.float32)
    # abs() allocates (``.to(float32)`` of an fp32 weight would alias it); mul_ then reuses it.
    return torch.abs(weight.to(torch.float32)).mul_(aux.abs())


@triton.jit
def keys_from(
    w, aux_ptr, rows, cols, valid, stride_aux, PER_ENTRY: tl.constexpr, LARGEST: tl.constexpr
):
    """Score an already loaded fp32 W tile with the factor per column or per entry; return the
    int32 keys (-1 where not ``valid``, so never selected) and a NaN-or-negative flag."""
    if PER_ENTRY:
        a = tl.load(aux_ptr + rows * stride_aux + cols, mask=valid, other=0.0).to(tl.float32)
    else:
        a = tl.load(aux_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    s = tl.abs(w) * tl.abs(a)
    bad = ((s != s) | (a < 0)) & valid
    key = s.to(tl.int32, bitcast=True)
    if not LARGEST:
        key = 0x7FFFFFFF - key
    key = tl.where(valid, key, -1)
    return key, bad


@triton.jit
def score_keys(
    w_ptr,
    aux_ptr,
    rows,
    cols,
    valid,
    stride_w,
    stride_aux,
    PER_ENTRY: tl.constexpr,
    LARGEST: tl.constexpr,
):
    """Load W at [rows, cols] and score it (``keys_from``)."""
    w = tl.load(w_ptr + rows * stride_w + cols, mask=valid, other=0.0).to(tl.float32)
    return keys_from(w, aux_ptr, rows, cols, valid, stride_aux, PER_ENTRY, LARGEST)


@triton.jit
def select_top(key, k, AXIS: tl.constexpr):
    """The ``k`` largest keys along ``AXIS`` (a row held in registers), ties to the lower index.

    Bitwise search for T = max{t : count(key >= t) >= k} in 31 steps, each a register-only
    count; then every key > T and the first ``k - count(key > T)`` keys equal to T.
    """
    t = tl.zeros_like(tl.max(key, axis=AXIS))
    for bit in tl.static_range(30, -1, -1):
        cand = t | (1 << bit)
        cnt = tl.sum((key >= tl.expand_dims(cand, AXIS)).to(tl.int32), axis=AXIS)
        t = tl.where(cnt >= k, cand, t)
    t = tl.expand_dims(t, AXIS)
    greater = key > t
    need = k - tl.sum(greater.to(tl.int32), axis=AXIS)
    eq = key == t
    rank = tl.cumsum(eq.to(tl.int32), axis=AXIS)
    return greater | (eq & (rank <= tl.expand_dims(need, AXIS)))


@triton.jit
def select_top_radix(key, k, n_valid, BLOCK: tl.constexpr):
    """As ``select_top`` for a tile of ONE row (shape (1, BLOCK)), by radix select: four
    passes of 8-bit digits, most significant first, each one histogram of the candidates'
    digits (``tl.histogram``) and a 256-entry suffix sum, instead of 31 full-row counts.
    The k-th largest key T and how many keys equal to T to take come out of the passes; then
    every key > T and the first ``need`` keys equal to T, as in ``select_top``. ``n_valid``:
    the number of valid keys (k = 0 selects none, k >= n_valid all)."""
    flat = tl.reshape(key, (BLOCK,))
    bins = tl.arange(0, 256)
    prefix = 0
    remaining = k
    for i in tl.static_range(4):
        shift = 24 - 8 * i
        # candidates: valid keys whose digits above this one equal the prefix found so far
        if i == 0:  # noqa: SIM108 (a constexpr branch: no shift by 32)
            cand = flat >= 0
        else:
            cand = (flat >= 0) & ((flat >> (shift + 8)) == (prefix >> (shift + 8)))
        digit = tl.where(cand, (flat >> shift) & 255, 256 + (flat & 255))
        hist = tl.histogram(digit, 512)
        h = tl.reshape(hist, (2, 256))
        counts = tl.sum(tl.where(tl.arange(0, 2)[:, None] == 0, h, 0), axis=0)
        above = tl.sum(counts) - tl.cumsum(counts, axis=0)  # candidates with a larger digit
        enough = (above + counts) >= remaining
        d = tl.max(tl.where(enough, bins, -1), axis=0)
        remaining -= tl.sum(tl.where(bins == d, above, 0), axis=0)
        prefix = prefix | (d << shift)
    t = prefix
    greater = key > t
    eq = key == t
    rank = tl.cumsum(eq.to(tl.int32), axis=1)
    sel = greater | (eq & (rank <= remaining))
    # "!= 0": the interpreter turns a mask combined with a scalar condition into integers
    return ((sel & (k > 0)) | ((key >= 0) & (k >= n_valid))) != 0


@triton.jit
def store_selection(
    sel,
    rows,
    cols,
    valid,
    row_ok,
    w_ptr,
    out_ptr,
    stride_w,
    stride_out,
    n_cols,
    OUT: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
):
    """Write an (R, C) selection at [rows, cols] as OUT = 0: bool (int8), 1: bits packed 8 per
    byte (C % 8 == 0 and cols start on a multiple of 8), 2: zeros into W. ``row_ok`` (R, 1)
    guards rows with a bad score: in mode 2 they are left untouched."""
    if OUT == 0:
        tl.store(out_ptr + rows * stride_out + cols, sel.to(tl.int8), mask=valid)
    elif OUT == 1:
        bits = tl.reshape(sel.to(tl.int32), (R, C // 8, 8))
        packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)
        byte = tl.min(cols, axis=1, keep_dims=True) // 8 + tl.arange(0, C // 8)[None, :]
        in_rows = tl.max(valid.to(tl.int32), axis=1, keep_dims=True) > 0
        tl.store(
            out_ptr + rows * stride_out + byte, packed, mask=in_rows & (byte < (n_cols + 7) // 8)
        )
    else:
        zero = tl.zeros((R, C), dtype=w_ptr.dtype.element_ty)
        tl.store(w_ptr + rows * stride_w + cols, zero, mask=sel & valid & row_ok)
