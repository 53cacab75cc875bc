"""Triton kernels, installed as ``pyattr.kernels``. Each op lives in one file beside its plain
PyTorch reference; ``pyattr.ops`` is the only caller that chooses between them.

Imported as a top-level ``kernels``, this folder is not pyattr's: the repository root is on
``sys.path`` (``python -m pytest``, ``python -m benchmarks...`` run from it) and shadows Hugging
Face's package of that name, which transformers 5.25 and newer require and import. The module
then loads that package in its own place, so ``import kernels`` means what transformers expects
wherever it runs from."""

from __future__ import annotations

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _elsewhere() -> importlib.machinery.ModuleSpec | None:
        """The spec of a ``kernels`` on ``sys.path`` outside this repository, or None."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        return importlib.machinery.PathFinder.find_spec("kernels", path)

    _spec = _elsewhere()
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import returns what sys.modules holds at its end
        _spec.loader.exec_module(_module)
