"""Streaming activation statistics: token count, squared norms and covariance in one pass.

For the counted rows ``x_t`` (d,) of a layer's input, ``StreamingCovariance`` accumulates

    n = number of counted rows,   sum_sq_j = Σ_t x_tj²,   C = Σ_t x_t x_tᵀ  (d × d, uncentred)

and normalises on read (``sq_norms = sum_sq / n`` is Wanda's ``s``; ``C / n`` feeds ActSVD).

Accuracy. Sums are accumulated in fp32 by default. The covariance of one update is a BLAS/MMA
product with fp32 accumulation (bf16 and fp16 products are exact in fp32), added to the running
fp32 sum. The rounding error of a sum of n products is bounded by ``γ_n Σ_t |x_ti x_tj| ≤
n·u·sqrt(C_ii C_jj)`` with ``u = 2⁻²⁴ ≈ 6e-8``: a worst case of 6% of the diagonal scale at
n = 10⁶ tokens, typically (rounding errors of random sign) ``sqrt(n)·u``, 6e-5 at 10⁶. Use
``accumulate_dtype=torch.float64`` (``u = 2⁻⁵³``) for runs of many millions of tokens or when
small eigenvalues of C matter. ``sum_sq`` is summed in float64 within each update whatever the
accumulator, and it is written onto the covariance's diagonal when the result is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops

__all__ = ["CovarianceStats", "StreamingCovariance", "NonFiniteActivationError"]

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_ACC_DTYPES = (torch.float32, torch.float64)


class NonFiniteActivationError(ValueError):
    """An update contained NaN or Inf (or overflowed the accumulator); nothing was committed."""


@dataclass(frozen=True)
class CovarianceStats:
    """What a ``StreamingCovariance`` has accumulated.

    n: tokens counted. sum_sq: (d,) Σ x², accumulator dtype. covariance: (d, d) symmetric
    Σ x xᵀ with ``sum_sq`` on its diagonal, or ``None`` in diagonal-only mode.
    """

    n: int
    sum_sq: torch.Tensor
    covariance: torch.Tensor | None

    @property
    def sq_norms(self) -> torch.Tensor:
        """(d,) ``sum_sq / n``: Wanda's ``s_j`` (``Stats.sq_norms``, the selection ops'
        ``sq_norms``), whose square root scales ``|W_ij|``."""
        return self.sum_sq / self._count()

    @property
    def mean_sq(self) -> torch.Tensor:
        """The earlier name of ``sq_norms``."""
        return self.sq_norms

    @property
    def mean_covariance(self) -> torch.Tensor:
        """(d, d) ``covariance / n``."""
        if self.covariance is None:
            raise ValueError("this accumulator ran in diagonal-only mode: there is no covariance")
        return self.covariance / self._count()

    def _count(self) -> int:
        if self.n == 0:
            raise ValueError("no tokens were counted, so there is no mean")
        return self.n


class StreamingCovariance:
    """Accumulate ``n``, ``Σx²`` and ``Σ x xᵀ`` over a stream of activations, one pass each.

    Args:
        d: number of features (the layer's input width).
        accumulate_dtype: torch.float32 (default) or torch.float64 for very long runs.
        device: where the sums live; ``None`` takes the device of the first update.
        diagonal_only: keep only ``n`` and ``Σx²`` (Wanda's norms) and skip the d × d matrix.
        buffer_rows: rows gathered before each triangle update of the d × d sum (small updates
            are batched: re-reading an fp32 d × d accumulator for every 512-token sample costs
            more than its arithmetic); 0 updates at once. Buffer memory: buffer_rows × d values.
        name: names this accumulator (e.g. the layer) in error messages.

    Only the upper triangle is updated (half the FLOPs of a GEMM); ``result()`` mirrors it.
    """

    def __init__(
        self,
        d: int,
        *,
        accumulate_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        diagonal_only: bool = False,
        buffer_rows: int = 4096,
        name: str | None = None,
    ) -> None:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be a positive int, got {d!r}")
        if accumulate_dtype not in _ACC_DTYPES:
            raise TypeError(
                f"accumulate_dtype must be torch.float32 or torch.float64, got {accumulate_dtype}"
            )
        if isinstance(buffer_rows, bool) or not isinstance(buffer_rows, int) or buffer_rows < 0:
            raise ValueError(f"buffer_rows must be an int >= 0, got {buffer_rows!r}")
        self.d = d
        self.accumulate_dtype = accumulate_dtype
        self.diagonal_only = diagonal_only
        self.buffer_rows = buffer_rows
        self.name = name
        self.n = 0
        self.device: torch.device | None = None
        self._sum_sq: torch.Tensor | None = None
        self._acc: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self._fill = 0
        if device is not None:
            self._allocate(torch.device(device))

    def __repr__(self) -> str:
        mode = "diagonal" if self.diagonal_only else "covariance"
        return (
            f"StreamingCovariance(d={self.d}, n={self.n}, {mode}, "
            f"accumulate_dtype={self.accumulate_dtype}, device={self.device})"
        )

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        self._sum_sq = torch.zeros(self.d, dtype=self.accumulate_dtype, device=device)
        if not self.diagonal_only:
            self._acc = torch.zeros(self.d, self.d, dtype=self.accumulate_dtype, device=device)

    def _where(self) -> str:
        return f" in {self.name}" if self.name else ""

    def _check(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ValueError(
                f"x must be (tokens, d) or (batch, seq, d){self._where()}, got shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[-1] != self.d:
            raise ValueError(
                f"x must have d={self.d} features in its last dim{self._where()}, got shape "
                f"{tuple(x.shape)}"
            )
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"x must be bf16, fp16, fp32 or fp64{self._where()}, got {x.dtype}")
        if self.device is not None and x.device != self.device:
            raise ValueError(
                f"x is on {x.device} but this accumulator{self._where()} is on {self.device}"
            )
        if token_mask is None:
            return
        if not isinstance(token_mask, torch.Tensor):
            raise TypeError(f"token_mask must be a torch.Tensor, got {type(token_mask).__name__}")
        if token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask must be torch.bool, got {token_mask.dtype}")
        if token_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"token_mask must have x's leading shape {tuple(x.shape[:-1])}, got "
                f"{tuple(token_mask.shape)}"
            )
        if token_mask.device != x.device:
            raise ValueError(f"token_mask is on {token_mask.device} but x is on {x.device}")

    @torch.no_grad()
    def update(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> int:
        """Count the rows of ``x`` where ``token_mask`` is True (all rows when it is None).

        x: (tokens, d) or (batch, seq, d), bf16/fp16/fp32/fp64. token_mask: bool, x.shape[:-1].
        Returns the number of rows counted. Raises ``NonFiniteActivationError`` if they hold
        NaN or Inf; the accumulator is then exactly as it was before the call.
        """
        self._check(x, token_mask)
        if self.device is None:
            self._allocate(x.device)
        x2 = x.detach().reshape(-1, self.d)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        index = None
        rows = x2.shape[0]
        if token_mask is not None:
            flat = token_mask.reshape(-1)
            rows = int(flat.sum())
            if rows < x2.shape[0]:
                index = flat.nonzero().squeeze(1)
        if rows == 0:
            return 0
        staged = not self.diagonal_only and self.buffer_rows > 0 and rows < self.buffer_rows
        if staged:
            out = self._stage(x2.dtype, rows)
            delta = ops.sumsq_gather(x2, index, out)
        else:
            delta = ops.sumsq_gather(x2, index)
        new_sum_sq = self._commit_check(delta)
        if not staged and not self.diagonal_only:
            ops.syrk_upper_(self._acc, x2, index)
        if staged:
            self._fill += rows
        self._sum_sq = new_sum_sq
        self.n += rows
        return rows

    def _stage(self, x_dtype: torch.dtype, rows: int) -> torch.Tensor:
        """The buffer rows that the next ``rows`` counted rows are gathered into."""
        dtype = ops.staging_dtype(x_dtype, self.accumulate_dtype, self.device)
        if self._buffer is not None and self._buffer.dtype != dtype:
            self._flush()
            self._buffer = None
        if self._buffer is None:
            self._buffer = torch.empty(self.buffer_rows, self.d, dtype=dtype, device=self.device)
        if self._fill + rows > self.buffer_rows:
            self._flush()
        return self._buffer[self._fill : self._fill + rows]

    def _commit_check(self, delta: torch.Tensor) -> torch.Tensor:
        new = self._sum_sq + delta.to(self.accumulate_dtype)
        finite = torch.isfinite(new)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten()
            shown = ", ".join(str(int(i)) for i in bad[:8])
            more = f" and {bad.numel() - 8} more" if bad.numel() > 8 else ""
            raise NonFiniteActivationError(
                f"activations{self._where()} contain NaN or Inf (or overflow the "
                f"{self.accumulate_dtype} sums) in features {shown}{more}; this update was not "
                "counted and the accumulator is unchanged"
            )
        return new

    def _flush(self) -> None:
        if self._fill and self._acc is not None and self._buffer is not None:
            ops.syrk_upper_(self._acc, self._buffer[: self._fill])
        self._fill = 0

    def _mirror_(self) -> None:
        """Copy the upper triangle onto the lower one, in panels, and put sum_sq on the diagonal."""
        acc, d = self._acc, self.d
        panel = 1024
        for i in range(0, d, panel):
            j = min(d, i + panel)
            block = acc[i:j, i:j]
            block.copy_(torch.triu(block) + torch.triu(block, 1).T)
            if j < d:
                acc[j:, i:j].copy_(acc[i:j, j:].T)
        acc.diagonal().copy_(self._sum_sq)

    @torch.no_grad()
    def result(self, *, copy: bool = True) -> CovarianceStats:
        """The sums so far. ``copy=False`` returns views into the accumulator (no second d × d
        matrix), valid until the next ``update``/``merge``."""
        if self.device is None:
            self._allocate(torch.device("cpu"))
        self._flush()
        cov = None
        if self._acc is not None:
            self._mirror_()
            cov = self._acc.clone() if copy else self._acc
        sum_sq = self._sum_sq.clone() if copy else self._sum_sq
        return CovarianceStats(n=self.n, sum_sq=sum_sq, covariance=cov)

    @torch.no_grad()
    def merge(self, other: StreamingCovariance) -> StreamingCovariance:
        """Add another accumulator's sums into this one (the statistics are plain sums)."""
        if not isinstance(other, StreamingCovariance):
            raise TypeError(f"can only merge a StreamingCovariance, got {type(other).__name__}")
        if other.d != self.d or other.diagonal_only != self.diagonal_only:
            raise ValueError(
                f"cannot merge d={other.d} (diagonal_only={other.diagonal_only}) into "
                f"d={self.d} (diagonal_only={self.diagonal_only})"
            )
        if other.device is None:
            return self
        if self.device is None:
            self._allocate(other.device)
        other._flush()
        self._sum_sq += other._sum_sq.to(self._sum_sq)
        if self._acc is not None:
            self._acc += other._acc.to(self._acc)
        self.n += other.n
        return self
