// CPU kernel of _grouped_linear: each row times the weight its group names, + bias, in one
// grouped GEMM (cpu/dense_gemm: oneDNN tiles for float32, so bitwise the same for any
// thread count). RoutedLinear's merged-weight cache calls it with the merged weights of a
// batch's task sets, which it keeps between calls.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/dense_gemm.h"

namespace mass_ext {
namespace cpu {
namespace {

at::Tensor grouped_linear_cpu(const at::Tensor& x, at::TensorList weights,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& groups) {
  const int64_t d_out = check_grouped_linear_inputs(x, weights, bias, groups);
  const int64_t d_in = x.size(-1), N = groups.numel(), G = static_cast<int64_t>(weights.size());
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor out = at::empty({N, d_out}, x.options().dtype(acc_type));
  if (N == 0) return out.to(x.scalar_type()).view(leading_shape_with(x, d_out));
  // Rows by group (a counting sort), each group's rows in ascending order.
  const at::Tensor group_ids = groups.reshape({N}).contiguous();
  const int64_t* ids = group_ids.const_data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows(G);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_INDEX(ids[n] >= 0 && ids[n] < G, "groups must hold indices into weights in "
                      "[0, G) = [0, ", G, "), got ", ids[n], " at row ", n);
    rows[ids[n]].push_back(n);
  }
  std::vector<at::Tensor> weights_acc;
  weights_acc.reserve(G);  // the RowGroups point into it
  std::vector<RowGroup> gemms;
  for (int64_t g = 0; g < G; ++g) {
    if (rows[g].empty()) continue;
    weights_acc.push_back(weights[g].to(acc_type).contiguous());
    gemms.push_back({&weights_acc.back(), rows[g].data(), static_cast<int64_t>(rows[g].size())});
  }
  c10::optional<at::Tensor> bias_acc;
  if (bias.has_value()) bias_acc = bias->to(acc_type);
  grouped_linear_rows_into(as_rows(x, N, d_in).to(acc_type), gemms, bias_acc, out);
  return out.to(x.scalar_type()).view(leading_shape_with(x, d_out));
}

}  // namespace

TORCH_LIBRARY_IMPL(mass_ext, CPU, m) { m.impl("_grouped_linear", &grouped_linear_cpu); }

}  // namespace cpu
}  // namespace mass_ext
