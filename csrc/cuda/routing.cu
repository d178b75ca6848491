// Routing and the per-slot shrink on CUDA: `route` (residuals, standardised softmax,
// top-k, threshold and weights per row, with the math of routing.h shared with the CPU
// kernel), `shrink` (pre-routed, selected tasks only) and `dense_h` (the dense-over-tasks
// operand of the large-batch expand).
#include <ATen/OpMathType.h>

#include <cmath>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace mass_ext {
namespace cuda {
namespace {

constexpr int kRouteThreads = 256;
// Dynamic shared memory the selection of one row stages in (logits, probs and the chosen
// slots); above it, global scratch. Under the default 48 KB per block (no opt-in), with
// room for the kernel's static shared memory.
constexpr int64_t kRouteSharedBytes = 40 * 1024;

template <typename acc_t>
int64_t route_shared_bytes(int64_t T, int64_t top_k) {
  return top_k * int64_t(sizeof(int64_t)) + (top_k + 2 * T) * int64_t(sizeof(acc_t));
}

// One block per row (grid-stride over rows). Residuals as in route_rows of the CPU kernel:
// ||x||^2 - ||z_t||^2, the row and its projections redone divided by 2^e when the squares
// of the row overflow or underflow. The selection itself (select_tasks) is serial on one
// thread: O(top_k * T) with T small, and it keeps the CPU kernel's exact rules. Its
// operands sit in shared memory (when 2 T + 2 k values fit in kRouteSharedBytes): its
// dependent reads and writes then cost tens of cycles, not a global round trip each.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRouteThreads) route_kernel(
    const scalar_t* __restrict__ x, int64_t x_stride,  // [N, d_in]
    int64_t N, int64_t d_in, bool x_vec,               // x_vec: rows readable by 16 bytes
    const acc_t* __restrict__ z, bool z_vec,           // [N, T * r]; z_vec: tasks by 16 bytes
    int64_t T, int64_t r, int64_t top_k, acc_t temperature, acc_t threshold,
    Weighting weighting,
    // indices, weights and scratch may be written by one thread and read by the others
    // after a barrier: not __restrict__, so that no read goes through the read-only
    // (non-coherent) cache.
    int64_t* indices,                                  // [N, top_k]
    acc_t* weights,                                    // [N, top_k]
    acc_t* __restrict__ residuals,                     // [N, T] or nullptr
    acc_t* scratch,  // [N, 2 T] global (logits, probs), or nullptr: all in shared memory
    const scalar_t* __restrict__ S, int64_t S_stride0, int64_t S_stride1,  // [T, r] or nullptr
    acc_t* __restrict__ h) {                           // [N * top_k, r] or nullptr
  __shared__ acc_t partial[kWarp];
  extern __shared__ __align__(16) unsigned char route_shared[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    // int64 slots first: every part stays aligned for its type.
    int64_t* slot_task;
    acc_t *slot_weight, *logits;
    if (scratch == nullptr) {
      slot_task = reinterpret_cast<int64_t*>(route_shared);
      slot_weight = reinterpret_cast<acc_t*>(slot_task + top_k);
      logits = slot_weight + top_k;
    } else {
      logits = scratch + n * 2 * T;
      slot_task = indices + n * top_k;  // the outputs themselves
      slot_weight = weights + n * top_k;
    }
    acc_t* probs = logits + T;
    const scalar_t* row = x + n * x_stride;
    const acc_t* z_row = z + n * T * r;
    // Sum of squares of the row divided by 2^shift (exact), in one order for both passes:
    // a rescaled row's norm is then exactly 2^-2 shift times the plain one (README,
    // "Magnitudes"). 16-byte loads, unrolled: one row is latency-bound (one scalar load
    // after another took 10.9 us at d_in = 4096, N = 1 on an H200).
    auto sum_squares = [&](int shift) {
      acc_t sum = 0;
      if (x_vec) {
        constexpr int V = Vec<scalar_t>::kSize;
#pragma unroll 4
        for (int64_t i = int64_t(threadIdx.x) * V; i < d_in; i += int64_t(blockDim.x) * V) {
          acc_t v[V];
          load_vec(row + i, v);
#pragma unroll
          for (int el = 0; el < V; ++el) {
            const acc_t u = shift != 0 ? std::ldexp(v[el], -shift) : v[el];
            sum += u * u;
          }
        }
      } else {
#pragma unroll 4
        for (int64_t i = threadIdx.x; i < d_in; i += blockDim.x) {
          const acc_t v = static_cast<acc_t>(row[i]);
          const acc_t u = shift != 0 ? std::ldexp(v, -shift) : v;
          sum += u * u;
        }
      }
      return sum;
    };
    // Its barriers also order the previous row's reads of the shared slots before this
    // row's writes.
    acc_t x_norm2 = block_reduce<false>(sum_squares(0), partial);
    int e = 0;
    if (norm2_needs_rescale(x_norm2)) {  // the same value in every thread: uniform branch
      acc_t max_abs = 0;
      bool finite = true;
      for (int64_t i = threadIdx.x; i < d_in; i += blockDim.x) {
        const acc_t a = std::fabs(static_cast<acc_t>(row[i]));
        if (!std::isfinite(a)) finite = false;
        else max_abs = a > max_abs ? a : max_abs;
      }
      max_abs = block_reduce<true>(max_abs, partial);
      finite = __syncthreads_and(finite);
      e = rescale_exponent(max_abs, finite);
      if (e != 0) x_norm2 = block_reduce<false>(sum_squares(e), partial);
    }
    for (int64_t t = warp; t < T; t += warps) {  // a warp per task
      acc_t z_norm2 = 0;
      if (z_vec) {
        constexpr int V = Vec<acc_t>::kSize;
#pragma unroll 4
        for (int64_t q = int64_t(lane) * V; q < r; q += int64_t(kWarp) * V) {
          acc_t v[V];
          load_vec(z_row + t * r + q, v);
#pragma unroll
          for (int el = 0; el < V; ++el) {
            const acc_t u = e != 0 ? std::ldexp(v[el], -e) : v[el];
            z_norm2 += u * u;
          }
        }
      } else {
#pragma unroll 4
        for (int64_t q = lane; q < r; q += kWarp) {
          const acc_t v = e != 0 ? std::ldexp(z_row[t * r + q], -e) : z_row[t * r + q];
          z_norm2 += v * v;
        }
      }
      z_norm2 = warp_sum(z_norm2);
      if (lane == 0) {
        const acc_t res = scaled_residual(x_norm2, z_norm2, e);
        if (residuals) residuals[n * T + t] = res;
        logits[t] = logit_from_residual(res);
      }
    }
    __syncthreads();  // logits complete
    if (threadIdx.x == 0)
      select_tasks(logits, probs, T, top_k, temperature, threshold, weighting, slot_task,
                   slot_weight);
    __syncthreads();  // the selection is visible to the whole block
    if (scratch == nullptr) {
      for (int64_t j = threadIdx.x; j < top_k; j += blockDim.x) {
        indices[n * top_k + j] = slot_task[j];
        weights[n * top_k + j] = slot_weight[j];
      }
    }
    if (h) {
      for (int64_t i = threadIdx.x; i < top_k * r; i += blockDim.x) {
        const int64_t j = i / r, q = i - j * r;
        const int64_t t = slot_task[j];
        h[n * top_k * r + i] =
            t < 0 ? acc_t(0)
                  : slot_weight[j] * static_cast<acc_t>(S[t * S_stride0 + q * S_stride1]) *
                        z_row[t * r + q];
      }
    }
  }
}

// Few warps per block: at decode sizes the k * r items (e.g. 512) then spread over every
// multiprocessor instead of a third of them.
constexpr int kShrinkWarps = 2;

// One warp per (slot, rank row q): h[slot, q] = w * S_t[q] * (V_t[q] . x_row), reading
// only the selected tasks' V. Index values are checked here, on the device: a host check
// would have to wait for the data (no CUDA graphs); out of range is a device-side assert,
// as for torch's own indexing on CUDA.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kShrinkWarps * kWarp) shrink_kernel(
    const scalar_t* __restrict__ x, int64_t x_stride, int64_t d_in,                 // [N, d_in]
    const scalar_t* __restrict__ V, int64_t V_stride0, int64_t V_stride1, bool vec,  // [T, r, d_in]
    const scalar_t* __restrict__ S, int64_t S_stride0, int64_t S_stride1,           // [T, r]
    const int64_t* __restrict__ indices, const acc_t* __restrict__ weights,          // [N * k]
    int64_t slots, int64_t T, int64_t r, int64_t k,
    acc_t* __restrict__ h) {                                                         // [N * k, r]
  const int lane = threadIdx.x % kWarp;
  const int64_t items = slots * r;
  for (int64_t item = int64_t(blockIdx.x) * kShrinkWarps + threadIdx.x / kWarp; item < items;
       item += int64_t(gridDim.x) * kShrinkWarps) {
    const int64_t slot = item / r, q = item - slot * r;
    const int64_t t = indices[slot];
    CUDA_KERNEL_ASSERT(t >= -1 && t < T);
    if (t < 0 || t >= T) {
      if (lane == 0) h[item] = acc_t(0);
      continue;  // warp-uniform
    }
    acc_t acc[1] = {acc_t(0)};
    lane_dots<1>(V + t * V_stride0 + q * V_stride1, x + (slot / k) * x_stride, x_stride, 1, d_in,
                 vec, acc);
    const acc_t dot = warp_sum(acc[0]);
    if (lane == 0)
      h[item] = weights[slot] * static_cast<acc_t>(S[t * S_stride0 + q * S_stride1]) * dot;
  }
}

// Over row_tiles of the (N, T * r) matrix: each thread owns one column (task t, rank q),
// found with one division, and walks rows. index_t: int when T * r fits (32-bit division).
template <typename scalar_t, typename acc_t, typename h_t, typename index_t>
__global__ void dense_h_kernel(
    const acc_t* __restrict__ z,                                           // [N, T * r]
    const scalar_t* __restrict__ S, int64_t S_stride0, int64_t S_stride1,  // [T, r]
    const int64_t* __restrict__ indices, const acc_t* __restrict__ weights,  // [N, k]
    int64_t N, index_t T, index_t r, int64_t k,
    h_t* __restrict__ H) {                                                 // [N, T * r]
  const index_t row_len = T * r;
  const index_t tq = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tq >= row_len) return;  // no barrier below
  const index_t t = tq / r, q = tq - t * r;
  const acc_t s = static_cast<acc_t>(S[t * S_stride0 + q * S_stride1]);
  for (int64_t n = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; n < N;
       n += int64_t(gridDim.y) * blockDim.y) {
    acc_t c = 0;
    bool selected = false;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t slot = indices[n * k + j];
      CUDA_KERNEL_ASSERT(slot >= -1 && slot < T);
      if (slot == t) {
        c += weights[n * k + j];
        selected = true;
      }
    }
    // Unselected tasks give exactly 0 (not 0 * z: z may be inf in a row past float range).
    const int64_t e = n * row_len + tq;
    H[e] = selected ? static_cast<h_t>(z[e] * s * c) : static_cast<h_t>(0);
  }
}

}  // namespace

void route(const at::Tensor& rows, const at::Tensor& z, int64_t T, int64_t r, int64_t top_k,
           double temperature, double threshold, Weighting weighting, at::Tensor& indices,
           at::Tensor& weights, at::Tensor& residuals, const at::Tensor& S, at::Tensor& h) {
  const int64_t N = rows.size(0), d_in = rows.size(1);
  if (N == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  MASS_EXT_DISPATCH(rows.scalar_type(), "mass_ext_route", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t shared_bytes = route_shared_bytes<acc_t>(T, top_k);
    const bool in_shared = shared_bytes <= kRouteSharedBytes;
    at::Tensor scratch;
    if (!in_shared) scratch = at::empty({N, 2 * T}, z.options());
    const scalar_t* x = rows.const_data_ptr<scalar_t>();
    const acc_t* z_data = z.const_data_ptr<acc_t>();
    const bool x_vec = d_in % Vec<scalar_t>::kSize == 0 && vector_aligned(x, rows.stride(0));
    const bool z_vec = r % Vec<acc_t>::kSize == 0 && vector_aligned(z_data, r);
    route_kernel<scalar_t, acc_t>
        <<<grid_for(N, 1, 1 << 16), kRouteThreads, in_shared ? shared_bytes : 0, stream>>>(
        x, rows.stride(0), N, d_in, x_vec, z_data, z_vec, T, r,
        top_k, static_cast<acc_t>(temperature), static_cast<acc_t>(threshold), weighting,
        indices.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<acc_t>(),
        residuals.defined() ? residuals.mutable_data_ptr<acc_t>() : nullptr,
        in_shared ? nullptr : scratch.mutable_data_ptr<acc_t>(),
        h.defined() ? S.const_data_ptr<scalar_t>() : nullptr,
        h.defined() ? S.stride(0) : 0, h.defined() ? S.stride(1) : 0,
        h.defined() ? h.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void shrink(const at::Tensor& rows, const at::Tensor& V, const at::Tensor& S,
            const at::Tensor& indices, const at::Tensor& weights, at::Tensor& h) {
  const int64_t slots = indices.numel(), k = indices.size(1), T = V.size(0), r = V.size(1);
  const int64_t d_in = rows.size(1);
  if (slots == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  MASS_EXT_DISPATCH(rows.scalar_type(), "mass_ext_shrink", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = rows.const_data_ptr<scalar_t>();
    const scalar_t* v = V.const_data_ptr<scalar_t>();
    const bool vec = d_in % Vec<scalar_t>::kSize == 0 && vector_aligned(x, rows.stride(0)) &&
                     vector_aligned(v, V.stride(0)) && V.stride(1) % Vec<scalar_t>::kSize == 0;
    shrink_kernel<scalar_t, acc_t>
        <<<grid_for(slots * r, kShrinkWarps, 1 << 20), kShrinkWarps * kWarp, 0, stream>>>(
            x, rows.stride(0), d_in, v, V.stride(0), V.stride(1), vec, S.const_data_ptr<scalar_t>(),
            S.stride(0), S.stride(1), indices.const_data_ptr<int64_t>(),
            weights.const_data_ptr<acc_t>(), slots, T, r, k, h.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dense_h(const at::Tensor& z, const at::Tensor& S, const at::Tensor& indices,
             const at::Tensor& weights, at::Tensor& H) {
  const int64_t N = H.size(0), T = S.size(0), r = S.size(1), k = indices.size(1);
  if (N == 0 || T * r == 0) return;
  const RowTiles tiles = row_tiles(N, T * r);
  const bool narrow = T * r <= INT32_MAX;
  const auto stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(H.scalar_type() == S.scalar_type() || H.scalar_type() == at::kFloat,
              "dense_h: H must have S's dtype or float32, got ", H.scalar_type());
  MASS_EXT_DISPATCH(S.scalar_type(), "mass_ext_dense_h", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto* H_data, auto index) {
      using h_t = std::remove_pointer_t<decltype(H_data)>;
      using index_t = decltype(index);
      dense_h_kernel<scalar_t, acc_t, h_t, index_t><<<tiles.grid, tiles.block, 0, stream>>>(
          z.const_data_ptr<acc_t>(), S.const_data_ptr<scalar_t>(), S.stride(0), S.stride(1),
          indices.const_data_ptr<int64_t>(), weights.const_data_ptr<acc_t>(), N,
          static_cast<index_t>(T), static_cast<index_t>(r), k, H_data);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // float16's H is kept in float32 (its range).
    if (H.scalar_type() == S.scalar_type()) {
      if (narrow) launch(H.mutable_data_ptr<scalar_t>(), int32_t(0));
      else launch(H.mutable_data_ptr<scalar_t>(), int64_t(0));
    } else {
      if (narrow) launch(H.mutable_data_ptr<float>(), int32_t(0));
      else launch(H.mutable_data_ptr<float>(), int64_t(0));
    }
  });
}

}  // namespace cuda
}  // namespace mass_ext
