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

from dataclasses import dataclass
from typing import Literal

import torch

from . import ops  # noqa: F401  (registers the torch.ops.pyattr selection operators)
from .counts import count_for

__all__ = [
    "SetDifference",
    "count_for",
    "matrix_topk_mask",
    "nm_mask",
    "set_difference_mask",
    "snip_mask",
    "topk_mask",
    "wanda_mask",
]

Output = Literal["bool", "packed", "zero"]
Granularity = Literal["row", "matrix"]
_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class SetDifference:
    """Sizes of the two top sets and of their intersection, for one weight matrix."""

    size_q: int
    size_p: int
    intersection: int

    @property
    def jaccard(self) -> float:
        """|P ∩ Q| / |P ∪ Q| (1.0 when both sets are empty)."""
        union = self.size_p + self.size_q - self.intersection
        return self.intersection / union if union else 1.0

    @property
    def size(self) -> int:
        """|Q \\ P|: the number of entries in the mask."""
        return self.size_q - self.intersection


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight must be bf16, fp16 or fp32, got {weight.dtype}")
    if weight.stride(1) != 1:
        raise ValueError(f"weight must have unit stride along d_in, got strides {weight.stride()}")


def _statistics(weight: torch.Tensor, stats: torch.Tensor, name: str) -> torch.Tensor:
    """The factor the operators read: √s (d_in,) fp32 from Wanda's s, or G (W's shape) as
    given, after the checks that name what is wrong."""
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
        return stats.to(torch.float32).sqrt()
    if stats.shape != weight.shape:
        raise ValueError(
            f"{name} must be Wanda norms (d_in,) = ({d_in},) or SNIP |grad| sums with the "
            f"weight's shape {tuple(weight.shape)}, got {tuple(stats.shape)}"
        )
    return stats if stats.stride(1) == 1 else stats.contiguous()


def _per_row(granularity: str) -> bool:
    if granularity not in ("row", "matrix"):
        raise ValueError(f"granularity must be 'row' or 'matrix', got {granularity!r}")
    return granularity == "row"


def _check_output(output: str) -> None:
    if output not in ("bool", "packed", "zero"):
        raise ValueError(f"output must be 'bool', 'packed' or 'zero', got {output!r}")


def _raise_bad(count: int, names: str) -> None:
    if count:
        raise ValueError(
            f"{count} scores are NaN or negative: {names} or the weight hold NaN (or negative "
            "|grad| sums); nothing was written"
        )


def _run(op: str, weight: torch.Tensor, factors: list, ints: tuple, output: str, names: str):
    """Call ``torch.ops.pyattr.<op>`` (or its in-place twin), raise on bad scores; returns
    (output, |P ∩ Q| or None)."""
    with torch.no_grad():
        if output == "zero":
            counts = getattr(torch.ops.pyattr, f"{op}_zero_")(weight, *factors, *ints)
            result = weight
        else:
            counts = getattr(torch.ops.pyattr, op)(weight, *factors, *ints, output == "packed")
            result, counts = counts[0], counts[1:]
    counts = counts if isinstance(counts, tuple) else (counts,)
    _raise_bad(int(counts[-1]), names)
    return result, (int(counts[0]) if len(counts) == 2 else None)


def _topk(weight, stats, name, fraction, largest, granularity, output):
    _check_weight(weight)
    factor = _statistics(weight, stats, name)
    _check_output(output)
    per_row = _per_row(granularity)
    k = count_for(fraction, weight.shape[1] if per_row else weight.numel())
    op = "row_topk" if per_row else "matrix_topk"
    return _run(op, weight, [factor], (k, largest), output, name)[0]


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


def topk_mask(
    weight: torch.Tensor,
    stats: torch.Tensor,
    *,
    fraction: float,
    largest: bool = True,
    granularity: Granularity = "row",
    output: Output = "bool",
) -> torch.Tensor:
    """As ``wanda_mask`` for any score method: ``stats`` is the squared per-column factor s
    (d_in,), scored ``|W_ij|·sqrt(s_j)``, or the per-entry factor A (W's shape), scored
    ``|W_ij|·|A_ij|``, told apart by shape (``pyattr.scores`` reads them from calibration)."""
    return _topk(weight, stats, "stats", fraction, largest, granularity, output)


def matrix_topk_mask(
    weight: torch.Tensor,
    stats: torch.Tensor,
    *,
    fraction: float,
    largest: bool = True,
    output: Output = "bool",
) -> torch.Tensor:
    """The ⌊fraction·numel⌋ highest (or lowest) scores of the whole matrix; ``stats`` as in
    ``topk_mask``."""
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
    _check_weight(weight)
    factor = _statistics(weight, stats, "stats")
    _check_output(output)
    if not (isinstance(m, int) and m >= 1 and m & (m - 1) == 0 and m <= 1024):
        raise ValueError(f"m must be a power of two in [1, 1024], got {m!r}")
    if not (isinstance(n, int) and 0 <= n <= m):
        raise ValueError(f"n must be an int in [0, m={m}], got {n!r}")
    if weight.shape[1] % m:
        raise ValueError(f"d_in={weight.shape[1]} is not a multiple of m={m}")
    return _run("nm", weight, [factor], (n, m, largest), output, "stats")[0]


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
    _check_weight(weight)
    factor_q = _statistics(weight, safety, "safety")
    factor_p = _statistics(weight, utility, "utility")
    if factor_q.dim() != factor_p.dim():
        raise ValueError("safety and utility must both be Wanda norms or both SNIP |grad| sums")
    _check_output(output)
    per_row = _per_row(granularity)
    n = weight.shape[1] if per_row else weight.numel()
    kq, kp = count_for(q, n, "q"), count_for(p, n, "p")
    result, inter = _run(
        "set_difference", weight, [factor_q, factor_p], (kq, kp, per_row), output, "safety/utility"
    )
    times = weight.shape[0] if per_row else 1
    return result, SetDifference(size_q=kq * times, size_p=kp * times, intersection=inter)
