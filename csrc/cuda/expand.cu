// The selected-tasks expand (the pre-routed op at N = 1 by default, any N when forced:
// launchers.h): y[n] += sum over the kept slots j of row n of U_{t_j} h[n*k + j],
// reading only the selected tasks' U_t. For a few rows, once per slot with every load of
// a thread in flight at once (expand_slots_*); for more, each tile of U_t once per block
// of rows, however many of them selected that task (expand_selected_kernel).
#include <ATen/OpMathType.h>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace mass_ext {
namespace cuda {
namespace {

constexpr int kExpandCols = 32;   // output columns per block: one per lane (= kWarp)
constexpr int kExpandRank = 64;   // rank chunk per block (grid.y); partial sums per chunk
constexpr int kExpandRows = 64;   // rows of x per block (grid.z)
constexpr int kExpandThreads = 256;
static_assert(kExpandCols == kWarp, "a column per lane: the h shuffles rely on it");
constexpr int kExpandGroups = kExpandThreads / kExpandCols;  // = warps: rows n = group mod 8

// Block (column tile, rank chunk, row tile). For each task t that a row of the tile
// selected (in task order), the tile U_t[c0:c0+32, q0:q0+64] goes to shared memory, read
// along whichever of its strides is 1 (row- or column-major U_t, or neither), and every
// (row, slot) selecting t adds its dot products. Each partial sum belongs to one thread
// and is reduced in a fixed order: deterministic, no atomics. Out-of-range task ids match
// no t and are skipped (the pre-routed kernels assert on them).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kExpandThreads) expand_selected_kernel(
    const acc_t* __restrict__ h,            // [N * k, r]
    const int64_t* __restrict__ indices,    // [N * k]
    const scalar_t* __restrict__ U, int64_t U_stride0, int64_t U_stride1, int64_t U_stride2,  // [T, d_out, r]
    int64_t N, int64_t T, int64_t r, int64_t k, int64_t d_out,
    acc_t* __restrict__ partial) {          // [ceil(r / kExpandRank), N, d_out]
  // +1: the q-fastest tile load writes a column of `tile`; the padding spreads it over banks.
  __shared__ acc_t tile[kExpandRank][kExpandCols + 1];
  __shared__ acc_t sums[kExpandRows][kExpandCols];
  const int64_t c0 = int64_t(blockIdx.x) * kExpandCols;
  const int64_t q0 = int64_t(blockIdx.y) * kExpandRank;
  const int64_t n0 = int64_t(blockIdx.z) * kExpandRows;
  const int nc = static_cast<int>(d_out - c0 < kExpandCols ? d_out - c0 : kExpandCols);
  const int nq = static_cast<int>(r - q0 < kExpandRank ? r - q0 : kExpandRank);
  const int nn = static_cast<int>(N - n0 < kExpandRows ? N - n0 : kExpandRows);
  const int col = threadIdx.x % kExpandCols, group = threadIdx.x / kExpandCols;
  const bool columns_contiguous = U_stride1 == 1;
  for (int i = threadIdx.x; i < kExpandRows * kExpandCols; i += kExpandThreads)
    sums[i / kExpandCols][i % kExpandCols] = acc_t(0);
  const int64_t* tile_indices = indices + n0 * k;
  for (int64_t t = 0; t < T; ++t) {
    bool used = false;
    for (int64_t s = threadIdx.x; s < nn * k; s += kExpandThreads) used |= tile_indices[s] == t;
    if (!__syncthreads_or(used)) continue;  // also orders the previous task's reads of `tile`
    const scalar_t* U_t = U + t * U_stride0 + c0 * U_stride1 + q0 * U_stride2;
    for (int i = threadIdx.x; i < kExpandRank * kExpandCols; i += kExpandThreads) {
      const int q = columns_contiguous ? i / kExpandCols : i % kExpandRank;
      const int c = columns_contiguous ? i % kExpandCols : i / kExpandRank;
      tile[q][c] = q < nq && c < nc ? static_cast<acc_t>(U_t[c * U_stride1 + q * U_stride2])
                                    : acc_t(0);
    }
    __syncthreads();
    for (int n = group; n < nn; n += kExpandGroups) {  // warp-uniform: group is the warp
      acc_t acc = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = (n0 + n) * k + j;
        if (indices[slot] != t) continue;
        // The slot's 64 h values in two registers per lane (two coalesced loads), handed
        // out by shuffles: no global load inside the loop. Past nq, tile rows are 0.
        const acc_t* h_slot = h + slot * r + q0;
        const acc_t h_lo = col < nq ? h_slot[col] : acc_t(0);
        const acc_t h_hi = col + kWarp < nq ? h_slot[col + kWarp] : acc_t(0);
#pragma unroll
        for (int q = 0; q < kExpandRank; ++q) {
          const acc_t hq = __shfl_sync(0xffffffffu, q < kWarp ? h_lo : h_hi, q % kWarp);
          acc += tile[q][col] * hq;
        }
      }
      sums[n][col] += acc;
    }
    __syncthreads();
  }
  // The last barrier above ordered every update of `sums`.
  acc_t* out = partial + (int64_t(blockIdx.y) * N + n0) * d_out + c0;
  for (int i = threadIdx.x; i < nn * kExpandCols; i += kExpandThreads) {
    const int n = i / kExpandCols, c = i % kExpandCols;
    if (c < nc) out[n * d_out + c] = sums[n][c];
  }
}

// The per-slot kernels write partial[j, n, :] for slot j of row n (0 for a dropped slot or
// an out-of-range task id, which the pre-routed kernels assert on).
constexpr int kSlotThreads = 256;
constexpr int kSlotCols = 64;  // output columns per block of the column-major kernel

// Column-major U_t (U.stride(1) == 1: rank row q of U_t^T holds d_out adjacent columns):
// one block per (64 columns, slot). Thread (column vector cv, rank group g) reads
// U_t[c .. c + V, q] by 16 bytes for its share of q, eight loads in flight (the tile
// chain of expand_selected_kernel moved 8.4 MB in 20.6 us for one row on an H200:
// gpu_notes.md, run 5); the block then adds its rank groups in a fixed order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSlotThreads) expand_slots_columns_kernel(
    const acc_t* __restrict__ h,            // [N * k, r]
    const int64_t* __restrict__ indices,    // [N * k]
    const scalar_t* __restrict__ U, int64_t U_stride0, int64_t U_stride2,  // [T, d_out, r]
    int64_t N, int64_t T, int64_t r, int64_t k, int64_t d_out,
    acc_t* __restrict__ partial) {          // [k, N, d_out]
  constexpr int V = Vec<scalar_t>::kSize;
  constexpr int kColThreads = kSlotCols / V;
  constexpr int kGroups = kSlotThreads / kColThreads;
  static_assert(kSlotCols % V == 0 && kSlotThreads % kColThreads == 0, "");
  __shared__ acc_t sums[kGroups][kSlotCols];
  const int64_t slot = blockIdx.y, n = slot / k, j = slot - n * k;
  const int64_t c0 = int64_t(blockIdx.x) * kSlotCols;
  const int cv = threadIdx.x % kColThreads, g = threadIdx.x / kColThreads;
  const int64_t c = c0 + int64_t(cv) * V;  // d_out is a multiple of V: all V or none
  const int64_t t = indices[slot];
  acc_t acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = acc_t(0);
  if (t >= 0 && t < T && c < d_out) {
    const int64_t share = (r + kGroups - 1) / kGroups;
    const int64_t q_end = r < (g + 1) * share ? r : (g + 1) * share;
    const scalar_t* U_c = U + t * U_stride0 + c;
    const acc_t* h_slot = h + slot * r;
#pragma unroll 8
    for (int64_t q = g * share; q < q_end; ++q) {
      acc_t u[V];
      load_vec(U_c + q * U_stride2, u);
      const acc_t hq = h_slot[q];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += u[e] * hq;
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) sums[g][cv * V + e] = acc[e];
  __syncthreads();
  for (int i = threadIdx.x; i < kSlotCols; i += kSlotThreads) {
    if (c0 + i >= d_out) continue;
    acc_t total = 0;
    for (int group = 0; group < kGroups; ++group) total += sums[group][i];
    partial[(j * N + n) * d_out + c0 + i] = total;
  }
}

// Row-major U_t (U.stride(2) == 1: row c holds r adjacent values): one warp per
// (column c, slot) reads the row by 16 bytes across its lanes, with h alongside.
constexpr int kSlotRowWarps = kSlotThreads / kWarp;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSlotThreads) expand_slots_rows_kernel(
    const acc_t* __restrict__ h,            // [N * k, r]
    const int64_t* __restrict__ indices,    // [N * k]
    const scalar_t* __restrict__ U, int64_t U_stride0, int64_t U_stride1,  // [T, d_out, r]
    int64_t N, int64_t T, int64_t r, int64_t k, int64_t d_out,
    acc_t* __restrict__ partial) {          // [k, N, d_out]
  constexpr int V = Vec<scalar_t>::kSize;
  const int64_t slot = blockIdx.y, n = slot / k, j = slot - n * k;
  const int64_t c = int64_t(blockIdx.x) * kSlotRowWarps + threadIdx.x / kWarp;
  if (c >= d_out) return;  // the whole warp; no block barrier below
  const int lane = threadIdx.x % kWarp;
  const int64_t t = indices[slot];
  acc_t acc = 0;
  if (t >= 0 && t < T) {
    const scalar_t* U_row = U + t * U_stride0 + c * U_stride1;
    const acc_t* h_slot = h + slot * r;
#pragma unroll 4
    for (int64_t q = int64_t(lane) * V; q < r; q += int64_t(kWarp) * V) {
      acc_t u[V], hv[V];
      load_vec(U_row + q, u);
      load_n<V>(h_slot + q, hv);
#pragma unroll
      for (int e = 0; e < V; ++e) acc += u[e] * hv[e];
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) partial[(j * N + n) * d_out + c] = acc;
}

// Launches a per-slot kernel when U's layout allows 16-byte loads; false otherwise.
template <typename scalar_t, typename acc_t>
bool launch_expand_slots(const at::Tensor& h, const at::Tensor& indices, const at::Tensor& U,
                         at::Tensor& partial) {
  constexpr int V = Vec<scalar_t>::kSize;
  const int64_t N = indices.size(0), k = indices.size(1);
  const int64_t T = U.size(0), d_out = U.size(1), r = U.size(2);
  const acc_t* h_data = h.const_data_ptr<acc_t>();
  const scalar_t* u = U.const_data_ptr<scalar_t>();
  const bool aligned = N * k <= 65535 && reinterpret_cast<uintptr_t>(u) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(h_data) % 16 == 0 && U.stride(0) % V == 0;
  const bool columns = aligned && U.stride(1) == 1 && d_out % V == 0 && U.stride(2) % V == 0;
  const bool rows = aligned && U.stride(2) == 1 && r % V == 0 && U.stride(1) % V == 0;
  if (!columns && !rows) return false;
  partial = at::empty({k, N, d_out}, h.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned slots = static_cast<unsigned>(N * k);
  if (columns) {
    const dim3 grid(static_cast<unsigned>((d_out + kSlotCols - 1) / kSlotCols), slots);
    expand_slots_columns_kernel<scalar_t, acc_t><<<grid, kSlotThreads, 0, stream>>>(
        h_data, indices.const_data_ptr<int64_t>(), u, U.stride(0), U.stride(2), N, T, r, k,
        d_out, partial.mutable_data_ptr<acc_t>());
  } else {
    const dim3 grid(static_cast<unsigned>((d_out + kSlotRowWarps - 1) / kSlotRowWarps), slots);
    expand_slots_rows_kernel<scalar_t, acc_t><<<grid, kSlotThreads, 0, stream>>>(
        h_data, indices.const_data_ptr<int64_t>(), u, U.stride(0), U.stride(1), N, T, r, k,
        d_out, partial.mutable_data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

at::Tensor expand_selected(const at::Tensor& h, const at::Tensor& indices, const at::Tensor& U,
                           bool per_slot) {
  const int64_t N = indices.size(0), k = indices.size(1);
  const int64_t T = U.size(0), d_out = U.size(1), r = U.size(2);
  if (per_slot && N > 0 && k > 0 && d_out > 0 && r > 0) {
    at::Tensor partial;
    bool launched = false;
    MASS_EXT_DISPATCH(U.scalar_type(), "mass_ext_expand_slots", [&] {
      launched = launch_expand_slots<scalar_t, at::opmath_type<scalar_t>>(h, indices, U, partial);
    });
    if (launched) return partial;
  }
  const int64_t chunks = (r + kExpandRank - 1) / kExpandRank;
  at::Tensor partial = at::empty({chunks, N, d_out}, h.options());
  const int64_t col_tiles = (d_out + kExpandCols - 1) / kExpandCols;
  const int64_t row_tiles = (N + kExpandRows - 1) / kExpandRows;
  if (N == 0 || d_out == 0) return partial;
  TORCH_CHECK(col_tiles <= INT32_MAX && chunks <= 65535 && row_tiles <= 65535,
              "expand_selected: shape out of range (N = ", N, ", d_out = ", d_out, ", r = ", r, ")");
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(chunks),
                  static_cast<unsigned>(row_tiles));
  const auto stream = at::cuda::getCurrentCUDAStream();
  MASS_EXT_DISPATCH(U.scalar_type(), "mass_ext_expand_selected", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    expand_selected_kernel<scalar_t, acc_t><<<grid, kExpandThreads, 0, stream>>>(
        h.const_data_ptr<acc_t>(), indices.const_data_ptr<int64_t>(), U.const_data_ptr<scalar_t>(),
        U.stride(0), U.stride(1), U.stride(2), N, T, r, k, d_out, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial;
}

}  // namespace cuda
}  // namespace mass_ext
