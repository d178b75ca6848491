// The CUDA kernels of routed_linear_cuda.cu, one launcher each. Every launcher runs on
// the current stream of the current device (the caller holds a device guard), checks its
// launch, never synchronises, and sizes its grid from shapes only (CUDA-graph safe).
// Tensors named *_acc hold the accumulation dtype (float32; float64 for float64 inputs).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "routing.h"

namespace mass_ext {
namespace cuda {

// The paths' thresholds, from benchmarks/bench_gpu.py on an H200 (bf16; 2026-11-30 and
// 12-01; benchmarks/results/gpu*.md, gpu_notes.md), which times each path forced;
// benchmarks/results/gpu_profile.md says which kernel takes the time:
// Rows of x up to which the dense part (x W^T, x V_stacked^T) runs in `project` (one
// memory-bound pass over [W; V]); beyond, in cuBLAS. 0: cuBLAS was as fast or faster at
// every N measured (N = 1: 65.6 us against 70.0 with the same expand; N = 16: 117 against
// 310), so `project` runs only when forced (MASS_EXT_CUDA_PROJECT_MAX_ROWS).
constexpr int64_t kProjectMaxRows = 0;
// Both ops take the selected-tasks path (shrink or route writing h, then the per-slot
// expand, which reads one U_t per slot) while the N * k slots are at most
// kSelectedSlotsPerTask * T; beyond, the dense path (route's H over all T tasks, one
// tensor-core GEMM against all of U). Bench_gpu.py's forced paths (graph replays, us;
// selected = cuBLAS + per-slot expand, runs 6-7 in gpu_notes.md) against the rule:
//   d 4096, T 8, k 2:    N 1: 48.6 / 56.1, N 2: 50.5 / 56.7, N 4: 51.7 / 57.7 (slots 8 <=
//                        16), N 8: 58.7 / 58.0 (16, a tie), N 16: 66.6 / 57.3 (32 > 16);
//   the same, top-1:     N 8: 37.9 / 46.7, N 16: 48.4 / 47.9 (16 <= 16, a tie);
//   d 4096, T 20, k 2:   N 16: 61.2 / 68.3 (32 <= 40), N 64: 87.5 / 66.7 (128 > 40);
//   d 768, T 8, top-1:   N 16: 13.5 / 16.8, N 64: 15.9 / 17.3 (64 > 16: a 1.4 us miss).
// The tiled expand (U_t once per block of rows; kept for layouts without 16-byte rows
// and for MASS_EXT_CUDA_SLOT_EXPAND_MAX_ROWS) made the op 1.6-1.8x as slow at N = 4-64
// (run 7) and took 3x the per-slot kernel's time at N = 1 (20.6 against 6.7 us).
constexpr int64_t kSelectedSlotsPerTask = 2;

// a_out[n, m] = rows[n] . a[m], b_out[n, m] = rows[n] . b[m] (b optional: undefined).
// rows (N, d_in), a (Ma, d_in), b (Mb, d_in): unit stride along d_in. Outputs (N, M*) acc.
void project(const at::Tensor& rows, const at::Tensor& a, const at::Tensor& b,
             at::Tensor& a_out, at::Tensor& b_out);

// Per-row routing from z = x V_stacked^T (N, T*r) acc: indices (N, k), weights (N, k),
// residuals (N, T) (optional); when h is defined, h[n*k + j] = w_j * S_t * z_t (N*k, r)
// acc for the kept slots (0 for dropped ones); when H is defined, the dense expand's
// operand (N, T*r) exactly as `dense_h` writes it, from the row's z while it is at hand.
void route(const at::Tensor& rows, const at::Tensor& z, int64_t T, int64_t r, int64_t top_k,
           double temperature, double threshold, Weighting weighting, at::Tensor& indices,
           at::Tensor& weights, at::Tensor& residuals, const at::Tensor& S, at::Tensor& h,
           at::Tensor& H);

// Pre-routed shrink of the selected tasks only: h[n*k + j] = w_j * S_t * (V_t x_n) (N*k, r)
// acc; 0 for a dropped slot. indices (N, k) int64 and weights (N, k) acc contiguous; V with
// unit stride along d_in.
void shrink(const at::Tensor& rows, const at::Tensor& V, const at::Tensor& S,
            const at::Tensor& indices, const at::Tensor& weights, at::Tensor& h);

// The dtype of H, the dense expand's operand, for inputs of `dtype`: dtype, but float32
// for float16 (w * S * z can pass 65504 where the other paths keep float32).
inline at::ScalarType dense_h_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf ? at::kFloat : dtype;
}

// Dense over tasks: H[n, t*r + q] = (z[n, t*r + q] * S[t, q]) * c[n, t] in
// dense_h_dtype(S's dtype), c[n, t] = sum of the weights of the kept slots of row n
// selecting t; exactly 0 where no slot selects t. indices / weights (N, k) contiguous;
// z and H (N, T*r) contiguous. `route` writes the same H for the self-routed op.
void dense_h(const at::Tensor& z, const at::Tensor& S, const at::Tensor& indices,
             const at::Tensor& weights, at::Tensor& H);

// The expand over the selected tasks only, as partial sums (A, N, d_out) acc for
// `finalize` to add: per_slot (and U's layout allows 16-byte loads) gives A = k,
// partial[j, n, :] = U_{t_j} h[n*k + j], reading U_t once per slot; otherwise A = rank
// chunks of 64, partial[c, n, :] = sum over the kept slots j of row n of
// U_{t_j}[:, chunk c] h[n*k + j, chunk c], reading each tile once per block of rows.
at::Tensor expand_selected(const at::Tensor& h, const at::Tensor& indices, const at::Tensor& U,
                           bool per_slot);

// out[n, c] = base[n, c] + bias[c] + sum_a adds[a, n, c], rounded once to out's dtype.
// base (N, d_out) acc contiguous, bias (d_out,) or undefined, adds (A, N, d_out) acc
// contiguous or undefined, out (N, d_out) contiguous.
void finalize(const at::Tensor& base, const c10::optional<at::Tensor>& bias,
              const at::Tensor& adds, at::Tensor& out);

}  // namespace cuda
}  // namespace mass_ext
