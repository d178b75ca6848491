#include "cpu/dense_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

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

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result = beta result + alpha
// mat1 mat2 through oneDNN's matmul, which reads a transposed mat1 in place. Not in
// PyTorch's installed headers: looked up by its symbol, so a torch without it (or
// without oneDNN) still loads this extension and takes the other path.
using OneDnnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float,
                              float);

OneDnnMatmul onednn_matmul() {
  static const OneDnnMatmul fn = reinterpret_cast<OneDnnMatmul>(
      dlsym(RTLD_DEFAULT, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
  return fn;
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

// Output tiles: a grid of equal tiles (at most 256 x 512), split further (columns first)
// while there are fewer than kMinTiles, so a decode row's GEMM still spreads over a
// server's cores, but never below kMinTileMacs of work: each tile is one oneDNN call with
// ~10 us of set-up. Equal tiles keep the threads evenly loaded: 820 rows as 256-row tiles
// (256, 256, 256, 52) left one of 2 threads 62% of the work, 1.3-1.4x the time of one
// oneDNN call with its own threading, against 1.0-1.2x for equal tiles (2026-12-01; the
// "dense tiles" column of benchmarks/bench_cpu_gemm.py). Columns are split in multiples
// of 16 (a 512-bit vector of floats). A split that would leave more tiles than the
// machine has CPUs must also leave each at least kMinTileMacs times its tiles per CPU
// (at most 4 kMinTileMacs), unless the count is not a multiple of the CPUs (threads
// unevenly loaded): on 2 CPUs, 128-1664 rows of 384 x 384, 384 x 1536, 1536 x 384 and
// 768 x 768 layers took 1.07-1.23x one oneDNN call, against 1.11-1.55x with kMinTileMacs
// for every split (interleaved in one process, 2026-12-01). From 16 CPUs on no count
// below kMinTiles is a multiple of the CPUs, so they split as before. A function of the
// shape and the machine's logical CPU count alone (read once), so the reduction order
// (every bit of the result) does not depend on the thread count.
constexpr int64_t kMaxTileRows = 256, kMaxTileCols = 512;
constexpr int64_t kMinTileRows = 32, kMinTileCols = 64;
constexpr int64_t kMinTiles = 16;
constexpr double kMinTileMacs = 4194304;  // 2^22, ~35 us on one core
constexpr int64_t kColumnMultiple = 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Tiling {
  int64_t rows, cols;
};

// The machine's logical CPUs, read once. Tiles are sized from it, never from the thread
// setting (which would change the tiles, and so the bits, with torch.set_num_threads).
int64_t machine_cpus() {
  static const int64_t cpus = std::max(1u, std::thread::hardware_concurrency());
  return cpus;
}

Tiling tiling_for(int64_t M, int64_t K, int64_t N) {
  int64_t row_tiles = ceil_div(M, kMaxTileRows), col_tiles = ceil_div(N, kMaxTileCols);
  const auto rows_of = [&](int64_t tiles) { return ceil_div(M, tiles); };
  const auto cols_of = [&](int64_t tiles) {
    return std::min(N, ceil_div(ceil_div(N, tiles), kColumnMultiple) * kColumnMultiple);
  };
  const auto macs = [&](int64_t rows, int64_t cols) {
    return static_cast<double>(rows) * static_cast<double>(cols) * static_cast<double>(K);
  };
  const int64_t cpus = machine_cpus();
  while (row_tiles * col_tiles < kMinTiles) {
    const int64_t count = row_tiles * col_tiles;
    const double min_macs =
        count % cpus != 0 ? kMinTileMacs
                          : std::clamp(kMinTileMacs * static_cast<double>(2 * count) / cpus,
                                       kMinTileMacs, 4 * kMinTileMacs);
    const int64_t rows = rows_of(row_tiles), split_cols = cols_of(2 * col_tiles);
    if (split_cols >= kMinTileCols && macs(rows, split_cols) >= min_macs) {
      col_tiles *= 2;
    } else if (rows_of(2 * row_tiles) >= kMinTileRows &&
               macs(rows_of(2 * row_tiles), cols_of(col_tiles)) >= min_macs) {
      row_tiles *= 2;
    } else {
      break;
    }
  }
  return {rows_of(row_tiles), cols_of(col_tiles)};
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

// One tile of a grouped product: rows [m0, m1) of group g times columns [n0, n1).
struct TileItem {
  int64_t group, m0, m1, n0, n1;
};

// oneDNN builds (JIT-compiles) a kernel for every new GEMM shape and caches it: a row
// count it has not seen costs 0.4-0.8 ms on this machine, 2-3x the GEMM of a 200-row
// tile (2026-12-01). A routed batch's groups have new row counts nearly every call (the
// task mix and the lengths change), so each oneDNN call's row count is rounded up to 4
// significant bits (padded_rows: 8 counts per power of two, at most 1/8 more rows) and
// tiles are whole multiples of kRowQuantum but a group's last. Padding rows are computed
// and dropped.
constexpr int64_t kRowQuantum = 16;

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// count rounded up to a multiple of 2^(floor(log2 count) - 3): 16 -> 16, 17 -> 18,
// 90 -> 96, 230 -> 240; counts up to 16 unchanged.
int64_t padded_rows(int64_t count) {
  int64_t step = 1;
  while (step * 16 <= count) step *= 2;
  return round_up(count, step);
}

// Tiles of every group, sized from all groups' rows together (so T groups of a batch
// get the large tiles the whole batch would, not T times the tiles of a small GEMM),
// each group cut into equal row tiles (in multiples of kRowQuantum), none crossing groups.
std::vector<TileItem> tile_items(const std::vector<RowGroup>& groups, int64_t K, int64_t N) {
  const int64_t G = static_cast<int64_t>(groups.size());
  int64_t total = 0;
  for (const RowGroup& group : groups) total += group.count;
  const Tiling tile = tiling_for(total, K, N);
  std::vector<int64_t> row_tiles(G, 0);
  int64_t count_all = 0;
  for (int64_t g = 0; g < G; ++g) {
    row_tiles[g] = ceil_div(groups[g].count, tile.rows);
    count_all += row_tiles[g];
  }
  // Groups cut into whole tiles rarely give a row tile count the CPUs divide: the 5 groups
  // of a mixed batch of 4096 rows (4 x 832 and 768) made 19 tiles of 192-256 rows, 10 for
  // one thread and 9 for the other. While there are at least two tiles per CPU, the group
  // with the most rows per tile takes one more tile until they divide evenly (never below
  // kMinTileRows or kMinTileMacs a tile). On 2 CPUs (interleaved A/B, 2026-12-01, its
  // three layer shapes) the grouped GEMM of that batch went from 1.11-1.21x one oneDNN
  // call to 1.07-1.14x, and a routed layer of bench_model.py's top-1 batch from
  // 1.37-1.49x to 1.30-1.42x.
  const int64_t cpus = machine_cpus();
  if (count_all * ceil_div(N, tile.cols) >= 2 * cpus) {
    while (count_all % cpus != 0) {
      int64_t widest = -1;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t rows = row_tiles[g] > 0 ? ceil_div(groups[g].count, row_tiles[g] + 1) : 0;
        if (rows >= kMinTileRows &&
            static_cast<double>(rows) * static_cast<double>(tile.cols) * static_cast<double>(K) >=
                kMinTileMacs &&
            (widest < 0 || groups[g].count * row_tiles[widest] >
                               groups[widest].count * row_tiles[g]))
          widest = g;
      }
      if (widest < 0) break;
      ++row_tiles[widest];
      ++count_all;
    }
  }
  std::vector<TileItem> items;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t count = groups[g].count;
    if (count == 0) continue;
    const int64_t rows = round_up(ceil_div(count, row_tiles[g]), kRowQuantum);
    for (int64_t m0 = 0; m0 < count; m0 += rows)
      for (int64_t n0 = 0; n0 < N; n0 += tile.cols)
        items.push_back({g, m0, std::min(count, m0 + rows), n0, std::min(N, n0 + tile.cols)});
  }
  return items;
}

// A tile's input for a oneDNN call of `padded` (>= m1 - m0) rows: the group's rows
// [m0, m1) are rows [offset, offset + m1 - m0) of `rows`, the others are computed and
// dropped. Consecutive rows are a slice of `input`, widened over neighbouring rows (which
// exist, whatever they hold) and shifted back at its end; other rows, or an input with
// fewer than `padded` rows, are copied, with zero padding rows.
struct PaddedRows {
  at::Tensor rows;
  int64_t offset;
};

PaddedRows group_rows_padded(const at::Tensor& input, const RowGroup& group, int64_t m0,
                             int64_t m1, int64_t padded) {
  const int64_t count = m1 - m0, total = input.size(0);
  const int64_t* ids = group.rows != nullptr ? group.rows + m0 : nullptr;
  bool consecutive = true;
  for (int64_t m = 1; ids != nullptr && m < count && consecutive; ++m)
    consecutive = ids[m] == ids[0] + m;
  const int64_t first = ids != nullptr ? ids[0] : m0;
  if (consecutive && padded <= total) {
    const int64_t start = std::min(first, total - padded);
    return {input.slice(0, start, start + padded), first - start};
  }
  at::Tensor gathered = at::empty({padded, input.size(1)}, input.options());
  const int64_t row_bytes = input.size(1) * input.element_size();
  const char* from = static_cast<const char*>(input.const_data_ptr());
  char* to = static_cast<char*>(gathered.mutable_data_ptr());
  if (consecutive) {
    std::memcpy(to, from + first * row_bytes, count * row_bytes);
  } else {
    for (int64_t m = 0; m < count; ++m)
      std::memcpy(to + m * row_bytes, from + ids[m] * row_bytes, row_bytes);
  }
  std::memset(to + count * row_bytes, 0, (padded - count) * row_bytes);
  return {gathered, 0};
}

// The second product's input rows [m0, m1) of a group, then padding rows of zeros up to
// `padded` rows.
at::Tensor extra_rows_padded(const at::Tensor& input, const RowGroup& group, int64_t m0,
                             int64_t m1, int64_t padded) {
  at::Tensor rows = at::empty({padded, group.extra_weight->size(1)}, input.options());
  at::Tensor head = rows.narrow(0, 0, m1 - m0);
  group.extra_rows(m0, m1, head);
  rows.narrow(0, m1 - m0, padded - (m1 - m0)).zero_();
  return rows;
}

// Rows [m0, m1) of a group as a matrix: a slice of `input` (contiguous) when they are
// consecutive rows of it, else a copy.
at::Tensor group_rows(const at::Tensor& input, const RowGroup& group, int64_t m0, int64_t m1) {
  return group_rows_padded(input, group, m0, m1, m1 - m0).rows;
}

// The second product's input rows [m0, m1) of a group.
at::Tensor extra_rows(const at::Tensor& input, const RowGroup& group, int64_t m0, int64_t m1) {
  return extra_rows_padded(input, group, m0, m1, m1 - m0);
}

// The output row of a group's row m.
int64_t output_row(const RowGroup& group, int64_t m) {
  if (group.out_rows != nullptr) return group.out_rows[m];
  return group.rows != nullptr ? group.rows[m] : m;
}

// Each group's rows of input (float32, contiguous) times its weight^T, + b, into the same
// rows of out (float32, contiguous). Threads take work one unit at a time (tiles of
// different groups differ in size); each tile's result is copied once, straight to its
// rows. A unit is one tile, or, when its rows are copied (scattered rows, or a second
// product's rows, which are computed) and there are enough row blocks to keep every
// thread busy, all the column tiles of one row block, which then copies its rows once
// instead of once per tile. With 5 tasks and 26 rows a sample (a mixed batch, 1664 rows,
// 4 column tiles of 96), the grouped GEMM of a 384-output layer took 1.33-1.36x one
// oneDNN call over the batch copying per tile and 1.24-1.28x per block with d_in = 1536,
// 1.44-1.57x and 1.41-1.44x with d_in = 384 (interleaved A/B, 2026-12-01). Either way
// every tile is the same oneDNN call on the same rows, so the result does not depend on
// the thread count.
constexpr int64_t kRowBlocksPerThread = 4;

// Whether a tile of the group copies its input rows: they are not consecutive rows of the
// input, or the group has a second product (whose rows extra_rows computes).
bool copies_rows(const RowGroup& group) {
  if (group.extra_weight != nullptr) return true;
  for (int64_t m = 1; group.rows != nullptr && m < group.count; ++m)
    if (group.rows[m] != group.rows[0] + m) return true;
  return false;
}

void onednn_tiles(
    const c10::TypedOperatorHandle<OneDnnLinear>& linear, const at::Tensor& input,
    const std::vector<RowGroup>& groups, const c10::optional<at::Tensor>& bias,
    at::Tensor& out) {
  const int64_t N = out.size(1);
  const std::vector<TileItem> items = tile_items(groups, input.size(1), N);
  // Work unit u is tiles [units[u], units[u + 1]) (tile_items lists a block's tiles in a row).
  std::vector<int64_t> blocks;  // the first tile of each row block
  for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i)
    if (i == 0 || items[i].group != items[i - 1].group || items[i].m0 != items[i - 1].m0)
      blocks.push_back(i);
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> units;
  if (blocks.size() < items.size() &&
      static_cast<int64_t>(blocks.size()) >= kRowBlocksPerThread * threads &&
      std::any_of(groups.begin(), groups.end(), copies_rows)) {
    units = std::move(blocks);
  } else {
    units.resize(items.size());
    for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) units[i] = i;
  }
  units.push_back(static_cast<int64_t>(items.size()));
  const int64_t num_units = static_cast<int64_t>(units.size()) - 1;
  float* out_data = out.mutable_data_ptr<float>();
  std::atomic<int64_t> next{0};
  // The workers call operators: they run in the caller's dispatch state (inference mode).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, std::min<int64_t>(threads, num_units), 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    OneThreadPerCall one_thread;
    for (int64_t u = next++; u < num_units; u = next++) {
      const TileItem& block = items[units[u]];
      const RowGroup& group = groups[block.group];
      const int64_t padded = padded_rows(block.m1 - block.m0);
      const PaddedRows x = group_rows_padded(input, group, block.m0, block.m1, padded);
      at::Tensor x2;
      if (group.extra_weight != nullptr)
        x2 = extra_rows_padded(input, group, block.m0, block.m1, padded);
      for (int64_t i = units[u]; i < units[u + 1]; ++i) {
        const TileItem& it = items[i];
        c10::optional<at::Tensor> bias_tile;
        if (bias.has_value()) bias_tile = bias->slice(0, it.n0, it.n1);
        const int64_t cols = it.n1 - it.n0;
        const at::Tensor y =
            linear
                .call(x.rows, group.weight->slice(0, it.n0, it.n1), bias_tile, "none",
                      c10::List<c10::optional<at::Scalar>>(), c10::nullopt)
                .contiguous();
        const float* y_data = y.const_data_ptr<float>() + x.offset * cols;
        at::Tensor y2;
        if (x2.defined())
          y2 = linear
                   .call(x2, group.extra_weight->slice(0, it.n0, it.n1), c10::nullopt, "none",
                         c10::List<c10::optional<at::Scalar>>(), c10::nullopt)
                   .contiguous();
        const float* y2_data = y2.defined() ? y2.const_data_ptr<float>() : nullptr;
        // Row by row, in one pass over the output row: the product (+ the second product).
        for (int64_t m = it.m0; m < it.m1; ++m) {
          float* target = out_data + output_row(group, m) * N + it.n0;
          const float* product = y_data + (m - it.m0) * cols;
          if (y2_data != nullptr) {
            const float* second = y2_data + (m - it.m0) * cols;
            for (int64_t c = 0; c < cols; ++c) target[c] = product[c] + second[c];
          } else {
            std::memcpy(target, product, sizeof(float) * cols);
          }
        }
      }
    }
  });
}

// linear_rows's choice of library: oneDNN's linear, or null for ATen.
// Whether MASS_EXT_CPU_GEMM sends a float32 GEMM of `macs` multiply-adds to oneDNN.
bool onednn_chosen(double macs) {
  const GemmChoice choice = gemm_choice();
  return choice == GemmChoice::kOneDnn || (choice == GemmChoice::kAuto && macs >= kOneDnnMinMacs);
}

const c10::TypedOperatorHandle<OneDnnLinear>* onednn_for(
    const at::Tensor& rows, const at::Tensor& weight) {
  const int64_t M = rows.size(0), K = rows.size(1), N = weight.size(0);
  const bool use_onednn =
      rows.scalar_type() == at::kFloat && M > 0 && K > 0 && N > 0 && weight.is_contiguous() &&
      onednn_chosen(static_cast<double>(M) * static_cast<double>(K) * static_cast<double>(N));
  return use_onednn ? onednn_linear() : nullptr;
}

c10::optional<at::Tensor> contiguous_bias(const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return c10::nullopt;
  return bias->contiguous();
}

}  // namespace

// batched_products_plus's row tiles: about kProductTileMacs multiply-adds each (tiles of
// 1x kMinTileMacs took the merge of bench_model.py's three MiniLM layer shapes 0.2-2%
// longer, 2x, 4x and 8x within 1% of each other, 2026-12-01), halved while there are
// fewer than two per CPU and they stay above kMinTileRows and kMinTileMacs. From the
// shape and the CPU count alone, so the bits do not depend on the thread count.
constexpr double kProductTileMacs = 4 * kMinTileMacs;

bool batched_products_plus(const at::Tensor& lhs_t, const at::Tensor& rhs,
                           const at::Tensor& addend, at::Tensor& out) {
  const int64_t G = lhs_t.size(0), K = lhs_t.size(1), M = lhs_t.size(2), N = rhs.size(2);
  const double row_macs = static_cast<double>(N) * static_cast<double>(K);
  const OneDnnMatmul matmul = onednn_matmul();
  if (matmul == nullptr || G == 0 || M == 0 || N == 0 ||
      !onednn_chosen(static_cast<double>(G * M) * row_macs))
    return false;
  const auto tile_rows = static_cast<int64_t>(kProductTileMacs / std::max(row_macs, 1.0));
  int64_t rows = std::min(M, std::max(kMinTileRows, tile_rows));
  while (G * ceil_div(M, rows) < 2 * machine_cpus() && rows / 2 >= kMinTileRows &&
         static_cast<double>(rows / 2) * row_macs >= kMinTileMacs)
    rows = ceil_div(M, 2 * ceil_div(M, rows));  // twice the tiles, equal again
  const int64_t blocks = ceil_div(M, rows), items = G * blocks;
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(float));
  const char* addend_data = static_cast<const char*>(addend.const_data_ptr());
  const at::ThreadLocalState caller_state;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    OneThreadPerCall one_thread;
    for (int64_t i = next++; i < items; i = next++) {
      const int64_t g = i / blocks, m0 = (i % blocks) * rows, m1 = std::min(M, m0 + rows);
      at::Tensor target = out.select(0, g).narrow(0, m0, m1 - m0);
      std::memcpy(target.mutable_data_ptr(), addend_data + m0 * row_bytes, (m1 - m0) * row_bytes);
      matmul(lhs_t.select(0, g).narrow(1, m0, m1 - m0).t(), rhs.select(0, g), target, 1.0f, 1.0f);
    }
  });
  return true;
}

at::Tensor linear_rows(
    const at::Tensor& rows, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (const auto* linear = onednn_for(rows, weight)) {
    at::Tensor out = at::empty({rows.size(0), weight.size(0)}, rows.options());
    onednn_tiles(*linear, rows.contiguous(), {{&weight, nullptr, rows.size(0)}},
                 contiguous_bias(bias), out);
    return out;
  }
  if (bias.has_value()) return at::addmm(*bias, rows, weight.t());
  return at::mm(rows, weight.t());
}

void grouped_linear_rows_into(
    const at::Tensor& rows, const std::vector<RowGroup>& groups,
    const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && !groups.empty());
  for (const RowGroup& group : groups)
    TORCH_INTERNAL_ASSERT(
        group.weight->size(0) == out.size(1) && group.weight->is_contiguous() &&
        group.weight->scalar_type() == rows.scalar_type() &&
        group.weight->size(1) == rows.size(1) &&
        (group.extra_weight == nullptr ||
         (group.extra_rows && group.extra_weight->size(0) == out.size(1) &&
          group.extra_weight->is_contiguous() &&
          group.extra_weight->scalar_type() == rows.scalar_type())));
  // The library is chosen for all groups' rows together, as the tiles are.
  const auto* linear = out.scalar_type() == at::kFloat ? onednn_for(rows, *groups.front().weight)
                                                      : nullptr;
  if (linear != nullptr) {
    onednn_tiles(*linear, rows.contiguous(), groups, contiguous_bias(bias), out);
    return;
  }
  const at::Tensor input = rows.contiguous();
  for (const RowGroup& group : groups) {
    if (group.count == 0) continue;
    at::Tensor product = linear_rows(group_rows(input, group, 0, group.count), *group.weight, bias);
    if (group.extra_weight != nullptr)
      product.add_(linear_rows(extra_rows(input, group, 0, group.count), *group.extra_weight,
                               c10::nullopt));
    std::vector<int64_t> targets(group.count);
    for (int64_t m = 0; m < group.count; ++m) targets[m] = output_row(group, m);
    out.index_copy_(0, at::tensor(targets, at::kLong), product);
  }
}

}  // namespace cpu
}  // namespace mass_ext
