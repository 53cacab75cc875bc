"""Triton kernels, installed as ``pyattr.kernels``. Each op lives in one file beside its plain
PyTorch reference; ``pyattr.ops`` is the only caller that chooses between them."""
