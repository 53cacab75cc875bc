"""Fused set difference: M = top_q(S_safety) \\ top_p(S_utility), with |P ∩ Q| for the Jaccard
index, from W and the two sets of statistics in one kernel.

What: Q = the ⌊q·d_in⌋ highest safety scores of each row (or the ⌊q·numel⌋ of the matrix), P
the same for utility with p; the mask M = Q \\ P and the intersection size |P ∩ Q| (|P| and |Q|
are fixed by p and q, so Jaccard = |P∩Q| / (|P| + |Q| − |P∩Q|)). Both scores are Wanda or both
SNIP, computed as in ``scores.py``; ties to the lower index in each top set.
How, per row (the paper's definition, the default): one program per ROWS rows reads W once,
scores it against both statistics in registers, runs the bitwise selection twice, writes M and
one intersection count per row. Per matrix (the released code's option): two radix selects
(``matrix_topk``: 4 passes each), one tie-count pass and one write pass that evaluates both
selections, writes M and one intersection count per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matrix_topk import matrix_threshold, matrix_topk_ref, write_selection
from .row_topk import _launch_config, allocate_output, row_topk_ref, use_radix
from .scores import keys_from, select_top, select_top_radix, store_selection

__all__ = ["set_difference_ref", "set_difference_triton"]


@triton.jit
def _setdiff_row_kernel(
    w_ptr,
    aq_ptr,
    ap_ptr,
    out_ptr,
    inter_ptr,
    bad_ptr,
    n_rows,
    n_cols,
    stride_w,
    stride_q,
    stride_p,
    stride_out,
    kq,
    kp,
    PER_ENTRY: tl.constexpr,
    OUT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    RADIX: tl.constexpr = False,
):
    row_ids = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rows = row_ids[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    valid = (rows < n_rows) & (cols < n_cols)
    w = tl.load(w_ptr + rows * stride_w + cols, mask=valid, other=0.0).to(tl.float32)
    key_q, bad_q = keys_from(w, aq_ptr, rows, cols, valid, stride_q, PER_ENTRY, True)
    key_p, bad_p = keys_from(w, ap_ptr, rows, cols, valid, stride_p, PER_ENTRY, True)
    if RADIX:
        sel_q = select_top_radix(key_q, kq, n_cols, BLOCK) & valid
        sel_p = select_top_radix(key_p, kp, n_cols, BLOCK) & valid
    else:
        sel_q = select_top(key_q, kq, 1) & valid
        sel_p = select_top(key_p, kp, 1) & valid
    in_rows = row_ids < n_rows
    tl.store(inter_ptr + row_ids, tl.sum((sel_q & sel_p).to(tl.int32), axis=1), mask=in_rows)
    row_bad = tl.sum((bad_q | bad_p).to(tl.int32), axis=1)
    tl.store(bad_ptr + row_ids, row_bad, mask=in_rows)
    store_selection(
        sel_q & ~sel_p,
        rows,
        cols,
        valid,
        tl.expand_dims(row_bad == 0, 1),
        w_ptr,
        out_ptr,
        stride_w,
        stride_out,
        n_cols,
        OUT,
        ROWS,
        BLOCK,
    )


def set_difference_triton(
    weight: torch.Tensor,
    aux_q: torch.Tensor,
    aux_p: torch.Tensor,
    kq: int,
    kp: int,
    *,
    per_entry: bool,
    per_row: bool = True,
    out: str = "bool",
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """Launch; returns (output, |P ∩ Q|, number of NaN/negative scores), the counts as scalars
    or scalar tensors. ``kq``/``kp`` count per row (``per_row``) or per matrix. With a bad
    score, the matrix form writes nothing."""
    d_out, d_in = weight.shape
    if per_row:
        result, target, stride_out, mode = allocate_output(weight, out)
        inter = torch.empty(d_out, dtype=torch.int32, device=weight.device)
        bad = torch.empty(d_out, dtype=torch.int32, device=weight.device)
        rows, block, warps = _launch_config(d_in)
        _setdiff_row_kernel[(triton.cdiv(d_out, rows),)](
            weight,
            aux_q,
            aux_p,
            target,
            inter,
            bad,
            d_out,
            d_in,
            weight.stride(0),
            aux_q.stride(0) if per_entry else 0,
            aux_p.stride(0) if per_entry else 0,
            stride_out,
            kq,
            kp,
            PER_ENTRY=per_entry,
            OUT=mode,
            ROWS=rows,
            BLOCK=block,
            RADIX=use_radix(rows),
            num_warps=warps,
        )
        return result, inter.sum(), bad.sum()
    th_q = matrix_threshold(weight, aux_q, kq, per_entry=per_entry)
    th_p = matrix_threshold(weight, aux_p, kp, per_entry=per_entry)
    if th_q.bad or th_p.bad:
        empty = torch.empty(0, dtype=torch.bool, device=weight.device)
        return empty, 0, th_q.bad + th_p.bad
    result, inter = write_selection(
        weight, [aux_q, aux_p], [th_q, th_p], per_entry=per_entry, largest=True, out=out
    )
    return result, inter.sum(), 0


def set_difference_ref(
    scores_q: torch.Tensor, scores_p: torch.Tensor, kq: int, kp: int, *, per_row: bool = True
) -> tuple[torch.Tensor, int]:
    """Reference: the two stable-sort selections and plain set operations; (mask, |P ∩ Q|)."""
    select = row_topk_ref if per_row else matrix_topk_ref
    q, p = select(scores_q, kq), select(scores_p, kp)
    return q & ~p, int((q & p).sum())
