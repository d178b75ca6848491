// Routing and the per-slot shrink on CUDA: `route` (residuals, standardised softmax,
// top-k, threshold and weights per row, with the math of routing.h shared with the CPU
// kernel), `shrink` (pre-routed, selected tasks only) and `dense_h` (the dense-over-tasks
// operand of the large-batch expand).
#include <ATen/OpMathType.h>

#include <cmath>
#include <limits>
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

// The weight the slots of one row give task t (summed in slot order); false when no slot
// selects it.
template <typename acc_t>
__device__ __forceinline__ bool task_weight(const int64_t* slot_task, const acc_t* slot_weight,
                                            int64_t k, int64_t t, acc_t& c) {
  c = acc_t(0);
  bool selected = false;
  for (int64_t j = 0; j < k; ++j) {
    if (slot_task[j] == t) {
      c += slot_weight[j];
      selected = true;
    }
  }
  return selected;
}

// kVec adjacent elements of one task's block of a row of H: (z * S) * c, rounded once to
// h_t; exactly 0 for an unselected task (not 0 * z: z may be inf in a row past float
// range), whose z is then not read. kVec > 1: 16-byte loads and stores (the caller
// checked alignment).
template <int kVec, typename acc_t, typename h_t>
__device__ __forceinline__ void write_h(const acc_t* __restrict__ z, const acc_t (&s)[kVec],
                                        acc_t c, bool selected, h_t* __restrict__ H) {
  acc_t v[kVec];
  if (selected) {
    load_n<kVec>(z, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = v[i] * s[i] * c;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = acc_t(0);
  }
  store_n<kVec>(H, v);
}

// S[t, q .. q + kVec) widened to acc_t (any strides: S is small and stays in cache).
template <int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_scales(const scalar_t* __restrict__ S, int64_t S_stride0,
                                            int64_t S_stride1, int64_t t, int64_t q,
                                            acc_t (&s)[kVec]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) s[i] = static_cast<acc_t>(S[t * S_stride0 + (q + i) * S_stride1]);
}

// Row n of H from its z row and its selection, by the block's threads, kVec elements each
// (kVec divides r: a vector never spans two tasks).
template <int kVec, typename scalar_t, typename acc_t, typename h_t>
__device__ __forceinline__ void write_h_row(const acc_t* __restrict__ z_row,
                                            const scalar_t* __restrict__ S, int64_t S_stride0,
                                            int64_t S_stride1, const int64_t* slot_task,
                                            const acc_t* slot_weight, int64_t T, int64_t r,
                                            int64_t k, h_t* __restrict__ H_row) {
  for (int64_t i = int64_t(threadIdx.x) * kVec; i < T * r; i += int64_t(blockDim.x) * kVec) {
    const int64_t t = i / r, q = i - t * r;
    acc_t c, s[kVec];
    const bool selected = task_weight(slot_task, slot_weight, k, t, c);
    load_scales<kVec>(S, S_stride0, S_stride1, t, q, s);
    write_h<kVec>(z_row + i, s, c, selected, H_row + i);
  }
}

// sum over lanes t < n of v (from lane t), added in the order t = 0, 1, ... as a serial loop
// adds them; every lane gets the sum.
template <typename acc_t>
__device__ __forceinline__ acc_t ordered_sum(acc_t v, int64_t n) {
  acc_t sum = 0;
  for (int t = 0; t < n; ++t) sum += __shfl_sync(0xffffffffu, v, t);
  return sum;
}

// select_tasks (routing.h) by one whole warp for T <= 32, lane t holding task t: the same
// rules and each sum in the same order (ordered_sum), with the per-task ldexp, divisions
// and exp side by side instead of one after another on one thread (the serial selection
// is a chain of about a hundred dependent operations per task). Measured on an H200 at
// N = 1: route with h 11.6 -> 10.9 us (gpu_notes.md, runs 5-6): the selection was not
// the kernel's main cost. Writes indices and weights [top_k]; not probs.
template <typename acc_t>
__device__ void select_tasks_warp(const acc_t* logits, int64_t T, int64_t top_k,
                                  acc_t temperature, acc_t threshold, Weighting weighting,
                                  int64_t* indices, acc_t* weights) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int lane = threadIdx.x % kWarp;
  const bool active = lane < T;
  const acc_t logit = active ? logits[lane] : -kInf;  // never NaN (logit_from_residual)
  acc_t p = acc_t(1);
  if (T > 1) {
    const acc_t a = std::fabs(logit);
    const acc_t max_abs = warp_max(active && std::isfinite(a) ? a : acc_t(0));
    int e = 0;
    if (max_abs > acc_t(0)) std::frexp(max_abs, &e);
    const acc_t scaled = active ? std::ldexp(logit, -e) : acc_t(0);
    const acc_t mean = ordered_sum(scaled, T) / acc_t(T);
    const acc_t centred = scaled - mean;
    acc_t var = ordered_sum(centred * centred, T);
    const acc_t centred_sum = ordered_sum(centred, T);
    var -= centred_sum * centred_sum / acc_t(T);
    if (var < acc_t(0)) var = acc_t(0);
    const acc_t divisor = std::sqrt(var / acc_t(T - 1)) + std::ldexp(acc_t(kStandardizeEps), -e);
    const acc_t standardized = (scaled - mean) / divisor;
    // The serial loop's max skips NaN (its '>' is false): so does this one.
    const acc_t max_standardized =
        warp_max(active && !std::isnan(standardized) ? standardized : -kInf);
    const acc_t temp =
        temperature > acc_t(0) ? temperature : std::numeric_limits<acc_t>::denorm_min();
    const acc_t q = active ? std::exp((standardized - max_standardized) / temp) : acc_t(0);
    p = q / ordered_sum(q, T);
  }
  // Repeated arg-max by logit, ties to the lower task: (logit, -t) is a total order, so the
  // butterfly finds the serial scan's choice. Lane j keeps the task of slot j.
  unsigned taken = 0;
  int64_t my_task = -1;
  for (int64_t j = 0; j < top_k; ++j) {
    bool valid = active && !((taken >> lane) & 1u);
    acc_t value = logit;
    int task = lane;
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const bool other_valid = __shfl_xor_sync(0xffffffffu, valid, offset);
      const acc_t other_value = __shfl_xor_sync(0xffffffffu, value, offset);
      const int other_task = __shfl_xor_sync(0xffffffffu, task, offset);
      if (other_valid && (!valid || other_value > value ||
                          (other_value == value && other_task < task))) {
        valid = true;
        value = other_value;
        task = other_task;
      }
    }
    const int64_t best = valid ? task : -1;
    if (best >= 0) taken |= 1u << best;
    if (lane == j) my_task = best;
  }
  // A dropped slot keeps its place (shapes stay fixed); the first slot is never dropped.
  const acc_t my_prob = __shfl_sync(0xffffffffu, p, my_task >= 0 ? int(my_task) : 0);
  if (lane >= 1 && lane < top_k && my_task >= 0 && !(my_prob > threshold)) my_task = -1;
  const bool kept = lane < top_k && my_task >= 0;
  const acc_t kept_prob_sum = ordered_sum(kept ? my_prob : acc_t(0), top_k);
  if (lane < top_k) {
    acc_t w;
    if (!kept) w = acc_t(0);
    else if (weighting == Weighting::kUniform) w = acc_t(1);
    else if (weighting == Weighting::kSoftmax) w = my_prob;
    else w = my_prob / kept_prob_sum;
    indices[lane] = my_task;
    weights[lane] = w;
  }
}

// One block per row (grid-stride over rows). Residuals as in route_rows of the CPU kernel:
// ||x||^2 - ||z_t||^2, the row and its projections redone divided by 2^e when the squares
// of the row overflow or underflow. The selection keeps the CPU kernel's exact rules: on
// one warp for T <= 32 (select_tasks_warp), else serial on one thread (select_tasks,
// O(top_k * T)). Its operands sit in shared memory (when 2 T + 2 k values fit in
// kRouteSharedBytes): dependent reads then cost tens of cycles, not a global round trip.
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
    acc_t* __restrict__ h,                             // [N * top_k, r] or nullptr
    dense_h_t<scalar_t>* __restrict__ H, bool H_vec) { // [N, T * r] or nullptr
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
    if (T <= kWarp) {
      if (warp == 0)
        select_tasks_warp(logits, T, top_k, temperature, threshold, weighting, slot_task,
                          slot_weight);
    } else if (threadIdx.x == 0) {
      select_tasks(logits, probs, T, top_k, temperature, threshold, weighting, slot_task,
                   slot_weight);
    }
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
    if (H) {
      // The dense expand's operand, while the row's z is still in L1/L2 (a separate pass
      // re-read all of z: gpu_notes.md, run 5).
      constexpr int V = Vec<dense_h_t<scalar_t>>::kSize;
      dense_h_t<scalar_t>* H_row = H + n * T * r;
      if (H_vec)
        write_h_row<V>(z_row, S, S_stride0, S_stride1, slot_task, slot_weight, T, r, top_k, H_row);
      else
        write_h_row<1>(z_row, S, S_stride0, S_stride1, slot_task, slot_weight, T, r, top_k, H_row);
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

// Over row_tiles of the (N, T * r / kVec) vectors: each thread owns kVec adjacent columns
// of one task (t, q .. q + kVec), found with one division, and walks rows. kVec > 1 (16-byte
// stores of H) because one 4-byte load per thread kept too few bytes in flight (0.8 TB/s:
// gpu_notes.md, run 5). index_t: int when T * r fits (32-bit division).
template <typename scalar_t, typename acc_t, typename index_t, int kVec>
__global__ void dense_h_kernel(
    const acc_t* __restrict__ z,                                           // [N, T * r]
    const scalar_t* __restrict__ S, int64_t S_stride0, int64_t S_stride1,  // [T, r]
    const int64_t* __restrict__ indices, const acc_t* __restrict__ weights,  // [N, k]
    int64_t N, index_t T, index_t r, int64_t k,
    dense_h_t<scalar_t>* __restrict__ H) {                                 // [N, T * r]
  const index_t row_len = T * r;
  const index_t tq = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (tq >= row_len) return;  // no barrier below
  const index_t t = tq / r, q = tq - t * r;
  acc_t s[kVec];
  load_scales<kVec>(S, S_stride0, S_stride1, t, q, s);
  for (int64_t n = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; n < N;
       n += int64_t(gridDim.y) * blockDim.y) {
    const int64_t* row_indices = indices + n * k;
    for (int64_t j = 0; j < k; ++j) CUDA_KERNEL_ASSERT(row_indices[j] >= -1 && row_indices[j] < T);
    acc_t c;
    const bool selected = task_weight(row_indices, weights + n * k, k, int64_t(t), c);
    const int64_t e = n * row_len + tq;
    write_h<kVec>(z + e, s, c, selected, H + e);
  }
}

}  // namespace

void route(const at::Tensor& rows, const at::Tensor& z, int64_t T, int64_t r, int64_t top_k,
           double temperature, double threshold, Weighting weighting, at::Tensor& indices,
           at::Tensor& weights, at::Tensor& residuals, const at::Tensor& S, at::Tensor& h,
           at::Tensor& H) {
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
    using h_t = dense_h_t<scalar_t>;
    TORCH_CHECK(!H.defined() || H.scalar_type() == dense_h_dtype(rows.scalar_type()),
                "route: H must have dtype ", dense_h_dtype(rows.scalar_type()), ", got ",
                H.scalar_type());
    h_t* H_data = H.defined() ? H.mutable_data_ptr<h_t>() : nullptr;
    const bool H_vec = H.defined() && r % Vec<h_t>::kSize == 0 && vector_aligned(H_data, r) &&
                       vector_aligned(z_data, r);
    const bool needs_S = h.defined() || H.defined();
    route_kernel<scalar_t, acc_t>
        <<<grid_for(N, 1, 1 << 16), kRouteThreads, in_shared ? shared_bytes : 0, stream>>>(
        x, rows.stride(0), N, d_in, x_vec, z_data, z_vec, T, r,
        top_k, static_cast<acc_t>(temperature), static_cast<acc_t>(threshold), weighting,
        indices.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<acc_t>(),
        residuals.defined() ? residuals.mutable_data_ptr<acc_t>() : nullptr,
        in_shared ? nullptr : scratch.mutable_data_ptr<acc_t>(),
        needs_S ? S.const_data_ptr<scalar_t>() : nullptr,
        needs_S ? S.stride(0) : 0, needs_S ? S.stride(1) : 0,
        h.defined() ? h.mutable_data_ptr<acc_t>() : nullptr, H_data, H_vec);
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
  // Room for the thread index times the vector size too.
  const bool narrow = T * r <= INT32_MAX - 64;
  const auto stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(H.scalar_type() == dense_h_dtype(S.scalar_type()), "dense_h: H must have dtype ",
              dense_h_dtype(S.scalar_type()), ", got ", H.scalar_type());
  MASS_EXT_DISPATCH(S.scalar_type(), "mass_ext_dense_h", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using h_t = dense_h_t<scalar_t>;
    constexpr int V = Vec<h_t>::kSize;
    const acc_t* z_data = z.const_data_ptr<acc_t>();
    h_t* H_data = H.mutable_data_ptr<h_t>();
    const bool vec = r % V == 0 && vector_aligned(H_data, r) && vector_aligned(z_data, r);
    auto launch = [&](auto index, auto vec_size) {
      using index_t = decltype(index);
      constexpr int kVec = decltype(vec_size)::value;
      const RowTiles tiles = row_tiles(N, T * r / kVec);
      dense_h_kernel<scalar_t, acc_t, index_t, kVec><<<tiles.grid, tiles.block, 0, stream>>>(
          z_data, S.const_data_ptr<scalar_t>(), S.stride(0), S.stride(1),
          indices.const_data_ptr<int64_t>(), weights.const_data_ptr<acc_t>(), N,
          static_cast<index_t>(T), static_cast<index_t>(r), k, H_data);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using Scalar = std::integral_constant<int, 1>;
    using Vector = std::integral_constant<int, V>;
    if (narrow) vec ? launch(int32_t(0), Vector()) : launch(int32_t(0), Scalar());
    else vec ? launch(int64_t(0), Vector()) : launch(int64_t(0), Scalar());
  });
}

}  // namespace cuda
}  // namespace mass_ext
