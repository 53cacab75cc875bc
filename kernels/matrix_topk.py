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
6·2 + 1 = 13 B/entry, so at most ~23% of copy bandwidth (the goal is 50%).

The alternative, ``PYATTR_MATRIX_SELECT=twopass`` (the switch the benchmark flips): one pass
histograms the top 16 bits of every key into a 65536-bin global histogram (one atomic add per
key; its 256 KB stay in L2), a cumulative sum on the device finds the bucket that holds the
k-th key; a second pass writes the mask of every key above that bucket and compacts the keys
inside it with their flat indices (one atomic per program reserves the slots); an exact
selection of the few candidates (a ``topk`` of ``key·2³² + (2³²−1−index)``, so ties go to the
lower flat index) and a scatter finish the mask. Two reads of W and one mask write: 5 B/entry,
the floor, plus the candidates (8 B each). A bucket spans 1/128 of a binade of the scores, so it
holds a small share of a real matrix; when it holds more than numel/64 keys (heavy ties, such as
a constant matrix) the candidates would outgrow a packed mask and the select falls back to the
radix route above. Risk the GPU run will decide: hot buckets contend on their atomic adds.
For the matrix-wide set difference the two passes give each selection's exact threshold, then
the tie-count and write passes run as above: 2·2 + 2 = 6 reads instead of 10.
"""

from __future__ import annotations

import os

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
    "matrix_select",
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
    BUCKETS: tl.constexpr = False,
):
    """One radix pass (a 256-bin histogram of the digit at SHIFT among keys matching
    ``prefix``), or with BUCKETS the two-pass select's 65536-bin histogram of key >> 15."""
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
    if BUCKETS:
        tl.atomic_add(hist_ptr + (key >> 15), tl.full((BLOCK,), 1, tl.int32), mask=valid)
    else:
        # Keys outside the current prefix go to bin 256+, which the host ignores.
        digit = tl.where(match, (key >> SHIFT) & 255, 256)
        tl.atomic_add(hist_ptr + tl.arange(0, 512), tl.histogram(digit, 512))


@triton.jit
def _store_chunk(
    sel,
    row,
    cols,
    valid,
    w_ptr,
    out_ptr,
    stride_w,
    stride_out,
    n_cols,
    OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``store_selection`` for one chunk of one row (every program here holds one)."""
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
    _store_chunk(sel, row, cols, valid, w_ptr, out_ptr, stride_w, stride_out, n_cols, OUT, BLOCK)


_BUCKETS = 1 << 16  # 31-bit keys: their top 16 bits (key >> 15) name one of 65536 buckets
_CANDIDATE_FLOOR = 4096  # a bucket this full always fits (more only up to numel/64)


@triton.jit
def _bucket_kernel(
    w_ptr,
    aux_ptr,
    out_ptr,
    cand_key_ptr,
    cand_idx_ptr,
    count_ptr,
    n_cols,
    stride_w,
    stride_aux,
    stride_out,
    bucket,
    PER_ENTRY: tl.constexpr,
    LARGEST: tl.constexpr,
    WRITE: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Compact the keys inside ``bucket`` (key, flat index); with WRITE, write the selection of
    every key above it (the candidates are scattered afterwards)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    w = tl.load(w_ptr + row * stride_w + cols, mask=valid, other=0.0).to(tl.float32)
    key, _ = keys_from(w, aux_ptr, row, cols, valid, stride_aux, PER_ENTRY, LARGEST)
    top = key >> 15
    inside = (top == bucket) & valid
    flags = inside.to(tl.int32)
    base = tl.atomic_add(count_ptr, tl.sum(flags, axis=0))
    slot = base + tl.cumsum(flags, axis=0) - 1
    tl.store(cand_key_ptr + slot, key, mask=inside)
    tl.store(cand_idx_ptr + slot, row * n_cols + cols, mask=inside)
    if WRITE:
        sel = (top > bucket) & valid
        _store_chunk(
            sel, row, cols, valid, w_ptr, out_ptr, stride_w, stride_out, n_cols, OUT, BLOCK
        )


def matrix_select() -> str:
    """How a matrix-wide threshold is found: "radix" (four 8-bit histogram passes, the default)
    or "twopass" (a 16-bit bucket histogram and one compaction pass), from
    ``PYATTR_MATRIX_SELECT``: the switch the benchmark flips."""
    method = os.environ.get("PYATTR_MATRIX_SELECT", "radix")
    if method not in ("radix", "twopass"):
        raise ValueError(f"PYATTR_MATRIX_SELECT must be 'radix' or 'twopass', got {method!r}")
    return method


class Bucket:
    """Where the k-th key lies: every key in a bucket above ``index`` is selected, and ``need``
    of the ``size`` keys inside it. ``index`` is -1 (select all) or 65536 (none) at the ends."""

    def __init__(self, index: int, need: int, size: int, bad: int) -> None:
        self.index, self.need, self.size, self.bad = index, need, size, bad


def _bucket(
    weight: torch.Tensor, aux: torch.Tensor, k: int, *, per_entry: bool, largest: bool
) -> Bucket:
    """Pass 1: the bucket histogram and the NaN/negative count; one sync."""
    grid, block = launch_grid(weight)
    hist = torch.zeros(_BUCKETS, dtype=torch.int32, device=weight.device)
    bad = torch.zeros(1, dtype=torch.int32, device=weight.device)
    _hist_kernel[grid](
        weight,
        aux,
        hist,
        bad,
        weight.shape[1],
        weight.stride(0),
        aux.stride(0) if per_entry else 0,
        0,
        SHIFT=0,
        FIRST=True,
        PER_ENTRY=per_entry,
        LARGEST=largest,
        BLOCK=block,
        BUCKETS=True,
    )
    if k in (0, weight.numel()):
        return Bucket(_BUCKETS if k == 0 else -1, 0, 0, int(bad))
    from_top = hist.flip(0).cumsum(0)  # keys in each bucket and above, from the top one
    i = torch.searchsorted(from_top, torch.tensor([k], device=weight.device))
    index = _BUCKETS - 1 - i
    found = torch.cat([bad.long(), index, hist[index].long(), from_top[i]])
    n_bad, index, size, reached = found.tolist()
    return Bucket(index, k - (reached - size), size, n_bad)


def _candidates(
    weight: torch.Tensor,
    aux: torch.Tensor,
    bucket: Bucket,
    *,
    per_entry: bool,
    largest: bool,
    out: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Pass 2: the flat indices of the ``need`` chosen keys of the bucket (ties to the lower
    index), after writing the selection above the bucket when ``out`` is given."""
    grid, block = launch_grid(weight)
    keys = torch.empty(bucket.size, dtype=torch.int32, device=weight.device)
    index = torch.empty(bucket.size, dtype=torch.int32, device=weight.device)
    count = torch.zeros(1, dtype=torch.int32, device=weight.device)
    result, target, stride_out, mode = allocate_output(weight, out or "bool")
    _bucket_kernel[grid](
        weight,
        aux,
        target if out else weight,
        keys,
        index,
        count,
        weight.shape[1],
        weight.stride(0),
        aux.stride(0) if per_entry else 0,
        stride_out if out else 0,
        bucket.index,
        PER_ENTRY=per_entry,
        LARGEST=largest,
        WRITE=out is not None,
        OUT=mode,
        BLOCK=block,
    )
    order = (keys.to(torch.int64) << 32) | (0xFFFFFFFF - index.to(torch.int64))
    chosen = torch.topk(order, bucket.need).values
    return (result if out else None), chosen


def _fits(weight: torch.Tensor, bucket: Bucket) -> bool:
    """The candidates (8 B each) stay below a packed mask, and flat indices fit int32."""
    numel = weight.numel()
    return numel < 2**31 and bucket.size <= max(_CANDIDATE_FLOOR, numel // 64)


def _threshold_of(chosen: torch.Tensor) -> tuple[int, int]:
    """(key, need) of a Threshold from the chosen candidates, largest first."""
    keys = chosen >> 32
    last = keys[-1:]
    key, need = torch.cat([last, (keys == last).sum().view(1)]).tolist()
    return key, need


def _scatter(result: torch.Tensor, weight: torch.Tensor, chosen: torch.Tensor, out: str) -> None:
    """Add the chosen bucket entries (flat indices in ``chosen``'s low 32 bits) to the output."""
    flat = 0xFFFFFFFF - (chosen & 0xFFFFFFFF)
    d_in = weight.shape[1]
    rows, cols = flat // d_in, flat % d_in
    if out == "bool":
        result[rows, cols] = True
    elif out == "zero":
        weight[rows, cols] = 0
    else:
        byte = rows * result.shape[1] + cols // 8
        unique, inverse = torch.unique(byte, return_inverse=True)
        bits = torch.zeros(len(unique), dtype=torch.int32, device=result.device)
        bits.index_add_(0, inverse, (1 << (cols % 8)).to(torch.int32))
        view = result.view(-1)
        view[unique] |= bits.to(torch.uint8)


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
    """The k-th largest key of the recomputed scores: 4 radix passes over W, or 2 with
    ``PYATTR_MATRIX_SELECT=twopass`` (falling back to radix when the bucket is too full)."""
    if matrix_select() == "twopass":
        bucket = _bucket(weight, aux, k, per_entry=per_entry, largest=largest)
        if bucket.bad or bucket.index in (-1, _BUCKETS):
            return Threshold(-1 if bucket.index == -1 else 0x7FFFFFFF, 0, bucket.bad)
        if _fits(weight, bucket):
            _, chosen = _candidates(weight, aux, bucket, per_entry=per_entry, largest=largest)
            return Threshold(*_threshold_of(chosen), 0)
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
    if matrix_select() == "twopass":
        bucket = _bucket(weight, aux, k, per_entry=per_entry, largest=largest)
        if bucket.bad:
            return torch.empty(0, dtype=torch.bool, device=weight.device), bucket.bad
        if _fits(weight, bucket):
            result, chosen = _candidates(
                weight, aux, bucket, per_entry=per_entry, largest=largest, out=out
            )
            _scatter(result, weight, chosen, out)
            return result, 0
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
