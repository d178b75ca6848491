// The CPU kernels' dense GEMMs: rows W^T (+ b) for x W^T + b, x V_stacked^T, the merged
// groups' weights and the large tasks' updates. float32 goes to oneDNN (the library
// PyTorch ships for its mkldnn ops) when it is there and the GEMM is large enough: on AMD
// EPYC, oneDNN's float32 GEMM runs at 2.1-2.3x the speed of MKL's, which PyTorch's own
// matmul uses, from 64 rows on (benchmarks/bench_cpu_gemm.py). Everything else goes to
// ATen (at::addmm).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace mass_ext {
namespace cpu {

// rows (M, K) and weight (N, K) of one floating dtype, bias (N) of it or none: (M, N).
// Bitwise the same for any thread count: oneDNN computes fixed tiles of the output, each
// on one thread (its own threading may split K, and so the sums, by the thread count).
at::Tensor linear_rows(
    const at::Tensor& rows, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// One product of a grouped GEMM: `count` rows of the input (their ids, or null for the
// first `count` rows in order) times weight^T (contiguous, the input's dtype). Non-owning.
struct RowGroup {
  const at::Tensor* weight;
  const int64_t* rows;
  int64_t count;
};

// For each group, its rows of `rows` (M, K) times its weight^T, + bias, written into the
// same rows of out (M, N), contiguous, rows' dtype); rows in no group are left as they
// are. Groups hold distinct rows and at least one group is given. On the oneDNN path all
// groups' tiles run in one parallel pass, sized from their rows together.
void grouped_linear_rows_into(
    const at::Tensor& rows, const std::vector<RowGroup>& groups,
    const c10::optional<at::Tensor>& bias, at::Tensor& out);

}  // namespace cpu
}  // namespace mass_ext
