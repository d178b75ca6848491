// Device helpers shared by the CUDA kernels: deterministic warp / block reductions,
// 16-byte vector loads, and the per-lane dot products of the memory-bound kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace mass_ext {
namespace cuda {

constexpr int kWarp = 32;

// Every floating dtype the ops take; acc_t = at::opmath_type<scalar_t>.
#define MASS_EXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Butterfly sum: every lane gets the same result, summed in a fixed order (results are
// bitwise reproducible run to run).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Sum (or max) over the block; every thread gets the result. blockDim.x is a multiple of
// 32; `shared` holds >= 32 values. Every thread of the block must call it.
template <bool kMax, typename acc_t>
__device__ __forceinline__ acc_t block_reduce(acc_t v, acc_t* shared) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();  // a previous call may still be reading `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? shared[lane] : acc_t(0);
  return kMax ? warp_max(v) : warp_sum(v);
}

// The element type of H, the dense expand's operand (launchers.h, dense_h): scalar_t, but
// float32 for float16, where w * S * z can pass 65504 while the other paths keep float32.
template <typename scalar_t>
using dense_h_t = std::conditional_t<std::is_same<scalar_t, at::Half>::value, float, scalar_t>;

// Elements of scalar_t in one 16-byte load.
template <typename scalar_t>
struct Vec {
  static constexpr int kSize = 16 / sizeof(scalar_t);
};

// Whether p can be read with 16-byte loads at every multiple of `stride` elements.
template <typename scalar_t>
bool vector_aligned(const scalar_t* p, int64_t stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride % Vec<scalar_t>::kSize == 0;
}

// Vec<scalar_t>::kSize elements from a 16-byte aligned p, widened to acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ p,
                                         acc_t (&out)[Vec<scalar_t>::kSize]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  scalar_t values[Vec<scalar_t>::kSize];
  memcpy(values, &raw, sizeof(raw));
#pragma unroll
  for (int e = 0; e < Vec<scalar_t>::kSize; ++e) out[e] = static_cast<acc_t>(values[e]);
}

// n consecutive elements at p, widened to acc_t: by 16-byte loads when n elements are a
// whole number of them (the caller checked that p is 16-byte aligned), else one by one.
template <int n, typename T, typename acc_t>
__device__ __forceinline__ void load_n(const T* __restrict__ p, acc_t (&out)[n]) {
  constexpr int per = Vec<T>::kSize;
  if constexpr (n % per == 0) {
#pragma unroll
    for (int i = 0; i < n; i += per) {
      acc_t part[per];
      load_vec(p + i, part);
#pragma unroll
      for (int e = 0; e < per; ++e) out[i + e] = part[e];
    }
  } else {
#pragma unroll
    for (int i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i]);
  }
}

// The n values of `in`, each rounded once to T, stored at p: as load_n, by 16 bytes when
// they fill whole 16-byte stores.
template <int n, typename T, typename acc_t>
__device__ __forceinline__ void store_n(T* __restrict__ p, const acc_t (&in)[n]) {
  constexpr int per = Vec<T>::kSize;
  if constexpr (n % per == 0) {
#pragma unroll
    for (int i = 0; i < n; i += per) {
      T values[per];
#pragma unroll
      for (int e = 0; e < per; ++e) values[e] = static_cast<T>(in[i + e]);
      uint4 raw;
      memcpy(&raw, values, sizeof(raw));
      *reinterpret_cast<uint4*>(p + i) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < n; ++i) p[i] = static_cast<T>(in[i]);
  }
}

// This lane's share of the dot products acc[b] += a . x_b, x_b = x + b * x_stride, for
// b < nb <= NB, over i in [0, d_in). The warp's lanes split i (coalesced); `vec` (a, x,
// x_stride and d_in all multiples of 16 bytes) selects 16-byte loads. The caller sums
// acc over the warp. a is read once for all nb rows.
template <int NB, typename scalar_t, typename acc_t>
__device__ __forceinline__ void lane_dots(
    const scalar_t* __restrict__ a,  // [d_in]
    const scalar_t* __restrict__ x,  // [nb, x_stride]
    int64_t x_stride, int nb, int64_t d_in, bool vec, acc_t (&acc)[NB]) {
  const int lane = threadIdx.x % kWarp;
  if (vec) {
    constexpr int V = Vec<scalar_t>::kSize;
#pragma unroll 2
    for (int64_t i = int64_t(lane) * V; i < d_in; i += kWarp * V) {
      acc_t av[V];
      load_vec(a + i, av);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        if (b < nb) {
          acc_t xv[V];
          load_vec(x + b * x_stride + i, xv);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[b] += av[e] * xv[e];
        }
      }
    }
  } else {
    for (int64_t i = lane; i < d_in; i += kWarp) {
      const acc_t av = static_cast<acc_t>(a[i]);
#pragma unroll
      for (int b = 0; b < NB; ++b)
        if (b < nb) acc[b] += av * static_cast<acc_t>(x[b * x_stride + i]);
    }
  }
}

// Blocks for a grid-stride loop over `work` items of `per_block` each: enough to fill the
// GPU, never more than the work (a function of shapes only).
inline int64_t grid_for(int64_t work, int64_t per_block, int64_t max_blocks = 65535) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return blocks < max_blocks ? blocks : max_blocks;
}

// A launch over an (N, cols) matrix with no per-element division (a 64-bit `/` or `%`
// per element cost more than the memory traffic of dense_h and finalize: 2026-11-30,
// benchmarks/results/gpu_profile.md): threadIdx.x and blockIdx.x walk the columns,
// threadIdx.y and blockIdx.y (grid-stride) the rows. Narrow matrices get several rows per
// block. A function of shapes only.
struct RowTiles {
  dim3 grid, block;
};

inline RowTiles row_tiles(int64_t N, int64_t cols, int64_t max_threads = 256) {
  const int64_t warps = (cols + kWarp - 1) / kWarp;
  const int64_t tx = std::min<int64_t>(max_threads, std::max<int64_t>(1, warps) * kWarp);
  const int64_t ty = max_threads / tx;
  const int64_t gx = (cols + tx - 1) / tx;
  const int64_t gy = std::min<int64_t>((N + ty - 1) / ty, 65535);
  TORCH_CHECK(gx <= INT32_MAX, "row_tiles: too many columns (", cols, ")");
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
          dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty))};
}

}  // namespace cuda
}  // namespace mass_ext
