"""Fused score + per-row top-k: which k = ⌊ρ·d_in⌋ entries of each row score highest (or lowest).

What: for W (d_out × d_in) and Wanda norms (d_in) or SNIP |grad| sums (W's shape), the mask of
the k largest (``largest=True``, most critical first) or smallest scores of every row, ties to
the lower column index. Outputs: a bool mask, a bit-packed mask (uint8, column 8j+b is bit b of
byte j), or W itself with the selected entries zeroed.
How: one program per ROWS rows; each row is loaded once (W, plus G for SNIP), scored in fp32 in
registers, and selected by a 31-step bitwise search on the score bits (``scores.select_top``);
the scores are never written. Memory traffic: W (+ G) read once, the mask written once.
Trade-off: the whole row lives in registers, which holds up to 32768 columns (the widest
Llama-70B input is 28672); wider rows take the PyTorch path (``pyattr.ops``) with the same
result. The 31 register passes are compute, hidden behind the read of W up to about 16K columns.

Floor and prediction (H100 SXM, not measured yet; the GPU suite measures them). Bytes per row:
2·d_in (bf16 W) + 1·d_in (bool mask), the statistics once through L2: 3 B/entry, 50 MB for a
4096 × 4096 matrix, ~15 µs at 3.35 TB/s. Work per row of the bitwise select: 31 passes, each a
compare of every key and one block-wide reduction (a barrier). At d_in = 4096 (8 warps, 16 keys
per thread, about four programs per SM) that is ~2.7 µs per row per program: ~21 µs for the
matrix, near the floor. At d_in = 28672 (BLOCK 32768, 16 warps, 64 keys per thread) the row
holds ~130+ registers per thread (keys, W, flags): one program per SM and likely spills; 31
passes of ~260 cycles make ~5 µs per row, ~300 µs for Llama-2-70B's 8192 × 28672 down
projection against a 210 µs floor (~70% of copy at best). The prepared alternative,
``PYATTR_ROW_SELECT=radix`` (``scores.select_top_radix``, one row per program): four 8-bit
histogram passes and 256-entry scans instead of 31 counts, ~1 µs per long row, so the kernel
should stay memory-bound at every Llama width; the benchmark measures both.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .scores import score_keys, select_top, select_top_radix, store_selection

__all__ = ["allocate_output", "row_select", "row_topk_ref", "row_topk_triton", "use_radix"]

_OUT_BOOL, _OUT_PACKED, _OUT_ZERO = 0, 1, 2
_MODES = {"bool": _OUT_BOOL, "packed": _OUT_PACKED, "zero": _OUT_ZERO}


@triton.jit
def _row_topk_kernel(
    w_ptr,
    aux_ptr,
    out_ptr,
    bad_ptr,
    n_rows,
    n_cols,
    stride_w,
    stride_aux,
    stride_out,
    k,
    PER_ENTRY: tl.constexpr,
    LARGEST: tl.constexpr,
    OUT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    RADIX: tl.constexpr = False,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    valid = (rows < n_rows) & (cols < n_cols)
    key, bad = score_keys(
        w_ptr, aux_ptr, rows, cols, valid, stride_w, stride_aux, PER_ENTRY, LARGEST
    )
    if RADIX:
        sel = select_top_radix(key, k, n_cols, BLOCK) & valid
    else:
        sel = select_top(key, k, 1) & valid
    row_bad = tl.sum(bad.to(tl.int32), axis=1)
    tl.store(
        bad_ptr + tl.program_id(0) * ROWS + tl.arange(0, ROWS),
        row_bad,
        mask=tl.program_id(0) * ROWS + tl.arange(0, ROWS) < n_rows,
    )
    # Rows with a NaN/negative score are not zeroed; the launcher then raises.
    store_selection(
        sel,
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


def row_select() -> str:
    """How a long row is selected: "bitwise" (31 full-row counts, the default) or "radix" (four
    8-bit histogram passes), from ``PYATTR_ROW_SELECT``: the switch the benchmark flips."""
    method = os.environ.get("PYATTR_ROW_SELECT", "bitwise")
    if method not in ("bitwise", "radix"):
        raise ValueError(f"PYATTR_ROW_SELECT must be 'bitwise' or 'radix', got {method!r}")
    return method


def use_radix(rows: int) -> bool:
    """The radix select takes one row per program (its histograms are per program)."""
    return rows == 1 and row_select() == "radix"


def _launch_config(n_cols: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps): several short rows per program, one long row per program."""
    block = max(16, triton.next_power_of_2(n_cols))
    rows = max(1, min(16, 2048 // block))
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return rows, block, warps


def row_topk_triton(
    weight: torch.Tensor,
    aux: torch.Tensor,
    k: int,
    *,
    per_entry: bool,
    largest: bool = True,
    out: str = "bool",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel. ``aux``: the factor per column (d_in,) or per entry (W's shape).
    Returns the output (bool mask, packed uint8 mask, or ``weight`` zeroed) and the number of
    NaN/negative scores (a scalar tensor).
    Arguments are validated by ``pyattr.selection``; rows have at most 32768 columns."""
    d_out, d_in = weight.shape
    result, target, stride_out, mode = allocate_output(weight, out)
    bad = torch.empty(d_out, dtype=torch.int32, device=weight.device)
    rows, block, warps = _launch_config(d_in)
    _row_topk_kernel[(triton.cdiv(d_out, rows),)](
        weight,
        aux,
        target,
        bad,
        d_out,
        d_in,
        weight.stride(0),
        aux.stride(0) if per_entry else 0,
        stride_out,
        k,
        PER_ENTRY=per_entry,
        LARGEST=largest,
        OUT=mode,
        ROWS=rows,
        BLOCK=block,
        RADIX=use_radix(rows),
        num_warps=warps,
    )
    return result, bad.sum()


def allocate_output(weight: torch.Tensor, out: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(result, what the kernel writes, its row stride, mode) for out = bool | packed | zero."""
    d_out, d_in = weight.shape
    mode = _MODES[out]
    if mode == _OUT_BOOL:
        result = torch.empty(d_out, d_in, dtype=torch.bool, device=weight.device)
        return result, result.view(torch.int8), d_in, mode
    if mode == _OUT_PACKED:
        result = torch.empty(d_out, (d_in + 7) // 8, dtype=torch.uint8, device=weight.device)
        return result, result, result.stride(0), mode
    return weight, weight, weight.stride(0), mode


def row_topk_ref(scores: torch.Tensor, k: int, *, largest: bool = True) -> torch.Tensor:
    """Reference: a stable sort of every row, the first k indices marked."""
    order = torch.sort(scores, dim=1, descending=largest, stable=True).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(1, order[:, :k], True)
