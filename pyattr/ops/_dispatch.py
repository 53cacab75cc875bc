"""Which implementation serves each operator: the extension's state and the forced backend.

Read by the operators in ``pyattr.ops.covariance`` and ``pyattr.ops.selection`` when they run,
never by any other module.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterator

import torch

__all__ = [
    "backends",
    "cuda_covariance",
    "extension_error",
    "force_backend",
    "selection_backend",
]

_lock = threading.Lock()
_ext: object | None = None
_ext_error: str | None = None
_ext_loaded = False
_forced: str | None = None
# On CUDA, the streaming covariance runs as cuBLAS GEMMs per triangle block ("cublas", the
# PyTorch path: near the GEMM's own efficiency by construction) or as the extension's WMMA
# kernel ("wmma"). The GPU suite measures both; PYATTR_CUDA_COVARIANCE=wmma picks the kernel.
_cuda_route = os.environ.get("PYATTR_CUDA_COVARIANCE", "cublas")
_warned = False
# Widest row the register-resident Triton row kernels hold (``kernels/row_topk.py``).
MAX_TRITON_COLS = 32768


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


def _use_native(device: torch.device, *, product: bool = False) -> bool:
    """Whether the extension serves an operator on ``device``; ``product``: the covariance
    product itself, which on CUDA follows the route (``cuda_covariance``)."""
    if _forced == "torch":
        return False
    if _load_extension() is None:
        _warn_fallback()
        return False
    if device.type == "cpu":
        return True
    if product and _cuda_route != "wmma":
        return False
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


@contextlib.contextmanager
def cuda_covariance(route: str) -> Iterator[None]:
    """Within the block, the streaming covariance on CUDA runs as ``"cublas"`` (GEMMs per
    triangle block, the default) or ``"wmma"`` (the extension's kernel; needs it built with
    CUDA). For the benchmark that decides between them."""
    global _cuda_route
    if route not in ("cublas", "wmma"):
        raise ValueError(f"route must be 'cublas' or 'wmma', got {route!r}")
    previous, _cuda_route = _cuda_route, route
    try:
        yield
    finally:
        _cuda_route = previous


def backends() -> dict[str, str]:
    """What serves each operator, by device: ``{"covariance[cpu]": "C++ extension", ...}``."""
    ext = _load_extension()
    if ext is None:
        native_cpu = f"PyTorch fallback (pyattr._C not in use: {_ext_error})"
    else:
        info = ext.build_info()  # type: ignore[attr-defined]
        threads = "OpenMP" if info["openmp"] else "single-threaded"
        native_cpu = f"C++ extension pyattr._C ({threads}, {torch.get_num_threads()} threads)"
    cuda = "cuBLAS GEMM per triangle block (bf16/fp16 in, fp32 accumulated in place)"
    if _cuda_route == "wmma":
        if ext is not None and _native_cuda():
            cuda = "CUDA extension pyattr._C (WMMA kernel, tensor-core MMA for bf16/fp16)"
        else:
            cuda += "; the WMMA kernel was asked for but pyattr._C has no CUDA"
    selection_cuda = "Triton kernels (pyattr.kernels)"
    if not triton_available():
        selection_cuda = "PyTorch (Triton is not installed)"
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


def triton_available() -> bool:
    """Whether Triton can be imported here (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def selection_backend(weight: torch.Tensor, *, per_row: bool) -> str:
    """``"triton"`` or ``"torch"`` for a selection op on ``weight``: Triton for CUDA tensors
    where it is installed, PyTorch otherwise. Rows wider than the register-resident row kernels
    hold (32768 columns) take the PyTorch path."""
    if _forced == "torch":
        return "torch"
    if _forced == "triton":
        return "triton"
    if not weight.is_cuda or not triton_available():
        return "torch"
    return "triton" if not per_row or weight.shape[1] <= MAX_TRITON_COLS else "torch"
