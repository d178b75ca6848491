// The CPU kernels' dense GEMMs: rows W^T (+ b) for x W^T + b, x V_stacked^T, the merged
// groups' weights and the large tasks' updates. float32 goes to oneDNN (the library
// PyTorch ships for its mkldnn ops) when it is there and the GEMM is large enough: on AMD
// EPYC, oneDNN's float32 GEMM runs at 2.1-2.3x the speed of MKL's, which PyTorch's own
// matmul uses, from 64 rows on (benchmarks/bench_cpu_gemm.py). Everything else goes to
// ATen (at::addmm).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <functional>
#include <vector>

namespace mass_ext {
namespace cpu {

// rows (M, K) and weight (N, K) of one floating dtype, bias (N) of it or none: (M, N).
// Bitwise the same for any thread count: oneDNN computes fixed tiles of the output, each
// on one thread (its own threading may split K, and so the sums, by the thread count).
at::Tensor linear_rows(
    const at::Tensor& rows, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// One product of a grouped GEMM: `count` rows of the shared input (rows[m], or m when
// rows is null) times weight^T (contiguous, (N, K), the input's dtype), plus, when
// extra_weight is given, the rows extra_rows writes times extra_weight^T ((N, K2),
// contiguous); row m lands in row out_rows[m] of the output (out_rows null: the input
// row). Non-owning.
struct RowGroup {
  const at::Tensor* weight;
  const int64_t* rows;
  int64_t count;
  const int64_t* out_rows = nullptr;
  const at::Tensor* extra_weight = nullptr;
  // extra_rows(m0, m1, dst): the second product's input rows [m0, m1) into dst
  // ((m1 - m0, K2), contiguous, the input's dtype).
  std::function<void(int64_t, int64_t, at::Tensor&)> extra_rows = nullptr;
};

// For each group, its input rows times its weight^T, + bias, written into its output rows
// of out ((*, N), contiguous, rows' dtype); rows in no group are left as they are. Output
// rows are distinct across groups and at least one group is given. On the oneDNN path all
// groups' tiles run in one parallel pass, sized from their rows together.
void grouped_linear_rows_into(
    const at::Tensor& rows, const std::vector<RowGroup>& groups,
    const c10::optional<at::Tensor>& bias, at::Tensor& out);

// out[g] = addend + lhs_t[g]^T rhs[g] for every g, float32: lhs_t (G, K, M), rhs (G, K, N),
// addend (M, N), out (G, M, N), all contiguous. Fixed row tiles of each out[g], one
// oneDNN matmul each on one thread (bitwise the same for any thread count), the addend
// summed in its epilogue. Returns false, writing nothing, where this torch lacks oneDNN's
// matmul.
bool batched_products_plus(const at::Tensor& lhs_t, const at::Tensor& rhs,
                           const at::Tensor& addend, at::Tensor& out);

}  // namespace cpu
}  // namespace mass_ext
