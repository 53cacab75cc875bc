"""Fused score + matrix-wide top-k by radix select: the k = ⌊f·numel⌋ largest (or smallest)
scores of a whole weight matrix, ties to the lower row-major flat index.

What: the same scores as ``row_topk`` (fp32 ``|W|·norm`` or ``|W|·G``), one selection over the
matrix instead of one per row (the released code's "global" option and the matrix-level
baselines).
How: scores are recomputed from W on every pass, never stored. Their int32 keys (31 bits, since
scores are non-negative) are selected most-significant digit first: four histogram passes of
8 bits (256 bins, one per-program histogram added into a global one) fix the threshold key T
and how many keys equal to T are needed; one pass counts the keys equal to T per program; an
exclusive scan of those counts (one small torch op) gives each program its tie offset; a last
pass writes the mask. Six reads of W (and G) in all, a few µs of host work between passes
(4 syncs), extra memory 2 KB of histogram and 4 bytes per program: less than the mask.
Programs are (row, column chunk) pairs in row-major order, so a program's tie offset is exactly
the number of ties before it in flat order, and packed rows never straddle programs.
Trade-off: six passes at full bandwidth beat any sort (which must write the scores); fewer
passes would need 11- or 16-bit digits whose histograms no longer fit one program's registers.

Floor and prediction (not measured yet): a select that recomputes scores must read W at least
twice (once to find the threshold, once to write), 2·2 + 1 = 5 B/entry against this design's
6·2 + 1 = 13 B/entry, so at most ~23% of copy bandwidth (the goal is 50%). The alternative to
try if the GPU run falls short: one pass histogramming the top 16 bits into a 65536-bin
global histogram (L2 atomics, warp-aggregated), then one pass that writes the mask for keys
above the threshold bucket and compacts the few keys inside it (with their flat indices) for a
small exact select and a scatter of its ties: two reads and one write, ~60% of copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .row_topk import allocate_output
from .scores import keys_from, score_keys, store_selection

__all__ = [
    "matrix_threshold",
    "matrix_topk_triton",
    "matrix_topk_ref",
    "Threshold",
    "launch_grid",
]

_SHIFTS = (24, 16, 8, 0)


@triton.jit
def _hist_kernel(
    w_ptr,
    aux_ptr,
    hist_ptr,
    bad_ptr,
    n_cols,
    stride_w,
    stride_aux,
    prefix,
    SHIFT: tl.constexpr,
    FIRST: tl.constexpr,
    PER_ENTRY: tl.constexpr,
    LARGEST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    key, bad = score_keys(
        w_ptr, aux_ptr, row, cols, valid, stride_w, stride_aux, PER_ENTRY, LARGEST
    )
    match = key >= 0
    if FIRST:
        tl.atomic_add(bad_ptr, tl.sum(bad.to(tl.int32), axis=0))
    else:
        match = match & ((key >> (SHIFT + 8)) == prefix)
    # Keys outside the current prefix go to bin 256+, which the host ignores.
    digit = tl.where(match, (key >> SHIFT) & 255, 256)
    tl.atomic_add(hist_ptr + tl.arange(0, 512), tl.histogram(digit, 512))


@triton.jit
def _select(key, t, need, offset, valid):
    eq = key == t
    rank = offset + tl.cumsum(eq.to(tl.int32), axis=0)
    return ((key > t) | (eq & (rank <= need))) & valid


@triton.jit
def _ties_kernel(
    w_ptr,
    aux_a_ptr,
    aux_b_ptr,
    ties_ptr,
    n_cols,
    stride_w,
    stride_a,
    stride_b,
    t_a,
    t_b,
    PER_ENTRY: tl.constexpr,
    LARGEST: tl.constexpr,
    TWO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    pid = row * tl.num_programs(1) + tl.program_id(1)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    w = tl.load(w_ptr + row * stride_w + cols, mask=valid, other=0.0).to(tl.float32)
    key_a, _ = keys_from(w, aux_a_ptr, row, cols, valid, stride_a, PER_ENTRY, LARGEST)
    tl.store(ties_ptr + pid, tl.sum((key_a == t_a).to(tl.int32), axis=0))
    if TWO:
        key_b, _ = keys_from(w, aux_b_ptr, row, cols, valid, stride_b, PER_ENTRY, LARGEST)
        tl.store(
            ties_ptr + tl.num_programs(0) * tl.num_programs(1) + pid,
            tl.sum((key_b == t_b).to(tl.int32), axis=0),
        )


@triton.jit
def _write_kernel(
    w_ptr,
    aux_a_ptr,
    aux_b_ptr,
    offs_ptr,
    out_ptr,
    inter_ptr,
    n_cols,
    stride_w,
    stride_a,
    stride_b,
    stride_out,
    t_a,
    need_a,
    t_b,
    need_b,
    PER_ENTRY: tl.constexpr,
    LARGEST: tl.constexpr,
    TWO: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Mask = selection A (TWO=False), or A minus B with |A ∩ B| per program (TWO=True)."""
    row = tl.program_id(0)
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    pid = row * tl.num_programs(1) + tl.program_id(1)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    w = tl.load(w_ptr + row * stride_w + cols, mask=valid, other=0.0).to(tl.float32)
    key_a, _ = keys_from(w, aux_a_ptr, row, cols, valid, stride_a, PER_ENTRY, LARGEST)
    sel = _select(key_a, t_a, need_a, tl.load(offs_ptr + pid), valid)
    if TWO:
        key_b, _ = keys_from(w, aux_b_ptr, row, cols, valid, stride_b, PER_ENTRY, LARGEST)
        sel_b = _select(key_b, t_b, need_b, tl.load(offs_ptr + n_prog + pid), valid)
        tl.store(inter_ptr + pid, tl.sum((sel & sel_b).to(tl.int32), axis=0))
        sel = sel & ~sel_b
    ok = tl.full((1, 1), 1, tl.int1)
    store_selection(
        sel[None, :],
        row,
        cols[None, :],
        valid[None, :],
        ok,
        w_ptr,
        out_ptr,
        stride_w,
        stride_out,
        n_cols,
        OUT,
        1,
        BLOCK,
    )


class Threshold:
    """The k-th key of a matrix: select every key > ``key`` and the first ``need`` equal to it."""

    def __init__(self, key: int, need: int, bad: int) -> None:
        self.key, self.need, self.bad = key, need, bad


def launch_grid(weight: torch.Tensor) -> tuple[tuple[int, int], int]:
    """(grid, BLOCK): programs are (row, column chunk) in row-major order."""
    d_in = weight.shape[1]
    block = max(16, min(4096, triton.next_power_of_2(d_in)))
    return (weight.shape[0], triton.cdiv(d_in, block)), block


def matrix_threshold(
    weight: torch.Tensor, aux: torch.Tensor, k: int, *, per_entry: bool, largest: bool = True
) -> Threshold:
    """Radix-select the k-th largest key of the recomputed scores (4 passes over W)."""
    grid, block = launch_grid(weight)
    hist = torch.zeros(512, dtype=torch.int32, device=weight.device)
    bad = torch.zeros(1, dtype=torch.int32, device=weight.device)
    numel = weight.numel()
    prefix, remaining = 0, k
    for i, shift in enumerate(_SHIFTS):
        hist.zero_()
        _hist_kernel[grid](
            weight,
            aux,
            hist,
            bad,
            weight.shape[1],
            weight.stride(0),
            aux.stride(0) if per_entry else 0,
            prefix,
            SHIFT=shift,
            FIRST=i == 0,
            PER_ENTRY=per_entry,
            LARGEST=largest,
            BLOCK=block,
        )
        if i == 0 and (int(bad) or k in (0, numel)):
            # Nothing to search: select none (above every key) or all (below every key).
            return Threshold(0x7FFFFFFF if k == 0 else -1, 0, int(bad))
        counts = hist[:256].tolist()
        above = 0
        for digit in range(255, -1, -1):
            if above + counts[digit] >= remaining:
                break
            above += counts[digit]
        remaining -= above
        prefix = (prefix << 8) | digit
    return Threshold(prefix, remaining, 0)


def tie_offsets(
    weight: torch.Tensor,
    auxes: list[torch.Tensor],
    thresholds: list[Threshold],
    *,
    per_entry: bool,
    largest: bool,
) -> torch.Tensor:
    """Per program (and per selection), how many keys equal to the threshold come before it."""
    grid, block = launch_grid(weight)
    n_prog = grid[0] * grid[1]
    ties = torch.empty(len(auxes) * n_prog, dtype=torch.int32, device=weight.device)
    two = len(auxes) == 2
    aux_b = auxes[1] if two else auxes[0]
    _ties_kernel[grid](
        weight,
        auxes[0],
        aux_b,
        ties,
        weight.shape[1],
        weight.stride(0),
        auxes[0].stride(0) if per_entry else 0,
        aux_b.stride(0) if per_entry else 0,
        thresholds[0].key,
        thresholds[-1].key,
        PER_ENTRY=per_entry,
        LARGEST=largest,
        TWO=two,
        BLOCK=block,
    )
    ties = ties.view(len(auxes), n_prog)
    return (ties.cumsum(1, dtype=torch.int32) - ties).flatten()


def write_selection(
    weight: torch.Tensor,
    auxes: list[torch.Tensor],
    thresholds: list[Threshold],
    *,
    per_entry: bool,
    largest: bool,
    out: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last pass: the mask of selection A, or A \\ B and |A ∩ B| per program."""
    grid, block = launch_grid(weight)
    offs = tie_offsets(weight, auxes, thresholds, per_entry=per_entry, largest=largest)
    result, target, stride_out, mode = allocate_output(weight, out)
    two = len(auxes) == 2
    aux_b = auxes[1] if two else auxes[0]
    inter = torch.zeros(grid[0] * grid[1] if two else 1, dtype=torch.int32, device=weight.device)
    a, b = thresholds[0], thresholds[-1]
    _write_kernel[grid](
        weight,
        auxes[0],
        aux_b,
        offs,
        target,
        inter,
        weight.shape[1],
        weight.stride(0),
        auxes[0].stride(0) if per_entry else 0,
        aux_b.stride(0) if per_entry else 0,
        stride_out,
        a.key,
        a.need,
        b.key,
        b.need,
        PER_ENTRY=per_entry,
        LARGEST=largest,
        TWO=two,
        OUT=mode,
        BLOCK=block,
    )
    return result, (inter if two else None)


def matrix_topk_triton(
    weight: torch.Tensor,
    aux: torch.Tensor,
    k: int,
    *,
    per_entry: bool,
    largest: bool = True,
    out: str = "bool",
) -> tuple[torch.Tensor, int]:
    """Launch the radix select; returns (output, number of NaN/negative scores). When that
    number is not 0 nothing was written (the check is in the first pass) and the output is
    empty."""
    th = matrix_threshold(weight, aux, k, per_entry=per_entry, largest=largest)
    if th.bad:
        return torch.empty(0, dtype=torch.bool, device=weight.device), th.bad
    result, _ = write_selection(weight, [aux], [th], per_entry=per_entry, largest=largest, out=out)
    return result, 0


def matrix_topk_ref(scores: torch.Tensor, k: int, *, largest: bool = True) -> torch.Tensor:
    """Reference: one stable sort of the flattened (row-major) scores."""
    order = torch.sort(scores.flatten(), descending=largest, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    return mask.scatter_(0, order[:k], True).reshape(scores.shape)
