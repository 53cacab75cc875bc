"""The one place that chooses an implementation for each pyattr operator.

Every other module calls the functions here and never asks which backend runs. Backends, best
first: the compiled extension ``pyattr._C`` (C++ on CPU, CUDA when it was built with CUDA), then
plain PyTorch. ``backends()`` reports what serves each operator on each device, and
``force_backend("torch")`` pins the PyTorch path (for debugging and for comparing the two).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Iterator

import torch

__all__ = [
    "backends",
    "extension_error",
    "force_backend",
    "selection_backend",
    "staging_dtype",
    "sumsq_gather",
    "syrk_upper_",
]

_lock = threading.Lock()
_ext: object | None = None
_ext_error: str | None = None
_ext_loaded = False
_forced: str | None = None
_warned = False


def _load_extension() -> object | None:
    """Import ``pyattr._C`` once; remember why it failed instead of raising."""
    global _ext, _ext_error, _ext_loaded
    with _lock:
        if _ext_loaded:
            return _ext
        _ext_loaded = True
        if os.environ.get("PYATTR_DISABLE_EXTENSION", "0") == "1":
            _ext_error = "disabled by PYATTR_DISABLE_EXTENSION=1"
            return None
        try:
            _ext = importlib.import_module("pyattr._C")
        except ImportError as exc:
            _ext_error = f"{type(exc).__name__}: {exc}"
        return _ext


def extension_error() -> str | None:
    """Why ``pyattr._C`` is not in use, or ``None`` when it is."""
    _load_extension()
    return _ext_error


def _native_cuda() -> bool:
    ext = _load_extension()
    return ext is not None and bool(ext.build_info()["cuda"])  # type: ignore[attr-defined]


def _use_native(device: torch.device) -> bool:
    if _forced == "torch":
        return False
    if _load_extension() is None:
        _warn_fallback()
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and _native_cuda()


def _warn_fallback() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"pyattr: the native extension pyattr._C is not in use ({_ext_error}); the streaming "
        "covariance runs on the PyTorch fallback (correct, slower). Build it with "
        "`pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Within the block, use ``"torch"`` (plain PyTorch), ``"triton"`` (the Triton selection
    kernels even for CPU tensors: needs ``TRITON_INTERPRET=1``, for tests) or ``None`` (the best
    available)."""
    global _forced
    if name not in (None, "torch", "triton"):
        raise ValueError(f"backend must be 'torch', 'triton' or None, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def backends() -> dict[str, str]:
    """What serves each operator, by device: ``{"covariance[cpu]": "C++ extension", ...}``."""
    ext = _load_extension()
    if ext is None:
        native_cpu = f"PyTorch fallback (pyattr._C not in use: {_ext_error})"
    else:
        info = ext.build_info()  # type: ignore[attr-defined]
        threads = "OpenMP" if info["openmp"] else "single-threaded"
        native_cpu = f"C++ extension pyattr._C ({threads}, {torch.get_num_threads()} threads)"
    if ext is not None and _native_cuda():
        cuda = "CUDA extension pyattr._C (tensor-core MMA for bf16/fp16)"
    elif ext is not None:
        cuda = "PyTorch (cuBLAS); pyattr._C was built without CUDA"
    else:
        cuda = "PyTorch fallback (cuBLAS)"
    selection_cuda = "Triton kernels (pyattr.kernels)"
    selection_cpu = "PyTorch (per-row topk threshold; matrix-wide radix select)"
    if _forced == "triton":
        selection_cuda = selection_cpu = "Triton kernels (forced)"
    if _forced == "torch":
        native_cpu = cuda = selection_cuda = selection_cpu = "PyTorch (forced)"
    return {
        "covariance[cpu]": native_cpu,
        "covariance[cuda]": cuda,
        "selection[cpu]": selection_cpu,
        "selection[cuda]": selection_cuda,
    }


def selection_backend(weight: torch.Tensor, *, per_row: bool) -> str:
    """``"triton"`` or ``"torch"`` for a selection op on ``weight``. Rows wider than the
    register-resident row kernels hold (32768 columns) take the PyTorch path."""
    if _forced == "torch":
        return "torch"
    if _forced == "triton":
        return "triton"
    if not weight.is_cuda:
        return "torch"
    from pyattr.kernels.row_topk import MAX_TRITON_COLS

    return "triton" if not per_row or weight.shape[1] <= MAX_TRITON_COLS else "torch"


# ----------------------------------------------------------------------------------------------
# Streaming covariance primitives. Shapes: x (tokens, d) with unit feature stride; index int64
# (rows,) selecting the counted rows, or None for all; acc (d, d) fp32/fp64, upper triangle.


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
    if _use_native(x.device):
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
    """The PyTorch path: the recursive triangle blocks, as bf16/fp16 MMA with fp32 output on CUDA
    where torch offers it, else after conversion to the accumulator's dtype in token chunks."""
    d = acc.shape[0]
    rows = x if index is None else x.index_select(0, index)
    low_precision = rows.dtype in (torch.bfloat16, torch.float16)
    mixed = rows.is_cuda and low_precision and acc.dtype == torch.float32 and _has_out_dtype()
    chunk = max(256, min(8192, (256 << 20) // max(1, d * acc.element_size())))
    blocks = list(triangle_blocks(0, d))
    for c0 in range(0, rows.shape[0], chunk):
        xc = rows[c0 : c0 + chunk]
        if not mixed:
            xc = xc.to(acc.dtype)
        for r0, r1, k0, k1 in blocks:
            if mixed:
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
