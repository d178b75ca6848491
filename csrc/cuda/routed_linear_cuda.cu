// CUDA kernels of the three ops (TORCH_LIBRARY_IMPL(mass_ext, CUDA)). Two paths, picked
// from the shapes alone (so a captured CUDA graph replays the same launches; launchers.h
// gives the thresholds and the measurements behind them):
//
// * selected tasks (N * k <= kSelectedSlotsPerTask * T): reads only what the selection
//   needs. The dense part is cuBLAS (or `project`, one memory-bound pass over [W; V], for
//   N <= kProjectMaxRows), routing writes the scaled projections h of the kept slots, and
//   the expand reads only the selected tasks' U_t, once per slot. Pre-routed: the shrink
//   reads only the selected tasks' V_t.
// * dense over tasks (all other shapes): x W^T and x V_stacked^T are cuBLAS GEMMs with float32
//   output (x V_stacked^T never in TF32); routing is one kernel, which also writes the
//   expand's operand H (N, T*r): H = w * S * z for the selected tasks, 0 elsewhere. The
//   expand is one more GEMM, H x U as (T*r, d_out), accumulated into x W^T (T/k times
//   the expand's own FLOPs, but on tensor cores and with no data-dependent sizes;
//   float16 keeps H in float32, beyond its range).
//
// Every path works for any d_in, d_out, r, T, k and layout; no host synchronisation, no
// grid sized from data. MASS_EXT_CUDA_PROJECT_MAX_ROWS / MASS_EXT_CUDA_SELECTED_MAX_ROWS /
// MASS_EXT_CUDA_SLOT_EXPAND_MAX_ROWS move the thresholds (benchmarks and tests run each
// path on the same shapes).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "checks.h"
#include "cuda/launchers.h"

namespace mass_ext {
namespace cuda {
namespace {

// Read on every call: the tests and benchmarks move the thresholds between calls.
int64_t threshold_from_env(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0', name, " must be an integer (a number of rows), got '", value,
                    "'");
  return parsed;
}

struct Plan {
  bool project;   // dense part in `project` (else cuBLAS)
  bool selected;  // expand over the selected tasks only (else dense over T, cuBLAS)
  bool per_slot;  // the selected-tasks expand reads U_t once per slot (expand_selected)
};

// N rows with k slots each over T tasks (shapes only: a captured graph replays the same
// path). The environment variables, when set, force a path by rows (tests, benchmarks).
Plan plan_for(int64_t N, int64_t k, int64_t T) {
  const int64_t selected_rows = N * k <= kSelectedSlotsPerTask * T ? N : 0;
  return {N <= threshold_from_env("MASS_EXT_CUDA_PROJECT_MAX_ROWS", kProjectMaxRows),
          N <= threshold_from_env("MASS_EXT_CUDA_SELECTED_MAX_ROWS", selected_rows),
          N <= threshold_from_env("MASS_EXT_CUDA_SLOT_EXPAND_MAX_ROWS", N)};
}

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
}

// a @ b with float32 accumulation and output for 16-bit inputs (cuBLAS, tensor cores).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b) {
  const auto dtype = a.scalar_type();
  if (dtype == at::kHalf || dtype == at::kBFloat16) return at::mm(a, b, at::kFloat);
  return at::mm(a, b);
}

// z = rows Vs^T for float32 in strict float32, never TF32 whatever torch's matmul
// precision: the residual sqrt(||x||^2 - ||z||^2) cancels, so TF32's ~1e-3 relative error
// in z would route rows unlike the CPU kernel and the small-N `project` path.
at::Tensor projections_fp32(at::Tensor rows, at::Tensor Vs) {
  const int64_t N = rows.size(0), TR = Vs.size(0), d = rows.size(1);
  at::Tensor z = at::empty({N, TR}, rows.options());
  if (N == 0 || TR == 0) return z;
  if (d == 0) return z.zero_();
  // cuBLAS wants unit inner strides and leading dimensions >= d (x may have row stride 0).
  // A single row's stride is never read, but `contiguous()` keeps it (torch ignores the
  // strides of size-1 dims): pass d as its leading dimension instead.
  if (d > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  if (d > 1 && Vs.stride(1) != 1) Vs = Vs.contiguous();
  if (N > 1 && rows.stride(0) < d) rows = rows.contiguous();
  if (TR > 1 && Vs.stride(0) < d) Vs = Vs.contiguous();
  const int64_t ld_rows = N > 1 ? rows.stride(0) : d, ld_Vs = TR > 1 ? Vs.stride(0) : d;
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (N > kMax || TR > kMax || d > kMax || ld_rows > kMax || ld_Vs > kMax) {
    return at::mm(rows, Vs.t()).contiguous();  // beyond cuBLAS's 32-bit sizes
  }
  // Row-major z (N, TR) is column-major z^T (TR, N) = Vs (TR, d) . rows^T (d, N).
  const float alpha = 1.0f, beta = 0.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(TR),
      static_cast<int>(N), static_cast<int>(d), &alpha, Vs.const_data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(ld_Vs), rows.const_data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(ld_rows), &beta, z.mutable_data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(TR), CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
  return z;
}

// V as (T * r, d_in) rows with a unit inner stride (a view when V allows it).
at::Tensor stacked(const at::Tensor& V) {
  at::Tensor Vs = V.reshape({V.size(0) * V.size(1), V.size(2)});
  return Vs.size(1) > 1 && Vs.stride(1) != 1 ? Vs.contiguous() : Vs;
}

at::Tensor unit_inner_stride(const at::Tensor& t) {
  return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

// (x W^T, x V_stacked^T) in the accumulation dtype; either may be skipped (want_* false).
std::pair<at::Tensor, at::Tensor> dense_part(const at::Tensor& rows, const at::Tensor& weight,
                                             const at::Tensor& V, bool want_base, bool want_z,
                                             const Plan& plan) {
  const auto acc = at::toOpMathType(rows.scalar_type());
  at::Tensor base, z;
  if (plan.project) {
    const at::Tensor W = want_base ? unit_inner_stride(weight) : at::Tensor();
    const at::Tensor Vs = want_z ? stacked(V) : at::Tensor();
    if (want_base) base = at::empty({rows.size(0), W.size(0)}, rows.options().dtype(acc));
    if (want_z) z = at::empty({rows.size(0), Vs.size(0)}, rows.options().dtype(acc));
    project(rows, W, Vs, base, z);
  } else {
    // The kernels below index the results as contiguous rows.
    if (want_base) base = mm_acc(rows, weight.t()).contiguous();
    if (want_z) {
      z = rows.scalar_type() == at::kFloat ? projections_fp32(rows, stacked(V))
                                           : mm_acc(rows, stacked(V).t()).contiguous();
    }
  }
  return {base, z};
}

// U as the (T * r, d_out) matrix of the dense expand: a view when each U_t is stored
// column-major (U.transpose(1, 2) contiguous), else one copy.
at::Tensor expand_matrix(const at::Tensor& U) {
  return U.transpose(1, 2).reshape({U.size(0) * U.size(2), U.size(1)});
}

// base += H Ue in place (cuBLAS, beta = 1): the dense expand's product goes straight into
// the accumulation-dtype base, not into a second (N, d_out) buffer that `finalize` reads
// back. base (N, d_out) contiguous (float32; float64 for float64), H (N, T*r) contiguous,
// Ue (T*r, d_out) in H's dtype. float32 operands follow torch's TF32 setting, as at::mm.
void accumulate_expand(const at::Tensor& base, const at::Tensor& H, at::Tensor Ue) {
  const int64_t N = base.size(0), d_out = base.size(1), TR = H.size(1);
  if (N == 0 || d_out == 0 || TR == 0) return;
  if (d_out > 1 && Ue.stride(1) != 1) Ue = Ue.contiguous();
  if (TR > 1 && Ue.stride(0) < d_out) Ue = Ue.contiguous();
  const int64_t ld_U = TR > 1 ? Ue.stride(0) : d_out;  // a single row's stride is never read
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (N > kMax || d_out > kMax || TR > kMax || ld_U > kMax) {
    base.add_(mm_acc(H, Ue));  // beyond cuBLAS's 32-bit sizes
    return;
  }
  const float one_f = 1.0f;
  const double one_d = 1.0;
  const void* one = &one_f;
  cudaDataType operand_type = CUDA_R_32F, out_type = CUDA_R_32F;
  // As at::mm decides: the global setting, unless a NoTF32Guard is active.
  const bool tf32 =
      at::globalContext().allowTF32CuBLAS() && !at::NoTF32Guard::should_disable_tf32();
  cublasComputeType_t compute = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  switch (H.scalar_type()) {
    case at::kBFloat16:
      operand_type = CUDA_R_16BF;
      compute = CUBLAS_COMPUTE_32F;
      break;
    case at::kDouble:
      operand_type = out_type = CUDA_R_64F;
      compute = CUBLAS_COMPUTE_64F;
      one = &one_d;
      break;
    default:
      break;
  }
  TORCH_CHECK(base.scalar_type() == (out_type == CUDA_R_64F ? at::kDouble : at::kFloat) &&
                  base.is_contiguous() && H.is_contiguous() &&
                  Ue.scalar_type() == H.scalar_type(),
              "accumulate_expand: unexpected operands");
  // Row-major base (N, d_out) is column-major base^T (d_out, N) = Ue^T (d_out, TR) . H^T.
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(d_out),
      static_cast<int>(N), static_cast<int>(TR), one, Ue.const_data_ptr(), operand_type,
      static_cast<int>(ld_U), H.const_data_ptr(), operand_type, static_cast<int>(TR), one,
      base.mutable_data_ptr(), out_type, static_cast<int>(d_out), compute, CUBLAS_GEMM_DEFAULT));
}

// The dense path's operand H (N, T*r): bfloat16 keeps its 16 bits (float32's range;
// tensor cores), float16 goes to float32 (w * S * z can pass 65504 where the other paths
// keep float32): launchers.h, dense_h_dtype.
at::Tensor dense_h_buffer(const at::Tensor& rows, int64_t T, int64_t r) {
  return at::empty({rows.size(0), T * r}, rows.options().dtype(dense_h_dtype(rows.scalar_type())));
}

// out = base + bias + the low-rank terms: from `h` (N*k, r) over the selected tasks
// (indices (N, k)), or from the dense operand `H` (N, T*r), whose GEMM adds into `base`
// in place (accumulate_expand): base is then spent.
at::Tensor expand_and_finish(const at::Tensor& base, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& U, const at::Tensor& indices, const at::Tensor& h,
                             const at::Tensor& H, const Plan& plan, at::ScalarType dtype) {
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(dtype));
  at::Tensor adds;
  if (h.defined()) {
    adds = expand_selected(h, indices, U, plan.per_slot);
  } else {
    const at::Tensor Ue = expand_matrix(U);  // float16: one conversion of the small U
    accumulate_expand(base, H, Ue.scalar_type() == H.scalar_type() ? Ue : Ue.to(H.scalar_type()));
  }
  finalize(base, bias, adds, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& x, const at::Tensor& V, int64_t top_k, double temperature,
    double threshold, c10::string_view weighting_name) {
  const LayerDims d = check_route_inputs(x, V);
  const Weighting weighting =
      check_routing_options(top_k, d.T, temperature, threshold, weighting_name);
  check_cuda(x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor indices = at::empty({d.N, top_k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({d.N, top_k}, x.options().dtype(acc));
  at::Tensor residuals = at::empty({d.N, d.T}, x.options().dtype(acc));
  if (d.N > 0) {
    const at::Tensor rows = as_rows(x, d.N, d.d_in);
    const at::Tensor z =
        dense_part(rows, at::Tensor(), V, false, true, plan_for(d.N, top_k, d.T)).second;
    at::Tensor no_h, no_H;
    route(rows, z, d.T, d.r, top_k, temperature, threshold, weighting, indices, weights,
          residuals, at::Tensor(), no_h, no_H);
  }
  return {indices.view(leading_shape_with(x, top_k)), weights.view(leading_shape_with(x, top_k)),
          residuals.view(leading_shape_with(x, d.T))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_linear_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, int64_t top_k,
    double temperature, double threshold, c10::string_view weighting_name) {
  const LayerDims d = check_layer_inputs(x, weight, bias, U, S, V);
  const Weighting weighting =
      check_routing_options(top_k, d.T, temperature, threshold, weighting_name);
  check_cuda(x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor indices = at::empty({d.N, top_k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({d.N, top_k}, x.options().dtype(acc));
  at::Tensor out;
  if (d.N == 0) {
    out = at::empty({0, d.d_out}, x.options());
  } else {
    const Plan plan = plan_for(d.N, top_k, d.T);
    const at::Tensor rows = as_rows(x, d.N, d.d_in);
    const auto [base, z] = dense_part(rows, weight, V, true, true, plan);
    // Routing writes the expand's operand: h for the selected tasks, or the dense H.
    at::Tensor h = plan.selected ? at::empty({d.N * top_k, d.r}, z.options()) : at::Tensor();
    at::Tensor H = plan.selected ? at::Tensor() : dense_h_buffer(rows, d.T, d.r);
    at::Tensor no_residuals;
    route(rows, z, d.T, d.r, top_k, temperature, threshold, weighting, indices, weights,
          no_residuals, S, h, H);
    out = expand_and_finish(base, bias, U, indices, h, H, plan, x.scalar_type());
  }
  return {out.view(leading_shape_with(x, d.d_out)), indices.view(leading_shape_with(x, top_k)),
          weights.view(leading_shape_with(x, top_k))};
}

at::Tensor routed_linear_prerouted_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, const at::Tensor& indices,
    const at::Tensor& weights) {
  const LayerDims d = check_layer_inputs(x, weight, bias, U, S, V);
  check_prerouted_inputs(x, indices, weights);
  check_cuda(x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  if (d.N == 0) return at::empty(leading_shape_with(x, d.d_out), x.options());
  const int64_t k = indices.size(-1);
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor idx = indices.reshape({d.N, k}).contiguous();
  const at::Tensor w = weights.reshape({d.N, k}).to(acc).contiguous();
  const Plan plan = plan_for(d.N, k, d.T);
  const at::Tensor rows = as_rows(x, d.N, d.d_in);
  // Index values are checked on the device (shrink / dense_h): see shrink_kernel.
  const auto [base, z] = dense_part(rows, weight, V, true, !plan.selected, plan);
  at::Tensor h, H;
  if (plan.selected) {
    h = at::empty({d.N * k, d.r}, rows.options().dtype(acc));
    const at::Tensor V_rows = unit_inner_stride(V);
    shrink(rows, V_rows, S, idx, w, h);
  } else {
    H = dense_h_buffer(rows, d.T, d.r);
    dense_h(z, S, idx, w, H);
  }
  return expand_and_finish(base, bias, U, idx, h, H, plan, x.scalar_type())
      .view(leading_shape_with(x, d.d_out));
}

}  // namespace

TORCH_LIBRARY_IMPL(mass_ext, CUDA, m) {
  m.impl("route", &route_cuda);
  m.impl("routed_linear", &routed_linear_cuda);
  m.impl("routed_linear_prerouted", &routed_linear_prerouted_cuda);
}

}  // namespace cuda
}  // namespace mass_ext
