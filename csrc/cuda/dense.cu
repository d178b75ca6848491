// `project` (x against every row of [W; V_stacked] in one memory-bound pass; slower than
// cuBLAS on an H200 at every N measured, so it runs only when forced: launchers.h) and
// `finalize` (base + bias + low-rank terms, rounded once).
#include <ATen/OpMathType.h>

#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace mass_ext {
namespace cuda {
namespace {

constexpr int kProjectWarps = 8;
// Rows of x per pass over a weight row: the row (8 KB at d_in = 4096, bf16) stays in L1
// between passes, so DRAM reads each weight once for up to kProjectMaxRows rows.
constexpr int kProjectRows = 8;
static_assert(kProjectRows >= 1, "");

// One warp per weight row m of the virtual matrix [a; b]: out[n, m] = x_n . row_m for all
// N rows, accumulated in acc_t (float32 for 16-bit inputs: their products are exact in it
// and a long dot product in 16 bits would lose most of its bits).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kProjectWarps * kWarp) project_kernel(
    const scalar_t* __restrict__ x, int64_t x_stride, int64_t N, int64_t d_in, bool x_vec,  // [N, d_in]
    const scalar_t* __restrict__ a, int64_t a_stride, int64_t Ma, bool a_vec,               // [Ma, d_in]
    acc_t* __restrict__ a_out,                                                              // [N, Ma]
    const scalar_t* __restrict__ b, int64_t b_stride, int64_t Mb, bool b_vec,               // [Mb, d_in]
    acc_t* __restrict__ b_out) {                                                            // [N, Mb]
  const int64_t m_all = int64_t(blockIdx.x) * kProjectWarps + threadIdx.x / kWarp;
  if (m_all >= Ma + Mb) return;  // the whole warp; no block-wide barrier below
  const bool in_a = m_all < Ma;
  const int64_t m = in_a ? m_all : m_all - Ma;
  const int64_t M = in_a ? Ma : Mb;
  const scalar_t* row = in_a ? a + m * a_stride : b + m * b_stride;
  acc_t* out = in_a ? a_out : b_out;
  // Decided per matrix, not per launch: the projections of V get the same summation
  // order whether W comes along (routed_linear) or not (route), so both route alike.
  const bool vec = x_vec && (in_a ? a_vec : b_vec);
  const int lane = threadIdx.x % kWarp;
  for (int64_t n0 = 0; n0 < N; n0 += kProjectRows) {
    const int nb = static_cast<int>(N - n0 < kProjectRows ? N - n0 : kProjectRows);
    acc_t acc[kProjectRows];
#pragma unroll
    for (int i = 0; i < kProjectRows; ++i) acc[i] = acc_t(0);
    lane_dots<kProjectRows>(row, x + n0 * x_stride, x_stride, nb, d_in, vec, acc);
#pragma unroll
    for (int i = 0; i < kProjectRows; ++i) {
      const acc_t sum = warp_sum(acc[i]);
      if (lane == 0 && i < nb) out[(n0 + i) * M + m] = sum;
    }
  }
}

// Over row_tiles of (N, d_out / kVec): each thread owns kVec adjacent columns (one 16-byte
// store of out when kVec > 1: few bytes in flight per thread left the scalar kernel at
// 1.7 TB/s, gpu_notes.md run 5) and walks rows; their bias is read once. The sum runs in
// one order for any kVec (base, bias, then each add): both launches give the same bits.
template <typename scalar_t, typename acc_t, int kVec>
__global__ void finalize_kernel(
    const acc_t* __restrict__ base,    // [N, d_out]
    const scalar_t* __restrict__ bias, int64_t bias_stride,  // [d_out] or nullptr
    const acc_t* __restrict__ adds, int64_t num_adds,        // [num_adds, N, d_out]
    int64_t N, int64_t d_out,
    scalar_t* __restrict__ out) {      // [N, d_out]
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (c >= d_out) return;  // no barrier below
  acc_t b[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i)
    b[i] = bias ? static_cast<acc_t>(bias[(c + i) * bias_stride]) : acc_t(0);
  const int64_t total = N * d_out;
  for (int64_t n = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; n < N;
       n += int64_t(gridDim.y) * blockDim.y) {
    const int64_t e = n * d_out + c;
    acc_t v[kVec];
    load_n<kVec>(base + e, v);
    if (bias) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] += b[i];
    }
    for (int64_t a = 0; a < num_adds; ++a) {
      acc_t w[kVec];
      load_n<kVec>(adds + a * total + e, w);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] += w[i];
    }
    store_n<kVec>(out + e, v);
  }
}

}  // namespace

void project(const at::Tensor& rows, const at::Tensor& a, const at::Tensor& b,
             at::Tensor& a_out, at::Tensor& b_out) {
  const int64_t N = rows.size(0), d_in = rows.size(1);
  const int64_t Ma = a.defined() ? a.size(0) : 0, Mb = b.defined() ? b.size(0) : 0;
  const int64_t warps = Ma + Mb;
  if (N == 0 || warps == 0) return;
  const int64_t blocks = (warps + kProjectWarps - 1) / kProjectWarps;
  TORCH_CHECK(blocks <= INT32_MAX, "project: too many weight rows (", warps, ")");
  const auto stream = at::cuda::getCurrentCUDAStream();
  MASS_EXT_DISPATCH(rows.scalar_type(), "mass_ext_project", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = rows.const_data_ptr<scalar_t>();
    const scalar_t* a_ptr = Ma ? a.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b_ptr = Mb ? b.const_data_ptr<scalar_t>() : nullptr;
    const bool d_ok = d_in % Vec<scalar_t>::kSize == 0;
    project_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kProjectWarps * kWarp, 0, stream>>>(
        x, rows.stride(0), N, d_in, d_ok && vector_aligned(x, rows.stride(0)),
        a_ptr, Ma ? a.stride(0) : 0, Ma, Ma && vector_aligned(a_ptr, a.stride(0)),
        Ma ? a_out.mutable_data_ptr<acc_t>() : nullptr,
        b_ptr, Mb ? b.stride(0) : 0, Mb, Mb && vector_aligned(b_ptr, b.stride(0)),
        Mb ? b_out.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void finalize(const at::Tensor& base, const c10::optional<at::Tensor>& bias,
              const at::Tensor& adds, at::Tensor& out) {
  const int64_t N = out.size(0), d_out = out.size(1);
  if (N == 0 || d_out == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  MASS_EXT_DISPATCH(out.scalar_type(), "mass_ext_finalize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = Vec<scalar_t>::kSize;
    const bool has_bias = bias.has_value() && bias->defined();
    const acc_t* base_data = base.const_data_ptr<acc_t>();
    const acc_t* adds_data = adds.defined() ? adds.const_data_ptr<acc_t>() : nullptr;
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    // Rows of d_out are whole vectors (of out, and so of base and adds: acc_t is wider).
    const bool vec = d_out % V == 0 && vector_aligned(base_data, d_out) &&
                     vector_aligned(out_data, d_out) &&
                     (adds_data == nullptr || vector_aligned(adds_data, d_out));
    auto launch = [&](auto vec_size) {
      constexpr int kVec = decltype(vec_size)::value;
      const RowTiles tiles = row_tiles(N, d_out / kVec);
      finalize_kernel<scalar_t, acc_t, kVec><<<tiles.grid, tiles.block, 0, stream>>>(
          base_data, has_bias ? bias->const_data_ptr<scalar_t>() : nullptr,
          has_bias ? bias->stride(0) : 0, adds_data, adds.defined() ? adds.size(0) : 0, N,
          d_out, out_data);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(std::integral_constant<int, V>());
    else launch(std::integral_constant<int, 1>());
  });
}

}  // namespace cuda
}  // namespace mass_ext
