"""Public selection ops: which weights score highest for safety or utility (DESIGN.md).

``wanda_mask``/``snip_mask`` (per row or per matrix), ``nm_mask`` (N:M groups) and
``set_difference_mask`` (top-q safety minus top-p utility, with the Jaccard counts). Every op
takes the statistics, never a score matrix: scores are recomputed from W inside the kernels.
Statistics: Wanda's ``sq_norms`` is s_j = mean of x_j² over counted tokens, shape (d_in,);
SNIP's ``grad_abs`` is Σ_b |∂L_b/∂W|, W's shape. Counts are k = ⌊fraction·d_in⌋ per row or
⌊fraction·numel⌋ per matrix; ties go to the lower (row-major) index, so every backend returns
the same mask. Outputs: ``"bool"`` (W's shape), ``"packed"`` (uint8, (d_out, ⌈d_in/8⌉), column
8j+b in bit b of byte j) or ``"zero"`` (W with the selected entries set to 0, in place).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import torch

from . import ops
from .kernels.row_topk import pack_bits
from .kernels.scores import scores_ref, wanda_norms
from .kernels.set_difference import SetDifference

__all__ = [
    "SetDifference",
    "matrix_topk_mask",
    "nm_mask",
    "set_difference_mask",
    "snip_mask",
    "wanda_mask",
]

Output = Literal["bool", "packed", "zero"]
Granularity = Literal["row", "matrix"]
_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def count_for(fraction: float, n: int, name: str = "fraction") -> int:
    """k = ⌊fraction·n⌋ for a fraction in [0, 1], in exact integer arithmetic on the decimal the
    float stands for (its shortest repr: 0.29 is 29/100, not 0.28999999999999998), so a count is
    what a person means on every shape: 0.29·100 = 29, and 0.97·(11008·4096) is not one more
    than ⌊0.97·45088768⌋ as a relative tolerance would make it."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {fraction!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    return math.floor(Fraction(repr(float(fraction))) * n)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight must be bf16, fp16 or fp32, got {weight.dtype}")
    if weight.stride(1) != 1:
        raise ValueError(f"weight must have unit stride along d_in, got strides {weight.stride()}")


def _statistics(weight: torch.Tensor, stats: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """(what the kernels read, is_snip): Wanda norms (d_in,) fp32, or G as given."""
    if not isinstance(stats, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(stats).__name__}")
    if stats.device != weight.device:
        raise ValueError(f"{name} is on {stats.device} but weight is on {weight.device}")
    if not stats.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {stats.dtype}")
    d_out, d_in = weight.shape
    if stats.dim() == 1:
        if stats.shape[0] != d_in:
            raise ValueError(
                f"{name}: Wanda norms must have d_in={d_in} entries, got {tuple(stats.shape)}"
            )
        bad = ~(stats >= 0) | torch.isinf(stats)
        if bool(bad.any()):
            raise ValueError(
                f"{name} has {int(bad.sum())} NaN, Inf or negative entries "
                f"(first at feature {int(bad.nonzero()[0])}): squared norms are finite and >= 0"
            )
        return wanda_norms(stats), False
    if stats.shape != weight.shape:
        raise ValueError(
            f"{name} must be Wanda norms (d_in,) = ({d_in},) or SNIP |grad| sums with the "
            f"weight's shape {tuple(weight.shape)}, got {tuple(stats.shape)}"
        )
    if stats.stride(1) != 1:
        stats = stats.contiguous()
    return stats, True


def _per_row(granularity: str) -> bool:
    if granularity not in ("row", "matrix"):
        raise ValueError(f"granularity must be 'row' or 'matrix', got {granularity!r}")
    return granularity == "row"


def _check_output(output: str) -> None:
    if output not in ("bool", "packed", "zero"):
        raise ValueError(f"output must be 'bool', 'packed' or 'zero', got {output!r}")


def _precheck_in_place(weight: torch.Tensor, auxes: list[torch.Tensor], snip: bool) -> None:
    """Before a one-pass kernel zeroes W in place: NaN in W or G (or a negative G) is found
    here, at the cost of one extra read, so that an error never leaves W half edited. (The
    matrix-wide kernels check in their first pass, before anything is written.)"""
    bad = int(torch.isnan(weight).sum())
    if snip:
        bad += sum(int((~(aux >= 0)).sum()) for aux in auxes)
    _raise_bad(bad, "the statistics")


def _raise_bad(count: int, names: str) -> None:
    if count:
        raise ValueError(
            f"{count} scores are NaN or negative: {names} or the weight hold NaN (or negative "
            "|grad| sums); nothing was written"
        )


def _finish(mask: torch.Tensor, weight: torch.Tensor, output: str) -> torch.Tensor:
    """Turn a bool mask from the PyTorch path into the requested output."""
    if output == "bool":
        return mask
    if output == "packed":
        return pack_bits(mask)
    with torch.no_grad():
        return weight.masked_fill_(mask, 0)


def _scores_checked(weight, aux, snip, names) -> torch.Tensor:
    """Scores for the PyTorch path, after the checks the kernels make in their first pass."""
    bad = int((~(aux >= 0)).sum()) if snip else 0
    scores = scores_ref(weight, grad_abs=aux) if snip else scores_ref(weight, norms=aux)
    _raise_bad(bad + int(torch.isnan(scores).sum()), names)
    return scores


def _topk(weight, stats, name, fraction, largest, granularity, output):
    from .kernels import matrix_topk, row_topk

    _check_weight(weight)
    aux, snip = _statistics(weight, stats, name)
    _check_output(output)
    per_row = _per_row(granularity)
    k = count_for(fraction, weight.shape[1] if per_row else weight.numel())
    backend = ops.selection_backend(weight, per_row=per_row)
    if backend == "triton":
        if output == "zero" and per_row:
            _precheck_in_place(weight, [aux], snip)
        launch = row_topk.row_topk_triton if per_row else matrix_topk.matrix_topk_triton
        with torch.no_grad():
            result, bad = launch(weight, aux, k, snip=snip, largest=largest, out=output)
        _raise_bad(bad, name)
        return result
    scores = _scores_checked(weight, aux, snip, name)
    select = row_topk.row_topk_torch if per_row else matrix_topk.matrix_topk_torch
    return _finish(select(scores, k, largest=largest), weight, output)


def wanda_mask(
    weight: torch.Tensor,
    sq_norms: torch.Tensor,
    *,
    fraction: float,
    largest: bool = True,
    granularity: Granularity = "row",
    output: Output = "bool",
) -> torch.Tensor:
    """Select the ⌊fraction·d_in⌋ entries of each row (or ⌊fraction·numel⌋ of the matrix) with
    the largest (``largest=False``: smallest) Wanda score ``|W_ij|·sqrt(s_j)``.

    weight: (d_out, d_in) bf16/fp16/fp32. sq_norms: (d_in,) mean squared activations s.
    """
    return _topk(weight, sq_norms, "sq_norms", fraction, largest, granularity, output)


def snip_mask(
    weight: torch.Tensor,
    grad_abs: torch.Tensor,
    *,
    fraction: float,
    largest: bool = True,
    granularity: Granularity = "row",
    output: Output = "bool",
) -> torch.Tensor:
    """As ``wanda_mask`` with the SNIP score ``|W_ij|·G_ij``; grad_abs: (d_out, d_in) Σ|∂L_b/∂W|."""
    return _topk(weight, grad_abs, "grad_abs", fraction, largest, granularity, output)


def matrix_topk_mask(
    weight: torch.Tensor,
    stats: torch.Tensor,
    *,
    fraction: float,
    largest: bool = True,
    output: Output = "bool",
) -> torch.Tensor:
    """The ⌊fraction·numel⌋ highest (or lowest) scores of the whole matrix; ``stats`` is Wanda's
    sq_norms (d_in,) or SNIP's grad_abs (W's shape), told apart by shape."""
    return _topk(weight, stats, "stats", fraction, largest, "matrix", output)


def nm_mask(
    weight: torch.Tensor,
    stats: torch.Tensor,
    *,
    n: int,
    m: int,
    largest: bool = True,
    output: Output = "bool",
) -> torch.Tensor:
    """In every group of ``m`` consecutive entries of a row, the ``n`` with the largest (or
    smallest) score. 2:4 pruning (Wanda's semi-structured mode) zeroes
    ``nm_mask(w, s, n=2, m=4, largest=False, output="zero")``. ``stats`` as in
    ``matrix_topk_mask``; ``m`` a power of two dividing d_in."""
    from .kernels import nm

    _check_weight(weight)
    aux, snip = _statistics(weight, stats, "stats")
    _check_output(output)
    if not (isinstance(m, int) and m >= 1 and m & (m - 1) == 0 and m <= 1024):
        raise ValueError(f"m must be a power of two in [1, 1024], got {m!r}")
    if not (isinstance(n, int) and 0 <= n <= m):
        raise ValueError(f"n must be an int in [0, m={m}], got {n!r}")
    if weight.shape[1] % m:
        raise ValueError(f"d_in={weight.shape[1]} is not a multiple of m={m}")
    if ops.selection_backend(weight, per_row=False) == "triton":
        if output == "zero":
            _precheck_in_place(weight, [aux], snip)
        with torch.no_grad():
            result, bad = nm.nm_triton(weight, aux, n, m, snip=snip, largest=largest, out=output)
        _raise_bad(bad, "stats")
        return result
    scores = _scores_checked(weight, aux, snip, "stats")
    return _finish(nm.nm_torch(scores, n, m, largest=largest), weight, output)


def set_difference_mask(
    weight: torch.Tensor,
    safety: torch.Tensor,
    utility: torch.Tensor,
    *,
    q: float,
    p: float,
    granularity: Granularity = "row",
    output: Output = "bool",
) -> tuple[torch.Tensor, SetDifference]:
    """The safety-critical region ``top_q(S_safety) \\ top_p(S_utility)`` and the sizes of the
    two top sets and their intersection (``.jaccard``).

    safety/utility: the statistics of the two calibration sets, both Wanda sq_norms (d_in,) or
    both SNIP grad_abs (W's shape). granularity: ``"row"`` (the paper: tops taken per output
    row) or ``"matrix"`` (the released code's option).
    """
    from .kernels import set_difference as sd

    _check_weight(weight)
    aux_q, snip_q = _statistics(weight, safety, "safety")
    aux_p, snip_p = _statistics(weight, utility, "utility")
    if snip_q != snip_p:
        raise ValueError("safety and utility must both be Wanda norms or both SNIP |grad| sums")
    _check_output(output)
    per_row = _per_row(granularity)
    n = weight.shape[1] if per_row else weight.numel()
    kq, kp = count_for(q, n, "q"), count_for(p, n, "p")
    if ops.selection_backend(weight, per_row=per_row) == "triton":
        if output == "zero" and per_row:
            _precheck_in_place(weight, [aux_q, aux_p], snip_q)
        with torch.no_grad():
            result, counts, bad = sd.set_difference_triton(
                weight, aux_q, aux_p, kq, kp, snip=snip_q, per_row=per_row, out=output
            )
        _raise_bad(bad, "safety/utility")
        return result, counts
    sq = _scores_checked(weight, aux_q, snip_q, "safety")
    sp = _scores_checked(weight, aux_p, snip_p, "utility")
    mask, counts = sd.set_difference_torch(sq, sp, kq, kp, per_row=per_row)
    return _finish(mask, weight, output), counts
