// Streaming activation statistics: shared declarations of the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pyattr {

// Rows of `x` (2-D, unit column stride) that an update counts: `index` (int64, 1-D) or all rows.
inline int64_t selected_rows(const at::Tensor& x, const std::optional<at::Tensor>& index) {
  return index.has_value() ? index->numel() : x.size(0);
}

void check_sumsq_args(const at::Tensor& x, const std::optional<at::Tensor>& index,
                      const std::optional<at::Tensor>& out);
void check_syrk_args(const at::Tensor& acc, const at::Tensor& x,
                     const std::optional<at::Tensor>& index);

// Upper-triangle update of `acc` by row panels through the device's BLAS, converting and
// gathering `x` in token chunks: the path for fp32/fp64 compute on any device.
void syrk_upper_blocked_(at::Tensor& acc, const at::Tensor& x,
                         const std::optional<at::Tensor>& index);

// Rows `index[start:start+rows]` (or `start:start+rows`) of `x`, converted to `dtype`.
at::Tensor gather_rows(const at::Tensor& x, const std::optional<at::Tensor>& index, int64_t start,
                       int64_t rows, at::ScalarType dtype);

}  // namespace pyattr
