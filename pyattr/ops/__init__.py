"""The one place that chooses an implementation for each pyattr operator.

Every other module calls the functions here and never asks which backend runs.

- Streaming covariance (``pyattr.ops.covariance``): on the CPU the compiled extension
  ``pyattr._C`` (C++), else plain PyTorch; on CUDA cuBLAS GEMMs per triangle block, or the
  extension's WMMA kernel with ``cuda_covariance("wmma")`` / ``PYATTR_CUDA_COVARIANCE=wmma``.
- Selection (``pyattr.ops.selection``): custom ops ``torch.ops.pyattr.{row_topk, matrix_topk,
  nm, set_difference}`` and their in-place ``*_zero_`` twins, served by the Triton kernels of
  ``pyattr.kernels`` on CUDA (imported on first use) and by PyTorch on the CPU.

``backends()`` reports what serves each operator on each device, and ``force_backend("torch")``
pins the PyTorch path (for debugging and for comparing the two).
"""

from __future__ import annotations

from . import selection
from ._dispatch import _use_native as _use_native
from ._dispatch import (
    backends,
    cuda_covariance,
    extension_error,
    force_backend,
    selection_backend,
)
from .covariance import _has_out_dtype as _has_out_dtype
from .covariance import staging_dtype, sumsq_gather, syrk_upper_, triangle_blocks

__all__ = [
    "backends",
    "cuda_covariance",
    "extension_error",
    "force_backend",
    "selection",
    "selection_backend",
    "staging_dtype",
    "sumsq_gather",
    "syrk_upper_",
    "triangle_blocks",
]
