// Streaming activation statistics on the CPU (and the device-generic blocked path).
//
// What: for the counted rows x_t of an activation matrix X (tokens x d),
//   sumsq_gather:  s_j = sum_t x_tj^2 in float64 (the Wanda norms, and the diagonal that is
//                  checked for NaN/Inf before anything is committed), optionally copying the
//                  counted rows into a buffer in the same pass;
//   syrk_upper_:   acc[i, j] += sum_t x_ti x_tj for j >= i only (half a GEMM's FLOPs); the caller
//                  mirrors the upper triangle into the lower one when it reads the result.
// How: sumsq_gather is one pass over X, rows split into a fixed number of blocks (so the result
// does not depend on the thread count), each block summed in float64, blocks added in order.
// syrk_upper_ converts/gathers the counted rows to the compute dtype in token chunks (one pass,
// parallel over rows, capped memory), then updates the upper triangle recursively: split the
// columns at the middle, recurse into the two diagonal triangles, and add the off-diagonal
// square block acc[lo:mid, mid:hi] += Xc[:, lo:mid]^T Xc[:, mid:hi] with one BLAS GEMM on a
// strided view of acc. Below 256 columns a diagonal block is one full GEMM.
// Trade-off: the full diagonal blocks compute d*256/2 extra products (6% at d = 4096, so the
// floor is 0.53 of a full GEMM's FLOPs), while most FLOPs run in large square GEMMs near BLAS's
// peak. In a PyTorch prototype of both blockings (2 EPYC cores, 2026-11-23), row panels of the
// same width ran 1.55x one full GEMM at d = 4096, the recursion 1.8-2.1x (panels stream X once per panel; the squares reuse it from cache).

#include "covariance.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace pyattr {

namespace {

template <typename F>
void dispatch_floating(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, what, " must be bf16, fp16, fp32 or fp64, got ", t);
  }
}

bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_index(const at::Tensor& x, const std::optional<at::Tensor>& index) {
  if (!index.has_value()) return;
  const at::Tensor& idx = *index;
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "index must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous(), "index must be a contiguous 1-D tensor, got ",
              idx.sizes());
  TORCH_CHECK(idx.device() == x.device(), "index is on ", idx.device(), " but x is on ",
              x.device());
  if (idx.numel() > 0) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < x.size(0), "index values must lie in [0, ", x.size(0),
                "), got [", lo, ", ", hi, "]");
  }
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (tokens, features), got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "x must have unit stride along features, got ",
              x.strides());
  TORCH_CHECK_TYPE(is_floating(x.scalar_type()), "x must be bf16, fp16, fp32 or fp64, got ",
                   x.scalar_type());
}

// Fixed row blocks for a deterministic reduction: at most 64 partial sums.
int64_t rows_per_block(int64_t n) { return std::max<int64_t>(32, (n + 63) / 64); }

template <typename in_t, typename out_t>
void sumsq_gather_kernel(const at::Tensor& x, const int64_t* idx, int64_t n, out_t* out,
                         double* result) {
  const int64_t d = x.size(1), ld = x.stride(0);
  const in_t* base = x.data_ptr<in_t>();
  const int64_t rpb = rows_per_block(n), nblocks = (n + rpb - 1) / rpb;
  std::vector<double> partial(static_cast<size_t>(nblocks * d), 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* acc = partial.data() + b * d;
      const int64_t r1 = std::min(n, (b + 1) * rpb);
      for (int64_t r = b * rpb; r < r1; ++r) {
        const in_t* src = base + (idx ? idx[r] : r) * ld;
        if (out != nullptr) {
          out_t* dst = out + r * d;
          for (int64_t j = 0; j < d; ++j) {
            const float v = static_cast<float>(src[j]);
            acc[j] += static_cast<double>(v) * v;
            dst[j] = static_cast<out_t>(v);
          }
        } else {
          for (int64_t j = 0; j < d; ++j) {
            const double v = static_cast<double>(static_cast<float>(src[j]));
            acc[j] += v * v;
          }
        }
      }
    }
  });
  at::parallel_for(0, d, 1024, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double s = 0.0;
      for (int64_t b = 0; b < nblocks; ++b) s += partial[b * d + j];
      result[j] = s;
    }
  });
}

template <>
void sumsq_gather_kernel<double, double>(const at::Tensor& x, const int64_t* idx, int64_t n,
                                         double* out, double* result) {
  // fp64 input: keep full precision (the generic kernel squares through float).
  const int64_t d = x.size(1), ld = x.stride(0);
  const double* base = x.data_ptr<double>();
  for (int64_t j = 0; j < d; ++j) result[j] = 0.0;
  for (int64_t r = 0; r < n; ++r) {
    const double* src = base + (idx ? idx[r] : r) * ld;
    for (int64_t j = 0; j < d; ++j) {
      result[j] += src[j] * src[j];
      if (out != nullptr) out[r * d + j] = src[j];
    }
  }
}

template <typename in_t, typename out_t>
void gather_convert_kernel(const at::Tensor& x, const int64_t* idx, int64_t start, int64_t rows,
                           out_t* out) {
  const int64_t d = x.size(1), ld = x.stride(0);
  const in_t* base = x.data_ptr<in_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const in_t* src = base + (idx ? idx[start + r] : start + r) * ld;
      out_t* dst = out + r * d;
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<out_t>(static_cast<double>(src[j]));
    }
  });
}

at::Tensor sumsq_gather_cpu(const at::Tensor& x, const std::optional<at::Tensor>& index,
                            const std::optional<at::Tensor>& out) {
  check_sumsq_args(x, index, out);
  const int64_t n = selected_rows(x, index), d = x.size(1);
  at::Tensor result = at::zeros({d}, x.options().dtype(at::kDouble));
  if (n == 0 || d == 0) return result;
  const int64_t* idx = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  const at::ScalarType out_t = out.has_value() ? out->scalar_type() : x.scalar_type();
  dispatch_floating(x.scalar_type(), "x", [&](auto in_tag) {
    using in_t = decltype(in_tag);
    dispatch_floating(out_t, "out", [&](auto out_tag) {
      using o_t = decltype(out_tag);
      o_t* dst = out.has_value() ? out->data_ptr<o_t>() : nullptr;
      sumsq_gather_kernel<in_t, o_t>(x, idx, n, dst, result.data_ptr<double>());
    });
  });
  return result;
}

void syrk_upper_cpu_(at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& index) {
  check_syrk_args(acc, x, index);
  syrk_upper_blocked_(acc, x, index);
}

}  // namespace

void check_sumsq_args(const at::Tensor& x, const std::optional<at::Tensor>& index,
                      const std::optional<at::Tensor>& out) {
  check_x(x);
  check_index(x, index);
  if (!out.has_value()) return;
  const at::Tensor& o = *out;
  const int64_t n = selected_rows(x, index);
  TORCH_CHECK(o.dim() == 2 && o.size(0) == n && o.size(1) == x.size(1) && o.is_contiguous(),
              "out must be a contiguous (", n, ", ", x.size(1), ") tensor, got ", o.sizes());
  TORCH_CHECK(o.device() == x.device(), "out is on ", o.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(is_floating(o.scalar_type()), "out must be floating, got ", o.scalar_type());
}

void check_syrk_args(const at::Tensor& acc, const at::Tensor& x,
                     const std::optional<at::Tensor>& index) {
  check_x(x);
  check_index(x, index);
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == acc.size(1) && acc.is_contiguous(),
              "acc must be a contiguous square matrix, got ", acc.sizes());
  TORCH_CHECK(acc.size(0) == x.size(1), "acc is ", acc.size(0), " x ", acc.size(1),
              " but x has ", x.size(1), " features");
  TORCH_CHECK_TYPE(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
                   "acc must be fp32 or fp64, got ", acc.scalar_type());
  TORCH_CHECK(acc.device() == x.device(), "acc is on ", acc.device(), " but x is on ", x.device());
}

at::Tensor gather_rows(const at::Tensor& x, const std::optional<at::Tensor>& index, int64_t start,
                       int64_t rows, at::ScalarType dtype) {
  if (!x.is_cpu()) {
    at::Tensor part = index.has_value() ? x.index_select(0, index->narrow(0, start, rows))
                                        : x.narrow(0, start, rows);
    return part.to(dtype).contiguous();
  }
  at::Tensor out = at::empty({rows, x.size(1)}, x.options().dtype(dtype));
  const int64_t* idx = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  dispatch_floating(x.scalar_type(), "x", [&](auto in_tag) {
    using in_t = decltype(in_tag);
    dispatch_floating(dtype, "dtype", [&](auto out_tag) {
      using o_t = decltype(out_tag);
      gather_convert_kernel<in_t, o_t>(x, idx, start, rows, out.data_ptr<o_t>());
    });
  });
  return out;
}

namespace {

// acc[lo:hi, lo:hi] (upper triangle) += xc[:, lo:hi]^T xc[:, lo:hi], recursively.
void syrk_recursive_(at::Tensor& acc, const at::Tensor& xc, int64_t lo, int64_t hi) {
  constexpr int64_t kBase = 256, kAlign = 64;
  const int64_t w = hi - lo;
  if (w <= kBase) {
    const at::Tensor cols = xc.narrow(1, lo, w);
    acc.narrow(0, lo, w).narrow(1, lo, w).addmm_(cols.t(), cols);
    return;
  }
  const int64_t mid = lo + (w / 2 + kAlign - 1) / kAlign * kAlign;
  syrk_recursive_(acc, xc, lo, mid);
  acc.narrow(0, lo, mid - lo)
      .narrow(1, mid, hi - mid)
      .addmm_(xc.narrow(1, lo, mid - lo).t(), xc.narrow(1, mid, hi - mid));
  syrk_recursive_(acc, xc, mid, hi);
}

}  // namespace

void syrk_upper_blocked_(at::Tensor& acc, const at::Tensor& x,
                         const std::optional<at::Tensor>& index) {
  const int64_t n = selected_rows(x, index), d = acc.size(0);
  if (n == 0 || d == 0) return;
  const at::ScalarType dtype = acc.scalar_type();
  const int64_t esize = at::elementSize(dtype);
  // Token chunks cap the converted copy at ~256 MB; fp32/fp64 rows already in the compute
  // dtype are used in place (the GEMM reads them with their row stride).
  const int64_t chunk =
      std::clamp<int64_t>((int64_t{256} << 20) / std::max<int64_t>(1, d * esize), 256, 8192);
  const bool in_place = !index.has_value() && x.scalar_type() == dtype;
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t rows = std::min(chunk, n - c0);
    const at::Tensor xc = in_place ? x.narrow(0, c0, rows) : gather_rows(x, index, c0, rows, dtype);
    syrk_recursive_(acc, xc, 0, d);
  }
}

TORCH_LIBRARY(pyattr, m) {
  m.def("sumsq_gather(Tensor x, Tensor? index, Tensor(a!)? out) -> Tensor");
  m.def("syrk_upper_(Tensor(a!) acc, Tensor x, Tensor? index) -> ()");
}

TORCH_LIBRARY_IMPL(pyattr, CPU, m) {
  m.impl("sumsq_gather", &sumsq_gather_cpu);
  m.impl("syrk_upper_", &syrk_upper_cpu_);
}

}  // namespace pyattr
