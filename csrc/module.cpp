// The Python module pyattr._C. Importing it registers the torch.ops.pyattr.* operators
// (covariance.cpp, and covariance_cuda.cu when built with CUDA); build_info() says what was built.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyattr native operators (registered as torch.ops.pyattr.*)";
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef PYATTR_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
