// Streaming activation statistics on CUDA.
//
// What: the CUDA implementations of torch.ops.pyattr.sumsq_gather and syrk_upper_ (definitions
// in covariance.cpp): s_j = sum_t x_tj^2 in float64, and acc[i, j] += sum_t x_ti x_tj for
// j >= i over the counted rows t (an int64 index, or all rows).
// How:
//   sumsq_gather: one thread per feature column, a fixed grid of row blocks (so the result does
//     not depend on scheduling); warps read consecutive columns of one row (coalesced), sum in
//     float64, and copy the row into the staging buffer in the same pass; partials are summed
//     by a second, deterministic reduction.
//   syrk_upper_ (bf16/fp16 into fp32): one thread block per 128 x 128 tile (I, J) with J >= I,
//     so only tiles on or above the diagonal are computed (a diagonal tile loads its operand
//     once). Each 32-token step gathers the counted rows of the two column blocks straight from
//     x into shared memory (16-byte loads when aligned), then 8 warps run 16x16x16 tensor-core
//     MMAs (WMMA) with fp32 accumulators: bf16 x bf16 products are exact in fp32, so the result
//     equals an fp32 GEMM of the same values up to summation order. The epilogue adds the tile
//     into acc. When there are fewer tiles than twice the SMs (short, wide inputs of small d),
//     tokens are split over blockIdx.z and the epilogue adds with fp32 atomics (then the
//     summation order, and so the last bits, can vary between runs).
//   Other dtypes (fp32/fp64 inputs, fp64 accumulation) use the blocked cuBLAS path shared with
//   the CPU (syrk_upper_blocked_).
// Trade-off: WMMA with single-stage shared memory is simple and exact but not at the H100's MMA
// peak (no TMA/wgmma, no cp.async pipeline); it halves the FLOPs of a full GEMM and removes the
// fp32 conversion of X, which is where the gain over PyTorch comes from.

#include "covariance.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>

namespace pyattr {
namespace {

using namespace nvcuda;

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

constexpr int kTile = 128;      // C tile is kTile x kTile
constexpr int kStep = 32;       // tokens per shared-memory step
constexpr int kPad = 8;         // shared-memory row padding (bank conflicts)
constexpr int kLds = kTile + kPad;
constexpr int kThreads = 256;   // 8 warps as 2 x 4, each a 64 x 32 sub-tile

template <typename T>
__device__ __forceinline__ double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_double<double>(double v) {
  return v;
}
template <typename T>
__device__ __forceinline__ T from_double(double v) {
  return static_cast<T>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double from_double<double>(double v) {
  return v;
}

template <typename in_t, typename out_t>
__global__ void sumsq_gather_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ idx,
                                    int64_t ld, int64_t n, int64_t d, int64_t rows_per_block,
                                    out_t* __restrict__ out, double* __restrict__ partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < n ? r0 + rows_per_block : n;
  double s = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const double v = to_double(x[(idx ? idx[r] : r) * ld + j]);
    s += v * v;
    if (out) out[r * d + j] = from_double<out_t>(v);
  }
  partial[static_cast<int64_t>(blockIdx.y) * d + j] = s;
}

// Counted rows [k0, k0 + kStep) of columns [c0, c0 + kTile) into s[k][m]; zeros past the ends.
// bf16 and fp16 are moved as raw 16-bit words: only the MMA needs to know which one it is.
template <bool kVec>
__device__ __forceinline__ void load_step(uint16_t* s, const uint16_t* __restrict__ x,
                                          const int64_t* __restrict__ idx, int64_t ld,
                                          int64_t kend, int64_t d, int64_t k0, int64_t c0) {
  if constexpr (kVec) {
    constexpr int kPerRow = kTile / 8;
    for (int v = threadIdx.x; v < kStep * kPerRow; v += kThreads) {
      const int k = v / kPerRow, m = (v % kPerRow) * 8;
      const int64_t t = k0 + k, col = c0 + m;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (t < kend && col < d) {
        val = *reinterpret_cast<const uint4*>(x + (idx ? idx[t] : t) * ld + col);
      }
      *reinterpret_cast<uint4*>(s + k * kLds + m) = val;
    }
  } else {
    for (int e = threadIdx.x; e < kStep * kTile; e += kThreads) {
      const int k = e / kTile, m = e % kTile;
      const int64_t t = k0 + k, col = c0 + m;
      s[k * kLds + m] = (t < kend && col < d) ? x[(idx ? idx[t] : t) * ld + col] : uint16_t{0};
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    syrk_upper_mma_kernel(float* __restrict__ acc, const uint16_t* __restrict__ x,
                          const int64_t* __restrict__ idx, int64_t ld, int64_t n, int64_t d,
                          int tiles_per_side, int64_t tokens_per_split, bool atomic) {
  // Upper-triangle tile (I, J), J >= I, from the linear block index.
  int t = blockIdx.x, I = 0;
  while (t >= tiles_per_side - I) {
    t -= tiles_per_side - I;
    ++I;
  }
  const int J = I + t;
  const bool diag = I == J;
  const int64_t r0 = static_cast<int64_t>(I) * kTile, c0 = static_cast<int64_t>(J) * kTile;

  __shared__ __align__(128) uint16_t sA[kStep * kLds];
  __shared__ __align__(128) uint16_t sB[kStep * kLds];
  __shared__ __align__(128) float sC[kThreads / 32][16 * 16];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(c[i][j], 0.0f);

  const int64_t kbeg = static_cast<int64_t>(blockIdx.z) * tokens_per_split;
  const int64_t kend = kbeg + tokens_per_split < n ? kbeg + tokens_per_split : n;
  const T* fa = reinterpret_cast<const T*>(sA);
  const T* fb = reinterpret_cast<const T*>(diag ? sA : sB);
  for (int64_t k0 = kbeg; k0 < kend; k0 += kStep) {
    load_step<kVec>(sA, x, idx, ld, kend, d, k0, r0);
    if (!diag) load_step<kVec>(sB, x, idx, ld, kend, d, k0, c0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      // A'(m, k) = x[k, r0 + m]: column-major in sA; B'(k, n) = x[k, c0 + n]: row-major in sB.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wmma::load_matrix_sync(a[i], fa + kk * kLds + wm * 64 + i * 16, kLds);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(b[j], fb + kk * kLds + wn * 32 + j * 16, kLds);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
    }
    __syncthreads();
  }

  // Epilogue: each warp stages one 16 x 16 fragment at a time and adds it into acc.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(sC[warp], c[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t gi = r0 + wm * 64 + i * 16 + e / 16;
        const int64_t gj = c0 + wn * 32 + j * 16 + e % 16;
        if (gi < d && gj < d && gj >= gi) {
          float* p = acc + gi * d + gj;
          if (atomic) {
            atomicAdd(p, sC[warp][e]);
          } else {
            *p += sC[warp][e];
          }
        }
      }
      __syncwarp();
    }
  }
}

template <typename T>
void launch_syrk(at::Tensor& acc, const at::Tensor& x, const int64_t* idx, int64_t n) {
  const int64_t d = acc.size(0), ld = x.stride(0);
  const int tiles_per_side = static_cast<int>((d + kTile - 1) / kTile);
  const int64_t tiles = static_cast<int64_t>(tiles_per_side) * (tiles_per_side + 1) / 2;
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, x.get_device());
  int64_t splits = 1;
  while (splits < 16 && tiles * splits < 2 * sms && n >= splits * 2 * 8 * kStep) splits *= 2;
  const int64_t per_split = ((n + splits - 1) / splits + kStep - 1) / kStep * kStep;
  splits = (n + per_split - 1) / per_split;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const bool vec = d % 8 == 0 && ld % 8 == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(splits));
  auto stream = c10::cuda::getCurrentCUDAStream();
  float* ap = acc.data_ptr<float>();
  if (vec) {
    syrk_upper_mma_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        ap, xp, idx, ld, n, d, tiles_per_side, per_split, splits > 1);
  } else {
    syrk_upper_mma_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        ap, xp, idx, ld, n, d, tiles_per_side, per_split, splits > 1);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sumsq_gather_cuda(const at::Tensor& x, const std::optional<at::Tensor>& index,
                             const std::optional<at::Tensor>& out) {
  check_sumsq_args(x, index, out);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = selected_rows(x, index), d = x.size(1);
  if (n == 0 || d == 0) return at::zeros({d}, x.options().dtype(at::kDouble));
  const int64_t rpb = std::max<int64_t>(64, (n + 255) / 256), nblocks = (n + rpb - 1) / rpb;
  at::Tensor partial = at::empty({nblocks, d}, x.options().dtype(at::kDouble));
  const int64_t* idx = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  const dim3 grid(static_cast<unsigned>((d + 255) / 256), static_cast<unsigned>(nblocks));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType out_type = out.has_value() ? out->scalar_type() : x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sumsq_gather", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_type, "sumsq_gather_out", [&] {
      scalar_t* dst = out.has_value() ? out->data_ptr<scalar_t>() : nullptr;
      sumsq_gather_kernel<in_t, scalar_t><<<grid, 256, 0, stream>>>(
          x.data_ptr<in_t>(), idx, x.stride(0), n, d, rpb, dst, partial.data_ptr<double>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0);
}

void syrk_upper_cuda_(at::Tensor& acc, const at::Tensor& x,
                      const std::optional<at::Tensor>& index) {
  check_syrk_args(acc, x, index);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = selected_rows(x, index);
  if (n == 0 || acc.size(0) == 0) return;
  const bool low = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const bool mma_ok = device_attribute(cudaDevAttrComputeCapabilityMajor, x.get_device()) >= 8;
  if (!(low && acc.scalar_type() == at::kFloat && mma_ok)) {
    syrk_upper_blocked_(acc, x, index);
    return;
  }
  const int64_t* idx = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  if (x.scalar_type() == at::kBFloat16) {
    launch_syrk<__nv_bfloat16>(acc, x, idx, n);
  } else {
    launch_syrk<__half>(acc, x, idx, n);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pyattr, CUDA, m) {
  m.impl("sumsq_gather", &sumsq_gather_cuda);
  m.impl("syrk_upper_", &syrk_upper_cuda_);
}

}  // namespace pyattr
