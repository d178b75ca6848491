#include "cpu/dense_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mass_ext {
namespace cpu {
namespace {

// mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars,
// str? algorithm) -> Tensor: PyTorch's oneDNN linear (registered when it is built with
// mkldnn, as the x86 and aarch64 Linux wheels are), looked up once through the dispatcher.
using OneDnnLinear = at::Tensor(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, c10::string_view,
    c10::List<c10::optional<at::Scalar>>, c10::optional<c10::string_view>);

const c10::TypedOperatorHandle<OneDnnLinear>* onednn_linear() {
  static const c10::optional<c10::TypedOperatorHandle<OneDnnLinear>> handle =
      []() -> c10::optional<c10::TypedOperatorHandle<OneDnnLinear>> {
    const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return c10::nullopt;
    try {
      return op->typed<OneDnnLinear>();  // throws if this torch declares another signature
    } catch (const c10::Error&) {
      return c10::nullopt;
    }
  }();
  return handle.has_value() ? &*handle : nullptr;
}

enum class GemmChoice { kAuto, kOneDnn, kAten };

// MASS_EXT_CPU_GEMM: "auto" (default), "onednn" (every float32 GEMM, any size: the tests
// of that path on small shapes) or "aten". Read per call, like MASS_EXT_CPU_MERGE.
GemmChoice gemm_choice() {
  const char* setting = std::getenv("MASS_EXT_CPU_GEMM");
  if (setting == nullptr || setting[0] == '\0' || std::strcmp(setting, "auto") == 0)
    return GemmChoice::kAuto;
  if (std::strcmp(setting, "onednn") == 0) return GemmChoice::kOneDnn;
  if (std::strcmp(setting, "aten") == 0) return GemmChoice::kAten;
  TORCH_CHECK_VALUE(false, "MASS_EXT_CPU_GEMM must be auto, onednn or aten, got '", setting, "'");
}

// Below this many multiply-adds oneDNN's per-call set-up (~10 us) outweighs its faster
// kernel (benchmarks/bench_cpu_gemm.py: 8 x 384 x 384 lost, 16 x 768 x 768 won).
constexpr double kOneDnnMinMacs = 4194304;  // 2^22

// Output tiles: as large as 256 x 512, halved (columns first) while there are fewer than
// kMinTiles, so a decode row's GEMM still spreads over a server's cores, but never below
// kMinTileMacs of work: each tile is one oneDNN call with ~10 us of set-up. A function of
// the shape alone, so the reduction order (every bit of the result) does not depend on
// the thread count.
constexpr int64_t kMaxTileRows = 256, kMaxTileCols = 512;
constexpr int64_t kMinTileRows = 32, kMinTileCols = 64;
constexpr int64_t kMinTiles = 16;
constexpr double kMinTileMacs = 4194304;  // 2^22, ~35 us on one core

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Tiling {
  int64_t rows, cols;
};

Tiling tiling_for(int64_t M, int64_t K, int64_t N) {
  Tiling t{std::min(M, kMaxTileRows), std::min(N, kMaxTileCols)};
  auto tiles = [&] { return ceil_div(M, t.rows) * ceil_div(N, t.cols); };
  auto macs = [&](int64_t rows, int64_t cols) {
    return static_cast<double>(rows) * static_cast<double>(cols) * static_cast<double>(K);
  };
  while (tiles() < kMinTiles && t.cols >= 2 * kMinTileCols &&
         macs(t.rows, ceil_div(t.cols, 2)) >= kMinTileMacs)
    t.cols = ceil_div(t.cols, 2);
  while (tiles() < kMinTiles && t.rows >= 2 * kMinTileRows &&
         macs(ceil_div(t.rows, 2), t.cols) >= kMinTileMacs)
    t.rows = ceil_div(t.rows, 2);
  return t;
}

// oneDNN (OpenMP build) sizes its team from omp_get_max_threads(): one thread per call,
// inside or outside our parallel region, so it never splits K across threads.
class OneThreadPerCall {
 public:
#ifdef _OPENMP
  OneThreadPerCall() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneThreadPerCall() { omp_set_num_threads(saved_); }

 private:
  int saved_;
#endif
};

at::Tensor onednn_tiles(
    const c10::TypedOperatorHandle<OneDnnLinear>& linear, const at::Tensor& rows,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t M = rows.size(0), N = weight.size(0);
  const Tiling tile = tiling_for(M, rows.size(1), N);
  const int64_t col_tiles = ceil_div(N, tile.cols);
  at::Tensor out = at::empty({M, N}, rows.options());
  // The workers call operators: they run in the caller's dispatch state (inference mode).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, ceil_div(M, tile.rows) * col_tiles, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    OneThreadPerCall one_thread;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m0 = (i / col_tiles) * tile.rows, n0 = (i % col_tiles) * tile.cols;
      const int64_t m1 = std::min(M, m0 + tile.rows), n1 = std::min(N, n0 + tile.cols);
      c10::optional<at::Tensor> bias_tile;
      if (bias.has_value()) bias_tile = bias->slice(0, n0, n1);
      const at::Tensor y = linear.call(rows.slice(0, m0, m1), weight.slice(0, n0, n1), bias_tile,
                                       "none", c10::List<c10::optional<at::Scalar>>(), c10::nullopt);
      out.slice(0, m0, m1).slice(1, n0, n1).copy_(y);
    }
  });
  return out;
}

}  // namespace

at::Tensor linear_rows(
    const at::Tensor& rows, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t M = rows.size(0), K = rows.size(1), N = weight.size(0);
  const GemmChoice choice = gemm_choice();
  const c10::TypedOperatorHandle<OneDnnLinear>* linear =
      choice == GemmChoice::kAten ? nullptr : onednn_linear();
  const bool use_onednn =
      linear != nullptr && rows.scalar_type() == at::kFloat && M > 0 && K > 0 && N > 0 &&
      weight.is_contiguous() &&
      (choice == GemmChoice::kOneDnn ||
       static_cast<double>(M) * static_cast<double>(K) * static_cast<double>(N) >= kOneDnnMinMacs);
  if (use_onednn) {
    c10::optional<at::Tensor> bias_c;
    if (bias.has_value()) bias_c = bias->contiguous();
    return onednn_tiles(*linear, rows.contiguous(), weight, bias_c);
  }
  if (bias.has_value()) return at::addmm(*bias, rows, weight.t());
  return at::mm(rows, weight.t());
}

}  // namespace cpu
}  // namespace mass_ext
