"""Fused score + N:M semi-structured selection (2:4, 4:8, ...).

What: in every group of M consecutive entries of a row, the N with the largest (or smallest)
score, ties to the lower column (so 2:4 pruning in Wanda's sense zeroes ``nm(..., n=2, m=4,
largest=False)``). Same scores and outputs as ``row_topk``.
How: one program per (row, block of GROUPS groups): W (and G) read once as a (GROUPS, M) tile,
each group selected in registers by the same bitwise search as the row kernel (``select_top``
along the group axis), the mask written once. d_in must be a multiple of M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .row_topk import allocate_output, row_topk_ref
from .scores import score_keys, select_top, store_selection

__all__ = ["nm_triton", "nm_ref"]


@triton.jit
def _nm_kernel(
    w_ptr,
    aux_ptr,
    out_ptr,
    bad_ptr,
    n_cols,
    stride_w,
    stride_aux,
    stride_out,
    n,
    M: tl.constexpr,
    PER_ENTRY: tl.constexpr,
    LARGEST: tl.constexpr,
    OUT: tl.constexpr,
    GROUPS: tl.constexpr,
):
    row = tl.program_id(0)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)[:, None]
    cols = groups * M + tl.arange(0, M)[None, :]
    valid = cols < n_cols
    key, bad = score_keys(
        w_ptr, aux_ptr, row, cols, valid, stride_w, stride_aux, PER_ENTRY, LARGEST
    )
    sel = select_top(key, n, 1) & valid
    n_bad = tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0)
    tl.atomic_add(bad_ptr + row, n_bad)
    # Reshaped as int32: the interpreter does not reshape boolean blocks into store masks.
    flat = tl.reshape(sel.to(tl.int32), (1, GROUPS * M)) != 0
    flat_cols = tl.reshape(cols, (1, GROUPS * M))
    flat_valid = tl.reshape(valid.to(tl.int32), (1, GROUPS * M)) != 0
    row_ok = (tl.zeros((1, 1), dtype=tl.int32) + n_bad) == 0
    store_selection(
        flat,
        row,
        flat_cols,
        flat_valid,
        row_ok,
        w_ptr,
        out_ptr,
        stride_w,
        stride_out,
        n_cols,
        OUT,
        1,
        GROUPS * M,
    )


def nm_triton(
    weight: torch.Tensor,
    aux: torch.Tensor,
    n: int,
    m: int,
    *,
    per_entry: bool,
    largest: bool = True,
    out: str = "bool",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the N:M kernel; returns (output, number of NaN/negative scores as a tensor).
    ``m`` is a power of two and divides d_in (validated by ``pyattr.selection``)."""
    d_out, d_in = weight.shape
    result, target, stride_out, mode = allocate_output(weight, out)
    bad = torch.zeros(d_out, dtype=torch.int32, device=weight.device)
    groups = max(8 // m if m < 8 else 1, min(256, triton.next_power_of_2(d_in // m)))
    grid = (d_out, triton.cdiv(d_in // m, groups))
    _nm_kernel[grid](
        weight,
        aux,
        target,
        bad,
        d_in,
        weight.stride(0),
        aux.stride(0) if per_entry else 0,
        stride_out,
        n,
        M=m,
        PER_ENTRY=per_entry,
        LARGEST=largest,
        OUT=mode,
        GROUPS=groups,
    )
    return result, bad.sum()


def nm_ref(scores: torch.Tensor, n: int, m: int, *, largest: bool = True) -> torch.Tensor:
    """Reference: a stable sort of every group of m."""
    d_out, d_in = scores.shape
    return row_topk_ref(scores.reshape(-1, m), n, largest=largest).reshape(d_out, d_in)
