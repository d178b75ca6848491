// CPU kernels. The dense GEMMs (x W^T + b and, when routing, x V_stacked^T) go to
// oneDNN or ATen (cpu/dense_gemm.h); the per-row residuals, standardised softmax, top-k,
// threshold, weights, the per-task shrink and the expand over the selected tasks (but
// for tasks with many slots, see update_large_tasks) are the hand-written loops below,
// parallel over rows or output columns, vectorised in cpu/lowrank_tiles.h.
// Extra memory is O(N * T * r) (the projections), never O(N * T * d); the pre-routed form
// may also hold one merged d_out x d_in weight at a time and copies of a group's rows and
// outputs, O(N * (d_in + d_out)) (see merged_groups).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/dense_gemm.h"
#include "routing.h"

namespace mass_ext {
namespace cpu {

namespace baseline {
#include "cpu/lowrank_tiles.h"
}  // namespace baseline

#if defined(__GNUC__) && defined(__x86_64__)
#define MASS_EXT_HAS_AVX2_PATH 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/lowrank_tiles.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {

bool cpu_has_avx2_fma() {
#ifdef MASS_EXT_HAS_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Each kernel of lowrank_tiles.h, run with the widest instruction set this CPU has:
// name<acc_t, ...>(args...) forwards to avx2::name or baseline::name.
#ifdef MASS_EXT_HAS_AVX2_PATH
#define MASS_EXT_PICK_ISA(name)                                    \
  template <typename... Types, typename... Args>                   \
  void name(Args... args) {                                        \
    if (cpu_has_avx2_fma()) return avx2::name<Types...>(args...);  \
    baseline::name<Types...>(args...);                             \
  }
#else
#define MASS_EXT_PICK_ISA(name)                  \
  template <typename... Types, typename... Args> \
  void name(Args... args) {                      \
    baseline::name<Types...>(args...);           \
  }
#endif
MASS_EXT_PICK_ISA(expand_columns)
MASS_EXT_PICK_ISA(expand_columns_column_major)
MASS_EXT_PICK_ISA(shrink_rows)
MASS_EXT_PICK_ISA(row_norms2)
#undef MASS_EXT_PICK_ISA

// Enough element operations per task for at::parallel_for to be worth a thread.
constexpr int64_t kParallelWork = 32768;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work_per_item));
}

// Slots (row * k + j) grouped by their task id, in slot order within a task; -1 skipped.
struct TaskGroups {
  std::vector<int64_t> slots;    // [kept slots]
  std::vector<int64_t> rows;     // [kept slots] row of x of each slot (slot / k)
  std::vector<int64_t> offsets;  // [T + 1]
};

TaskGroups group_slots_by_task(const int64_t* indices, int64_t num_slots, int64_t T, int64_t k) {
  TaskGroups groups;
  groups.offsets.assign(T + 1, 0);
  for (int64_t s = 0; s < num_slots; ++s)
    if (indices[s] >= 0) ++groups.offsets[indices[s] + 1];
  for (int64_t t = 0; t < T; ++t) groups.offsets[t + 1] += groups.offsets[t];
  groups.slots.resize(groups.offsets[T]);
  groups.rows.resize(groups.offsets[T]);
  std::vector<int64_t> fill(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t s = 0; s < num_slots; ++s) {
    if (indices[s] < 0) continue;
    groups.rows[fill[indices[s]]] = s / k;
    groups.slots[fill[indices[s]]++] = s;
  }
  return groups;
}

// Rows of the pre-routed form whose kept slots hold the same (task, weight) pairs: with
// enough of them, one merged weight W_g = W + sum_j w_j U_tj diag(S_tj) V_tj (d_out * d_in
// * r multiply-adds per slot) and one GEMM over the group's rows cost less than the base
// GEMM plus the shrink and expand (rows * r * (d_in + d_out) per slot). Building W_g costs
// the same at any group size and its rows are gathered per tile: small ranks never pay
// (r = 16 lost, r = 64 won in a sweep), so a group needs at least kMergeMinRank rank rows
// in all, and kMergeFactor times the break-even rows d_in * d_out / (d_in + d_out).
// Against large tasks' updates as GEMMs (update_large_tasks), with all groups in one
// grouped pass, benchmarks/bench_merged_groups.py found merging at 0.85-0.91x the time
// from 2x and 0.70-0.85x from 4x (2026-12-01). Large batches (prefill, two-pass MASS with
// top-1) group; decode sizes and per-row weights (softmax) never do.
constexpr double kMergeFactor = 1.5;
constexpr int64_t kMergeMinRows = 64;
constexpr int64_t kMergeMinRank = 32;

struct MergedGroup {
  std::vector<std::pair<int64_t, double>> slots;  // (task, weight), sorted
  std::vector<int64_t> rows;
};

// MASS_EXT_CPU_MERGE=0 turns merged and task-set groups off: every row takes the low-rank
// path (the tests of that path at any size, comparisons). Read per call: set it before
// threads call the op.
bool merging_enabled() {
  const char* setting = std::getenv("MASS_EXT_CPU_MERGE");
  return setting == nullptr || std::strcmp(setting, "0") != 0;
}

// Row n's kept slots, sorted, into `slots`; false if it has none or a non-finite weight
// (such rows keep the low-rank path's per-row behaviour, README).
bool row_slots(const int64_t* indices, const double* weights, int64_t n, int64_t k,
               std::vector<std::pair<int64_t, double>>& slots) {
  slots.clear();
  for (int64_t j = 0; j < k; ++j) {
    const int64_t t = indices[n * k + j];
    if (t < 0) continue;
    if (!std::isfinite(weights[n * k + j])) return false;
    slots.emplace_back(t, weights[n * k + j] == 0.0 ? 0.0 : weights[n * k + j]);  // -0 = 0
  }
  std::sort(slots.begin(), slots.end());
  return !slots.empty();
}

uint64_t slots_hash(const std::vector<std::pair<int64_t, double>>& slots) {
  uint64_t h = 1469598103934665603ull;
  for (const auto& slot : slots) {
    uint64_t bits;
    std::memcpy(&bits, &slot.second, sizeof bits);
    for (const uint64_t v : {static_cast<uint64_t>(slot.first), bits}) {
      h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    }
  }
  return h;
}

std::vector<MergedGroup> merged_groups(
    const int64_t* indices, const at::Tensor& weights, const LayerDims& d, int64_t k) {
  if (!merging_enabled() || d.d_in == 0 || d.d_out == 0 || d.r * k < kMergeMinRank) return {};
  const double break_even = static_cast<double>(d.d_in) * static_cast<double>(d.d_out) /
                            static_cast<double>(d.d_in + d.d_out);
  const int64_t min_rows =
      std::max<int64_t>(kMergeMinRows, static_cast<int64_t>(std::ceil(kMergeFactor * break_even)));
  if (d.N < min_rows) return {};
  // Cheap exit: a group needs min_rows rows whose lowest kept task is the same.
  std::vector<int64_t> rows_per_task(d.T, 0);
  bool any = false;
  for (int64_t n = 0; n < d.N; ++n) {
    int64_t lowest = d.T;
    for (int64_t j = 0; j < k; ++j)
      if (indices[n * k + j] >= 0) lowest = std::min(lowest, indices[n * k + j]);
    if (lowest < d.T) any = ++rows_per_task[lowest] >= min_rows || any;
  }
  if (!any) return {};
  // Hash every row's slots, sort the hashes (no allocation per row), keep the hashes held
  // by min_rows rows or more, then group those rows by their exact slots. A row whose
  // indices and weights are those of the row before (a sample's tokens, each given the
  // sample's decision) takes that row's result. The sorts and map lookups run on the
  // caller's thread alone: per row they took ~4% of a 384 x 384 layer of bench_model.py's
  // top-1 batch, and reusing runs made the layer 1-2% faster (perf, interleaved A/B of
  // builds, 2026-12-01).
  const at::Tensor w64 = weights.to(at::kDouble).contiguous();
  const double* w = w64.const_data_ptr<double>();
  const auto same_as_previous = [&](int64_t n) {
    return n > 0 &&
           std::memcmp(indices + n * k, indices + (n - 1) * k, k * sizeof(int64_t)) == 0 &&
           std::memcmp(w + n * k, w + (n - 1) * k, k * sizeof(double)) == 0;
  };
  std::vector<std::pair<int64_t, double>> slots;
  std::vector<uint64_t> hashes(d.N, 0);
  std::vector<char> mergeable(d.N, 0);
  for (int64_t n = 0; n < d.N; ++n) {
    if (same_as_previous(n)) {
      mergeable[n] = mergeable[n - 1];
      hashes[n] = hashes[n - 1];
      continue;
    }
    mergeable[n] = row_slots(indices, w, n, k, slots);
    if (mergeable[n]) hashes[n] = slots_hash(slots);
  }
  std::vector<uint64_t> sorted;
  sorted.reserve(d.N);
  for (int64_t n = 0; n < d.N; ++n)
    if (mergeable[n]) sorted.push_back(hashes[n]);
  std::sort(sorted.begin(), sorted.end());
  std::vector<uint64_t> frequent;
  for (size_t i = 0; i < sorted.size();) {
    size_t e = i;
    while (e < sorted.size() && sorted[e] == sorted[i]) ++e;
    if (static_cast<int64_t>(e - i) >= min_rows) frequent.push_back(sorted[i]);
    i = e;
  }
  std::map<std::vector<std::pair<int64_t, double>>, std::vector<int64_t>> rows_by_slots;
  std::vector<int64_t>* previous_rows = nullptr;  // row n - 1's group, when it has one
  for (int64_t n = 0; n < d.N; ++n) {
    if (!mergeable[n] || !std::binary_search(frequent.begin(), frequent.end(), hashes[n])) {
      previous_rows = nullptr;
      continue;
    }
    if (previous_rows == nullptr || !same_as_previous(n)) {
      row_slots(indices, w, n, k, slots);
      previous_rows = &rows_by_slots[slots];  // std::map: stays valid as others are added
    }
    previous_rows->push_back(n);
  }
  std::vector<MergedGroup> groups;
  for (auto& entry : rows_by_slots)
    if (static_cast<int64_t>(entry.second.size()) >= min_rows &&
        static_cast<int64_t>(entry.first.size()) * d.r >= kMergeMinRank)
      groups.push_back({entry.first, std::move(entry.second)});
  return groups;
}

at::Tensor row_index(at::IntArrayRef rows) {
  return at::tensor(rows, at::kLong);
}

// Tasks selected by at least kSegmentMinSlots slots: their update U_t h as a dense GEMM
// over their slots gathered together (linear_rows, so oneDNN where it is faster; the
// micro-kernels below run at about half its speed), added into their rows in slot order
// (bitwise the same for any thread count). slot_h(t, row_ids, slot_ids) gives the
// slots' h (slots, r) in the accumulation dtype. Returns the slots left to the
// micro-kernels. Extra memory: one task's gathered rows and outputs, O(N * (d_in + d_out)).
constexpr int64_t kSegmentMinSlots = 64;

template <typename SlotH>
TaskGroups update_large_tasks(const TaskGroups& groups, const at::Tensor& U, const LayerDims& d,
                              at::Tensor& out, const SlotH& slot_h) {
  TaskGroups rest;
  rest.offsets.assign(d.T + 1, 0);
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t begin = groups.offsets[t], end = groups.offsets[t + 1];
    if (end - begin >= kSegmentMinSlots && d.r > 0) {
      const at::Tensor row_ids = row_index({groups.rows.data() + begin, groups.rows.data() + end});
      const at::Tensor slot_ids =
          row_index({groups.slots.data() + begin, groups.slots.data() + end});
      const at::Tensor U_t = U.select(0, t).to(out.scalar_type()).contiguous();
      out.index_add_(0, row_ids, linear_rows(slot_h(t, row_ids, slot_ids), U_t, c10::nullopt));
    } else {
      rest.slots.insert(rest.slots.end(), groups.slots.begin() + begin, groups.slots.begin() + end);
      rest.rows.insert(rest.rows.end(), groups.rows.begin() + begin, groups.rows.begin() + end);
    }
    rest.offsets[t + 1] = static_cast<int64_t>(rest.slots.size());
  }
  return rest;
}

// out = x W^T + b in the accumulation dtype (rows already converted to it).
at::Tensor dense_base(
    const at::Tensor& rows_acc, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  c10::optional<at::Tensor> bias_acc;
  if (bias.has_value()) bias_acc = bias->to(rows_acc.scalar_type());
  return linear_rows(rows_acc, weight.to(rows_acc.scalar_type()), bias_acc);
}

// z = x V_stacked^T: (N, T * r), all projections in one GEMM.
at::Tensor dense_projections(const at::Tensor& rows_acc, const at::Tensor& V) {
  const at::Tensor V_stacked = V.reshape({V.size(0) * V.size(1), V.size(2)});
  return linear_rows(rows_acc, V_stacked.to(rows_acc.scalar_type()), c10::nullopt);
}

// rescale_exponent (routing.h) of one row.
template <typename acc_t>
int row_exponent(const acc_t* row, int64_t d_in) {
  acc_t max_abs = 0;
  for (int64_t i = 0; i < d_in; ++i) {
    const acc_t a = std::fabs(row[i]);
    if (!std::isfinite(a)) return rescale_exponent(acc_t(0), false);
    max_abs = a > max_abs ? a : max_abs;
  }
  return rescale_exponent(max_abs, true);
}

// Routes rows [begin, end): residuals (optional), indices, weights and, when `h` is
// given, the scaled projections h[n * k + j] = w_j * S_t * z_t of every kept slot.
template <typename acc_t, typename scalar_t>
void route_rows(
    const acc_t* __restrict__ rows, int64_t row_stride,  // [N, d_in]
    const acc_t* __restrict__ z,                         // [N, T * r]
    const scalar_t* __restrict__ S,                      // [T, r] or nullptr
    const LayerDims& d, int64_t top_k, acc_t temperature, acc_t threshold,
    Weighting weighting, int64_t begin, int64_t end,
    int64_t* __restrict__ indices,  // [N, top_k]
    acc_t* __restrict__ weights,    // [N, top_k]
    acc_t* __restrict__ residuals,  // [N, T] or nullptr
    acc_t* __restrict__ h) {        // [N * top_k, r] or nullptr
  std::vector<acc_t> x_norm2(end - begin);
  row_norms2<acc_t>(rows, row_stride, d.d_in, begin, end, x_norm2.data());
  std::vector<acc_t> logits(d.T), probs(d.T), scaled_row;
  for (int64_t n = begin; n < end; ++n) {
    const acc_t* z_row = z + n * d.T * d.r;
    // A row whose squares overflow or underflow is redone on x and z divided by a power
    // of two 2^e near its largest entry: exact, and the squares are then in range, so
    // every finite row whose norm acc_t can hold gets its true residuals.
    acc_t row_norm2 = x_norm2[n - begin];
    int e = 0;
    if (norm2_needs_rescale(row_norm2)) e = row_exponent(rows + n * row_stride, d.d_in);
    if (e != 0) {
      scaled_row.resize(d.d_in);
      for (int64_t i = 0; i < d.d_in; ++i) scaled_row[i] = std::ldexp(rows[n * row_stride + i], -e);
      row_norms2<acc_t>(scaled_row.data(), d.d_in, d.d_in, 0, 1, &row_norm2);
    }
    for (int64_t t = 0; t < d.T; ++t) {
      acc_t z_norm2 = 0;
      if (e == 0) {
        for (int64_t q = 0; q < d.r; ++q) z_norm2 += z_row[t * d.r + q] * z_row[t * d.r + q];
      } else {
        for (int64_t q = 0; q < d.r; ++q) {
          const acc_t zq = std::ldexp(z_row[t * d.r + q], -e);
          z_norm2 += zq * zq;
        }
      }
      const acc_t res = scaled_residual(row_norm2, z_norm2, e);
      if (residuals) residuals[n * d.T + t] = res;
      logits[t] = logit_from_residual(res);
    }
    select_tasks(logits.data(), probs.data(), d.T, top_k, temperature, threshold, weighting,
                 indices + n * top_k, weights + n * top_k);
    if (!h) continue;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t t = indices[n * top_k + j];
      if (t < 0) continue;
      const acc_t w = weights[n * top_k + j];
      acc_t* h_slot = h + (n * top_k + j) * d.r;
      for (int64_t q = 0; q < d.r; ++q)
        h_slot[q] = w * static_cast<acc_t>(S[t * d.r + q]) * z_row[t * d.r + q];
    }
  }
}

// Each U_t stored column-major: U.transpose(1, 2) is contiguous. The expand then reads
// rows of U_t^T directly (see expand_columns_column_major).
bool is_column_major(const at::Tensor& U) {
  const int64_t d_out = U.size(1), r = U.size(2);
  return U.stride(1) == 1 && (r == 1 || U.stride(2) == d_out) &&
         (U.size(0) == 1 || U.stride(0) == d_out * r);
}

// U as the expand reads it: as given when row- or column-major per task, else a copy.
at::Tensor expand_layout(const at::Tensor& U) {
  return is_column_major(U) ? U : U.contiguous();
}

// y[n] += sum over the kept slots j of row n: U_{t_j} h[n * k + j], parallel over columns.
template <typename acc_t, typename scalar_t>
void expand_into(
    const acc_t* h, const at::Tensor& U, const TaskGroups& groups, const LayerDims& d,
    acc_t* y) {
  const int64_t kept = static_cast<int64_t>(groups.slots.size());
  if (kept == 0) return;
  const bool column_major = is_column_major(U) && !U.is_contiguous();
  const scalar_t* U_data = U.const_data_ptr<scalar_t>();
  // Threads split whole 16-column tiles (the widest micro-kernel tile).
  constexpr int64_t kCols = 16;
  const int64_t num_tiles = (d.d_out + kCols - 1) / kCols;
  at::parallel_for(0, num_tiles, grain_for(kept * d.r * kCols), [&](int64_t t0, int64_t t1) {
    const int64_t c0 = kCols * t0, c1 = std::min(kCols * t1, d.d_out);
    if (column_major)
      expand_columns_column_major<acc_t, scalar_t>(h, U_data, groups.slots.data(),
                                                   groups.rows.data(), groups.offsets.data(), d.T,
                                                   d.r, d.d_out, c0, c1, y);
    else
      expand_columns<acc_t, scalar_t>(h, U_data, groups.slots.data(), groups.rows.data(),
                                      groups.offsets.data(), d.T, d.r, d.d_out, c0, c1, y);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& x, const at::Tensor& V, int64_t top_k, double temperature,
    double threshold, c10::string_view weighting_name) {
  const LayerDims d = check_route_inputs(x, V);
  const Weighting weighting =
      check_routing_options(top_k, d.T, temperature, threshold, weighting_name);
  const at::Tensor rows = as_rows(x, d.N, d.d_in).to(at::toOpMathType(x.scalar_type()));
  const at::Tensor z = dense_projections(rows, V);
  at::Tensor indices = at::empty({d.N, top_k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({d.N, top_k}, rows.options());
  at::Tensor residuals = at::empty({d.N, d.T}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "route_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, d.N, grain_for(d.T * d.r + d.d_in), [&](int64_t b, int64_t e) {
      route_rows<acc_t, scalar_t>(
          rows.const_data_ptr<acc_t>(), rows.stride(0), z.const_data_ptr<acc_t>(), nullptr, d,
          top_k, temperature, threshold, weighting, b, e, indices.mutable_data_ptr<int64_t>(),
          weights.mutable_data_ptr<acc_t>(), residuals.mutable_data_ptr<acc_t>(), nullptr);
    });
  });
  return {indices.view(leading_shape_with(x, top_k)), weights.view(leading_shape_with(x, top_k)),
          residuals.view(leading_shape_with(x, d.T))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, int64_t top_k,
    double temperature, double threshold, c10::string_view weighting_name) {
  const LayerDims d = check_layer_inputs(x, weight, bias, U, S, V);
  const Weighting weighting =
      check_routing_options(top_k, d.T, temperature, threshold, weighting_name);
  const at::Tensor rows = as_rows(x, d.N, d.d_in).to(at::toOpMathType(x.scalar_type()));
  at::Tensor out = dense_base(rows, weight, bias);
  const at::Tensor z = dense_projections(rows, V);
  const at::Tensor U_c = expand_layout(U), S_c = S.contiguous();
  at::Tensor indices = at::empty({d.N, top_k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({d.N, top_k}, rows.options());
  at::Tensor h = at::empty({d.N * top_k, d.r}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "routed_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, d.N, grain_for(d.T * d.r + d.d_in), [&](int64_t b, int64_t e) {
      route_rows<acc_t, scalar_t>(
          rows.const_data_ptr<acc_t>(), rows.stride(0), z.const_data_ptr<acc_t>(),
          S_c.const_data_ptr<scalar_t>(), d, top_k, temperature, threshold, weighting, b, e,
          indices.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<acc_t>(), nullptr,
          h.mutable_data_ptr<acc_t>());
    });
    // h holds every kept slot's w * S_t * z_t already.
    const TaskGroups groups = update_large_tasks(
        group_slots_by_task(indices.const_data_ptr<int64_t>(), d.N * top_k, d.T, top_k), U, d,
        out, [&](int64_t, const at::Tensor&, const at::Tensor& slot_ids) {
          return h.index_select(0, slot_ids);
        });
    expand_into<acc_t, scalar_t>(h.const_data_ptr<acc_t>(), U_c, groups, d,
                                 out.mutable_data_ptr<acc_t>());
  });
  return {out.to(x.scalar_type()).view(leading_shape_with(x, d.d_out)),
          indices.view(leading_shape_with(x, top_k)), weights.view(leading_shape_with(x, top_k))};
}

// Every merged group's W + sum_j w_j U_tj diag(S_tj) V_tj in W_acc's dtype, (G, d_out,
// d_in). In float32, oneDNN's matmul per row tile of each group (cpu::batched_products_plus):
// its operands are rows of U_t^T and V, copied as they are stored (fill_merge_rows), and
// W is summed in its epilogue into the tile, which holds a copy of W's rows. Otherwise
// (float64, MASS_EXT_CPU_GEMM=aten, a small merge, or a torch without that matmul) ATen's
// addmm per group. (ATen's addmm runs MKL, 2x slower here: per slot it was 11% of
// two-pass MASS's second pass. A grouped oneDNN GEMM over transposed copies of U and V,
// with W added as each tile was written, took the routed layers of bench_model.py's top-1
// batch 1.04-1.06x the matmul's time on the 384 x 384 and 384 x 1536 layers and 1.01x on
// the 1536 x 384 one, interleaved in one process, 2026-12-01.)
// The operands of merged_weights' oneDNN matmul: row j r + q of lhs_t[g] (width, d_out) is
// w_j S_tj[q] times row q of U_tj^T (contiguous when U is column-major, as RoutedLinear
// keeps it), row j r + q of rhs[g] (width, d_in) row q of V_tj; zero past the group's slots.
template <typename acc_t, typename scalar_t>
void fill_merge_rows(const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                     const std::vector<MergedGroup>& merged, at::Tensor& lhs_t, at::Tensor& rhs) {
  const int64_t G = static_cast<int64_t>(merged.size()), width = lhs_t.size(1);
  const int64_t d_out = U.size(1), r = U.size(2), d_in = V.size(2);
  const auto U_a = U.accessor<scalar_t, 3>();
  const auto S_a = S.accessor<scalar_t, 2>();
  const auto V_a = V.accessor<scalar_t, 3>();
  acc_t* lhs_data = lhs_t.mutable_data_ptr<acc_t>();
  acc_t* rhs_data = rhs.mutable_data_ptr<acc_t>();
  at::parallel_for(0, G * width, grain_for(d_out + d_in), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t g = i / width, row = i % width, j = row / r, q = row % r;
      acc_t* lhs_row = lhs_data + i * d_out;
      acc_t* rhs_row = rhs_data + i * d_in;
      if (j >= static_cast<int64_t>(merged[g].slots.size())) {
        std::fill(lhs_row, lhs_row + d_out, acc_t(0));
        std::fill(rhs_row, rhs_row + d_in, acc_t(0));
        continue;
      }
      const int64_t t = merged[g].slots[j].first;
      const acc_t scale =
          static_cast<acc_t>(S_a[t][q]) * static_cast<acc_t>(merged[g].slots[j].second);
      const auto U_t = U_a[t];
      for (int64_t o = 0; o < d_out; ++o) lhs_row[o] = static_cast<acc_t>(U_t[o][q]) * scale;
      const auto V_tq = V_a[t][q];
      for (int64_t c = 0; c < d_in; ++c) rhs_row[c] = static_cast<acc_t>(V_tq[c]);
    }
  });
}

at::Tensor merged_weights(const at::Tensor& W_acc, const at::Tensor& U, const at::Tensor& S,
                          const at::Tensor& V, const std::vector<MergedGroup>& merged) {
  const int64_t G = static_cast<int64_t>(merged.size()), d_out = W_acc.size(0);
  const int64_t d_in = W_acc.size(1);
  int64_t width = 0;  // the widest group's k r; narrower groups' rows are zero
  for (const MergedGroup& group : merged)
    width = std::max<int64_t>(width, static_cast<int64_t>(group.slots.size()) * V.size(1));
  at::Tensor lhs_t = at::empty({G, width, d_out}, W_acc.options());
  at::Tensor rhs = at::empty({G, width, d_in}, W_acc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, U.scalar_type(), "merged_weights", [&] {
    if (W_acc.scalar_type() == at::kDouble)
      fill_merge_rows<double, scalar_t>(U, S, V, merged, lhs_t, rhs);
    else
      fill_merge_rows<float, scalar_t>(U, S, V, merged, lhs_t, rhs);
  });
  at::Tensor out = at::empty({G, d_out, d_in}, W_acc.options());
  if (W_acc.scalar_type() == at::kFloat && cpu::batched_products_plus(lhs_t, rhs, W_acc, out))
    return out;
  for (int64_t g = 0; g < G; ++g) {
    at::Tensor out_g = out.select(0, g);
    at::addmm_out(out_g, W_acc, lhs_t.select(0, g).t(), rhs.select(0, g));
  }
  return out;
}

// Rows outside the merged groups whose kept slots name the same tasks (their weights may
// differ, softmax's do), at least kTaskSetMinRows of them: per tile, x W^T + b and
// [w_1 h_1 | ... | w_m h_m] [U_t1 | ... | U_tm]^T (two oneDNN calls, summed as the tile is
// written), where h_j = S_tj (x V_tj^T) (one grouped GEMM for every such slot first).
// The same multiply-adds as the base GEMM plus the low-rank update, at the GEMM's speed,
// with no second pass over the output: pass 2 of bench_model.py's batch at top-2 took
// 0.89-0.93x the time of update_large_tasks' GEMMs and index_add (interleaved A/B).
// Smaller groups lose: two oneDNN calls per tile on few rows cost more than the micro-
// kernels and large tasks' GEMMs save (1.1-1.4x at 64 rows per set, mixed at 128, 0.87-
// 0.98x mostly from 256 on 384 x 384, 384 x 1536 and 768 x 768 layers). Not used:
// one GEMM against [W | U] (copying W per group cost more than it saved), and task-set
// groups in the self-routed op (per-layer MASS 1.08-1.13x slower at ~300 rows per task,
// 0.97x at ~800). All measured 2026-12-01.
constexpr int64_t kTaskSetMinRows = 256;

struct TaskSetGroup {
  std::vector<int64_t> tasks;  // the kept slots' tasks, sorted (a task may repeat)
  std::vector<int64_t> rows;
  std::vector<int64_t> slots;  // row m's slot for tasks[j] at m * tasks.size() + j
};

// The task-set groups among the rows whose slots in open_idx are still open.
std::vector<TaskSetGroup> task_set_groups(const int64_t* open_idx, int64_t N, int64_t k) {
  if (N < kTaskSetMinRows) return {};
  std::map<std::vector<int64_t>, TaskSetGroup> by_tasks;
  std::vector<std::pair<int64_t, int64_t>> kept;  // (task, slot)
  std::vector<int64_t> tasks;
  for (int64_t n = 0; n < N; ++n) {
    kept.clear();
    for (int64_t j = 0; j < k; ++j)
      if (open_idx[n * k + j] >= 0) kept.emplace_back(open_idx[n * k + j], n * k + j);
    if (kept.empty()) continue;
    std::sort(kept.begin(), kept.end());
    tasks.clear();
    for (const auto& slot : kept) tasks.push_back(slot.first);
    TaskSetGroup& group = by_tasks[tasks];
    group.rows.push_back(n);
    for (const auto& slot : kept) group.slots.push_back(slot.second);
  }
  std::vector<TaskSetGroup> groups;
  for (auto& entry : by_tasks) {
    if (static_cast<int64_t>(entry.second.rows.size()) < kTaskSetMinRows) continue;
    entry.second.tasks = entry.first;
    groups.push_back(std::move(entry.second));
  }
  return groups;
}

// h[slot] = S_t (x_row V_t^T) for every slot of the task-set groups (h: (N k, r)),
// one grouped GEMM over the tasks.
void task_set_projections(const at::Tensor& rows_acc, const at::Tensor& S, const at::Tensor& V,
                          const std::vector<TaskSetGroup>& task_sets, at::Tensor& h) {
  const int64_t T = V.size(0);
  std::vector<std::vector<int64_t>> rows_of(T), slots_of(T);
  for (const TaskSetGroup& group : task_sets) {
    const int64_t m = static_cast<int64_t>(group.tasks.size());
    for (size_t i = 0; i < group.rows.size(); ++i)
      for (int64_t j = 0; j < m; ++j) {
        rows_of[group.tasks[j]].push_back(group.rows[i]);
        slots_of[group.tasks[j]].push_back(group.slots[i * m + j]);
      }
  }
  std::vector<at::Tensor> scaled_V;
  scaled_V.reserve(T);
  std::vector<RowGroup> gemms;
  for (int64_t t = 0; t < T; ++t) {
    if (rows_of[t].empty()) continue;
    scaled_V.push_back((V.select(0, t).to(h.scalar_type()) *
                        S.select(0, t).to(h.scalar_type()).unsqueeze(1)).contiguous());
    RowGroup gemm{&scaled_V.back(), rows_of[t].data(), static_cast<int64_t>(rows_of[t].size())};
    gemm.out_rows = slots_of[t].data();
    gemms.push_back(gemm);
  }
  grouped_linear_rows_into(rows_acc, gemms, c10::nullopt, h);
}

// The task-set group's update rows [m0, m1): [w_1 h_1 | ... | w_m h_m].
template <typename acc_t>
void fill_weighted_h(const TaskSetGroup& group, const acc_t* h, const acc_t* w, int64_t r,
                     int64_t m0, int64_t m1, at::Tensor& dst) {
  const int64_t m = static_cast<int64_t>(group.tasks.size());
  acc_t* out = dst.mutable_data_ptr<acc_t>();
  for (int64_t i = m0; i < m1; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const int64_t slot = group.slots[i * m + j];
      const acc_t weight = w[slot];
      const acc_t* h_slot = h + slot * r;
      acc_t* block = out + ((i - m0) * m + j) * r;
      for (int64_t q = 0; q < r; ++q) block[q] = weight * h_slot[q];
    }
}

// out (N, d_out) in the accumulation dtype, in one grouped GEMM: x W_group^T + b for the
// rows of each merged group, x W^T + b + [w h] [U]^T for the rows of each task-set
// group, x W^T + b for every other row. Their slots in open_idx (a copy then) become -1,
// leaving only the other rows' low-rank updates to the shrink and expand.
at::Tensor dense_part(
    const at::Tensor& rows_acc, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, const at::Tensor& w,
    const std::vector<MergedGroup>& merged, int64_t top_k, at::Tensor& open_idx) {
  const at::ScalarType acc_type = rows_acc.scalar_type();
  const int64_t N = rows_acc.size(0), r = V.size(1);
  open_idx = open_idx.clone();
  int64_t* open_slots = open_idx.mutable_data_ptr<int64_t>();
  for (const MergedGroup& group : merged)
    for (const int64_t n : group.rows)
      std::fill(open_slots + n * top_k, open_slots + (n + 1) * top_k, int64_t{-1});
  const std::vector<TaskSetGroup> task_sets =
      r > 0 && merging_enabled() ? task_set_groups(open_slots, N, top_k)
                                 : std::vector<TaskSetGroup>{};
  if (merged.empty() && task_sets.empty()) return dense_base(rows_acc, weight, bias);

  const at::Tensor W_acc = weight.to(acc_type).contiguous();
  std::vector<char> is_grouped(N, 0);
  std::vector<at::Tensor> group_weights;  // reserved: the RowGroups point into it
  group_weights.reserve(merged.size() + task_sets.size());
  std::vector<RowGroup> gemms;
  const at::Tensor W_merged = merged.empty() ? at::Tensor() : merged_weights(W_acc, U, S, V, merged);
  for (size_t g = 0; g < merged.size(); ++g) {
    group_weights.push_back(W_merged.select(0, static_cast<int64_t>(g)));
    gemms.push_back({&group_weights.back(), merged[g].rows.data(),
                     static_cast<int64_t>(merged[g].rows.size())});
    for (const int64_t n : merged[g].rows) is_grouped[n] = 1;
  }
  at::Tensor h;  // the task-set groups' slots' S_t z_t
  if (!task_sets.empty()) {
    h = at::empty({N * top_k, r}, rows_acc.options());
    task_set_projections(rows_acc, S, V, task_sets, h);
  }
  for (const TaskSetGroup& group : task_sets) {
    std::vector<at::Tensor> blocks;
    for (const int64_t t : group.tasks) blocks.push_back(U.select(0, t).to(acc_type));
    // [U_t1 | ... | U_tm] row-major: one copy of each block (U is often column-major).
    group_weights.push_back(blocks.size() == 1 ? blocks.front().contiguous() : at::cat(blocks, 1));
    RowGroup gemm{&W_acc, group.rows.data(), static_cast<int64_t>(group.rows.size())};
    gemm.extra_weight = &group_weights.back();
    gemm.extra_rows = [&group, &h, &w, r](int64_t m0, int64_t m1, at::Tensor& dst) {
      if (dst.scalar_type() == at::kDouble)
        fill_weighted_h<double>(group, h.const_data_ptr<double>(), w.const_data_ptr<double>(), r,
                                m0, m1, dst);
      else
        fill_weighted_h<float>(group, h.const_data_ptr<float>(), w.const_data_ptr<float>(), r,
                               m0, m1, dst);
    };
    gemms.push_back(gemm);
    for (const int64_t n : group.rows) {
      is_grouped[n] = 1;
      std::fill(open_slots + n * top_k, open_slots + (n + 1) * top_k, int64_t{-1});
    }
  }
  std::vector<int64_t> rest;
  for (int64_t n = 0; n < N; ++n)
    if (!is_grouped[n]) rest.push_back(n);
  if (!rest.empty()) gemms.push_back({&W_acc, rest.data(), static_cast<int64_t>(rest.size())});
  c10::optional<at::Tensor> bias_acc;
  if (bias.has_value()) bias_acc = bias->to(acc_type);
  at::Tensor out = at::empty({N, weight.size(0)}, rows_acc.options());
  grouped_linear_rows_into(rows_acc, gemms, bias_acc, out);
  return out;
}

at::Tensor routed_linear_prerouted_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, const at::Tensor& indices,
    const at::Tensor& weights) {
  const LayerDims d = check_layer_inputs(x, weight, bias, U, S, V);
  check_prerouted_inputs(x, indices, weights);
  const int64_t top_k = indices.size(-1);
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor idx = indices.reshape({d.N, top_k}).contiguous();
  const at::Tensor w = weights.reshape({d.N, top_k}).to(acc_type).contiguous();
  const int64_t* idx_data = idx.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < d.N * top_k; ++s) {
    TORCH_CHECK_INDEX(
        idx_data[s] >= -1 && idx_data[s] < d.T, "indices must hold task ids in [-1, T) = [-1, ",
        d.T, "), got ", idx_data[s], " at row ", s / top_k, ", slot ", s % top_k);
  }
  const at::Tensor rows = as_rows(x, d.N, d.d_in);
  const at::Tensor rows_acc = rows.to(acc_type);
  const std::vector<MergedGroup> merged = merged_groups(idx_data, w, d, top_k);
  at::Tensor low_rank_idx = idx;  // the slots the shrink and expand below still serve
  at::Tensor out = dense_part(rows_acc, weight, bias, U, S, V, w, merged, top_k, low_rank_idx);
  const at::Tensor U_c = expand_layout(U), S_c = S.contiguous(), V_c = V.contiguous();
  // The shrink of a large task is a GEMM too: h = w * S_t * (x V_t^T) over its rows.
  const TaskGroups groups = update_large_tasks(
      group_slots_by_task(low_rank_idx.const_data_ptr<int64_t>(), d.N * top_k, d.T, top_k), U,
      d, out, [&](int64_t t, const at::Tensor& row_ids, const at::Tensor& slot_ids) {
        const at::Tensor z_t = linear_rows(rows_acc.index_select(0, row_ids),
                                           V.select(0, t).to(acc_type).contiguous(), c10::nullopt);
        return z_t * S.select(0, t).to(acc_type).unsqueeze(0) *
               w.reshape({-1}).index_select(0, slot_ids).unsqueeze(1);
      });

  // Shrink work items: (task, run of <= 48 slots, <= 16 rank rows), so that even one
  // row (decode) spreads over the cores.
  constexpr int64_t kSlotRun = 48, kRankRun = 16;
  struct Item { int64_t t, slot_begin, slot_end, q_begin, q_end; };
  std::vector<Item> items;
  for (int64_t t = 0; t < d.T; ++t)
    for (int64_t s = groups.offsets[t]; s < groups.offsets[t + 1]; s += kSlotRun)
      for (int64_t q = 0; q < d.r; q += kRankRun)
        items.push_back({t, s, std::min(s + kSlotRun, groups.offsets[t + 1]), q,
                         std::min(q + kRankRun, d.r)});

  at::Tensor h = at::empty({d.N * top_k, d.r}, rows.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "routed_linear_prerouted_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* V_data = V_c.const_data_ptr<scalar_t>();
    const scalar_t* S_data = S_c.const_data_ptr<scalar_t>();
    const int64_t item_work = kSlotRun * kRankRun * d.d_in;
    at::parallel_for(0, static_cast<int64_t>(items.size()), grain_for(item_work), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const Item& it = items[i];
        shrink_rows<acc_t, scalar_t>(rows.const_data_ptr<scalar_t>(), rows.stride(0),
                          V_data + it.t * d.r * d.d_in, S_data + it.t * d.r, w.const_data_ptr<acc_t>(),
                          groups.slots.data() + it.slot_begin, groups.rows.data() + it.slot_begin,
                          it.slot_end - it.slot_begin, d.r,
                          d.d_in, it.q_begin, it.q_end, h.mutable_data_ptr<acc_t>());
      }
    });
    expand_into<acc_t, scalar_t>(h.const_data_ptr<acc_t>(), U_c, groups, d,
                                 out.mutable_data_ptr<acc_t>());
  });
  return out.to(x.scalar_type()).view(leading_shape_with(x, d.d_out));
}

}  // namespace

TORCH_LIBRARY_IMPL(mass_ext, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("routed_linear", &routed_linear_cpu);
  m.impl("routed_linear_prerouted", &routed_linear_prerouted_cpu);
}

}  // namespace cpu
}  // namespace mass_ext
