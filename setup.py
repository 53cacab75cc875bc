"""Build pyattr and its native extension ``pyattr._C``.

The C++ sources in ``csrc/`` are always built. The CUDA sources (``csrc/*.cu``) are added when the
installed torch was built with CUDA and a CUDA toolkit (nvcc) is found; ``PYATTR_SKIP_CUDA_BUILD=1``
skips them. Nothing here queries a GPU or the network: build with

    pip install --no-build-isolation -e .

so the extension compiles against the torch that will import it.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only without torch
    sys.exit(
        f"pyattr's build needs torch installed first ({exc}). Install torch, then build with "
        "`pip install --no-build-isolation -e .` (see README.md)."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _with_cuda() -> bool:
    if os.environ.get("PYATTR_SKIP_CUDA_BUILD", "0") == "1":
        print("pyattr: PYATTR_SKIP_CUDA_BUILD=1, building the C++ sources only")
        return False
    if torch.version.cuda is None:
        return False
    if CUDA_HOME is None:
        print("pyattr: torch has CUDA but no CUDA toolkit (nvcc) was found; C++ sources only")
        return False
    return True


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++17", *openmp]
    if _with_cuda():
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Tensor-core MMA on bf16 needs sm_80+; sm_90 for Hopper. PTX for newer devices.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        return CUDAExtension(
            "pyattr._C",
            cpp + cu,
            define_macros=[("PYATTR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=openmp,
        )
    return CppExtension("pyattr._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)


setup(
    # Every subpackage of pyattr/ (found, so a new one is never left out of a wheel), and
    # kernels/ installed as pyattr.kernels (a top-level "kernels" would clash with Hugging
    # Face's package of that name).
    packages=[*find_packages(include=["pyattr", "pyattr.*"]), "pyattr.kernels"],
    package_dir={"pyattr.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
