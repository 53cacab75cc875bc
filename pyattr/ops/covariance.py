"""Streaming covariance primitives: the extension ``pyattr._C`` (C++ on the CPU, CUDA when built
with it) where it is loaded, else PyTorch.

Shapes: x (tokens, d) with unit feature stride; index int64 (rows,) selecting the counted rows,
or None for all; acc (d, d) fp32/fp64, upper triangle.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._dispatch import _load_extension, _use_native

__all__ = ["staging_dtype", "sumsq_gather", "syrk_upper_", "triangle_blocks"]


def sumsq_gather(
    x: torch.Tensor, index: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_t x_tj² over the counted rows, as float64 (d,); copies those rows into ``out`` too.

    One pass over ``x``; the caller checks the result for NaN/Inf before committing anything.
    """
    if _use_native(x.device):
        return torch.ops.pyattr.sumsq_gather(x, index, out)
    rows = x if index is None else x.index_select(0, index)
    if out is not None:
        out.copy_(rows)
    if x.dtype == torch.float64:
        return rows.square().sum(0)
    return rows.float().double().square().sum(0)


def syrk_upper_(acc: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None = None) -> None:
    """``acc[i, j] += Σ_t x_ti x_tj`` for ``j >= i`` over the counted rows (upper triangle)."""
    if x.shape[0] == 0 or (index is not None and index.numel() == 0):
        return
    if _use_native(x.device, product=True):
        torch.ops.pyattr.syrk_upper_(acc, x, index)
        return
    _syrk_upper_torch_(acc, x, index)


def triangle_blocks(lo: int, hi: int, base: int = 256, align: int = 64) -> Iterator[tuple]:
    """Blocks ``(r0, r1, c0, c1)`` whose products cover the upper triangle of ``[lo, hi)²``.

    Recursive split at the (aligned) middle: two diagonal triangles and one square between them;
    diagonal blocks of at most ``base`` columns are computed whole. The native code follows the
    same recursion (``csrc/covariance.cpp``).
    """
    width = hi - lo
    if width <= base:
        yield lo, hi, lo, hi
        return
    mid = lo + (width // 2 + align - 1) // align * align
    yield from triangle_blocks(lo, mid, base, align)
    yield lo, mid, mid, hi
    yield from triangle_blocks(mid, hi, base, align)


def _syrk_upper_torch_(acc: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None) -> None:
    """The PyTorch path, and on CUDA the cuBLAS route: the recursive triangle blocks, each one
    GEMM. On CUDA, bf16/fp16 rows go straight into the tensor cores with fp32 output: added in
    place into the accumulator's block (``addmm(..., out_dtype=float32, out=block)``, beta = 1,
    no temporary) where this torch does that correctly (checked once), else through a temporary
    block. Elsewhere the rows are converted to the accumulator's dtype in token chunks. The
    counted rows are gathered once per update, never per block."""
    d = acc.shape[0]
    rows = x if index is None else x.index_select(0, index)
    low_precision = rows.dtype in (torch.bfloat16, torch.float16)
    mixed = rows.is_cuda and low_precision and acc.dtype == torch.float32 and _has_out_dtype()
    in_place = mixed and _has_addmm_out_dtype()
    chunk = max(256, min(8192, (256 << 20) // max(1, d * acc.element_size())))
    blocks = list(triangle_blocks(0, d))
    for c0 in range(0, rows.shape[0], chunk):
        xc = rows[c0 : c0 + chunk]
        if not mixed:
            xc = xc.to(acc.dtype)
        for r0, r1, k0, k1 in blocks:
            if in_place:
                block = acc[r0:r1, k0:k1]
                torch.addmm(block, xc[:, r0:r1].T, xc[:, k0:k1], out_dtype=torch.float32, out=block)
            elif mixed:
                acc[r0:r1, k0:k1] += torch.mm(xc[:, r0:r1].T, xc[:, k0:k1], out_dtype=torch.float32)
            else:
                acc[r0:r1, k0:k1].addmm_(xc[:, r0:r1].T, xc[:, k0:k1])


_out_dtype_ok: bool | None = None


def _has_out_dtype() -> bool:
    """Whether this torch has ``torch.mm(a, b, out_dtype=torch.float32)`` for bf16 on CUDA."""
    global _out_dtype_ok
    if _out_dtype_ok is None:
        try:
            a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
            _out_dtype_ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError):
            _out_dtype_ok = False
    return _out_dtype_ok


_addmm_ok: bool | None = None


def _has_addmm_out_dtype() -> bool:
    """Whether ``torch.addmm(block, a, b, out_dtype=torch.float32, out=block)`` adds a bf16
    product into a strided fp32 block of a larger matrix, correctly and in place, on CUDA (torch
    2.8+). Checked once on a small case against fp32, the rest of the matrix included."""
    global _addmm_ok
    if _addmm_ok is None:
        try:
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(37, 5, generator=gen).to(device="cuda", dtype=torch.bfloat16)
            b = torch.randn(37, 6, generator=gen).to(device="cuda", dtype=torch.bfloat16)
            acc = torch.ones(9, 13, device="cuda")
            want = acc.clone()
            want[2:7, 4:10] += a.float().T @ b.float()
            block = acc[2:7, 4:10]
            torch.addmm(block, a.T, b, out_dtype=torch.float32, out=block)
            _addmm_ok = bool(torch.allclose(acc, want, rtol=1e-5, atol=1e-5))
        except (TypeError, RuntimeError, NotImplementedError):
            _addmm_ok = False
    return _addmm_ok


def staging_dtype(
    x_dtype: torch.dtype, acc_dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """Dtype in which buffered rows wait for the next triangle update.

    On CUDA, bf16/fp16 rows stay as they are (the MMA consumes them, fp32 accumulation); on the
    CPU they are converted once, when gathered, to the accumulator's dtype that BLAS consumes.
    """
    low = x_dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and low and acc_dtype == torch.float32:
        return x_dtype
    return acc_dtype


# Register torch.ops.pyattr.* as soon as pyattr is imported (a missing extension is reported on
# first use, with the fallback it falls back to), with fake implementations for torch.compile.
if _load_extension() is not None:

    @torch.library.register_fake("pyattr::sumsq_gather")
    def _sumsq_gather_fake(x, index, out):
        return x.new_empty(x.shape[1], dtype=torch.float64)

    @torch.library.register_fake("pyattr::syrk_upper_")
    def _syrk_upper_fake(acc, x, index):
        return None
