// Register-tiled kernels for both halves of the per-task low-rank product, over the rows
// ("slots") that selected one task t:
//   shrink:  h[slot, q]   = w[slot] * S_t[q] * sum_i x[row(slot), i] * V_t[q, i]
//   expand:  y[row(slot), c] += sum_q h[slot, q] * U_t[c, q]
// Both are C[rows, cols] = A[rows, :] . B[cols, :]^T with B's rows contiguous, so one
// micro-kernel serves both: a tile of 16 columns of B is packed transposed ([len][16]),
// then 6 rows of A are multiplied into it as outer products (12 accumulator vectors +
// 2 B vectors + 1 broadcast = 15 of the 16 AVX2 registers), with no horizontal sums.
//
// routed_linear_cpu.cpp includes this file twice, once under `#pragma GCC target
// ("avx2,fma")` and once without, in different namespaces, and picks one at run time.
// It must include nothing itself.
//
// Every output element is reduced over its full length in a fixed order that does not
// depend on the thread split, so results are bitwise reproducible for any thread count.

template <typename acc_t>
struct Simd;
template <>
struct Simd<float> {
  using vec = float __attribute__((vector_size(32)));
  using unaligned_vec = float __attribute__((vector_size(32), aligned(4), may_alias));
  static constexpr int kLanes = 8;
};
template <>
struct Simd<double> {
  using vec = double __attribute__((vector_size(32)));
  using unaligned_vec = double __attribute__((vector_size(32), aligned(8), may_alias));
  static constexpr int kLanes = 4;
};

// One vector of acc_t from any element type (unaligned; bfloat16 widened exactly).
template <typename acc_t, typename T>
inline typename Simd<acc_t>::vec load_vec(const T* p) {
  typename Simd<acc_t>::vec v;
  for (int l = 0; l < Simd<acc_t>::kLanes; ++l) v[l] = static_cast<acc_t>(p[l]);
  return v;
}

template <>
inline Simd<float>::vec load_vec<float, float>(const float* p) {
  return *reinterpret_cast<const Simd<float>::unaligned_vec*>(p);
}

template <>
inline Simd<double>::vec load_vec<double, double>(const double* p) {
  return *reinterpret_cast<const Simd<double>::unaligned_vec*>(p);
}

template <>
inline Simd<float>::vec load_vec<float, c10::BFloat16>(const c10::BFloat16* p) {
  // bfloat16 is the high half of a float32: widen and shift.
  using u16x8 = uint16_t __attribute__((vector_size(16), aligned(2), may_alias));
  using u32x8 = uint32_t __attribute__((vector_size(32)));
  const u32x8 bits = __builtin_convertvector(*reinterpret_cast<const u16x8*>(p), u32x8) << 16;
  return reinterpret_cast<const Simd<float>::vec&>(bits);
}

constexpr int kTileRows = 6;

// Columns per tile: two vectors.
template <typename acc_t>
constexpr int tile_cols() {
  return 2 * Simd<acc_t>::kLanes;
}

// packed[i * TC + c] = B[(col0 + c) * b_stride + i] for c < ncols, 0 for the padding.
template <typename acc_t, typename TB>
inline void pack_tile(
    const TB* __restrict__ b, int64_t b_stride, int64_t col0, int64_t ncols, int64_t len,
    acc_t* __restrict__ packed) {
  constexpr int TC = tile_cols<acc_t>();
  for (int c = 0; c < TC; ++c) {
    if (c < ncols) {
      const TB* src = b + (col0 + c) * b_stride;
      for (int64_t i = 0; i < len; ++i) packed[i * TC + c] = static_cast<acc_t>(src[i]);
    } else {
      for (int64_t i = 0; i < len; ++i) packed[i * TC + c] = acc_t(0);
    }
  }
}

// acc[m][v] = sum_i a[m][i] * packed[i][v * lanes .. +lanes)
template <int MR, typename acc_t, typename TA>
inline __attribute__((always_inline)) void outer_tile(
    const TA* const* a,                 // MR row pointers, each [len]
    const acc_t* __restrict__ packed,   // [len, TC]
    int64_t len, typename Simd<acc_t>::vec (&acc)[MR][2]) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int L = Simd<acc_t>::kLanes;
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = vec{};
  for (int64_t i = 0; i < len; ++i) {
    const vec b0 = *reinterpret_cast<const vec*>(packed + i * 2 * L);
    const vec b1 = *reinterpret_cast<const vec*>(packed + i * 2 * L + L);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const acc_t av = static_cast<acc_t>(a[m][i]);
      acc[m][0] += av * b0;
      acc[m][1] += av * b1;
    }
  }
}

// Runs outer_tile over `num_slots` slots, kTileRows at a time, handing each finished
// row of the tile to store(slot, values[TC]).
template <int MR, typename acc_t, typename TA, typename RowOf, typename Store>
inline __attribute__((always_inline)) void slot_tile(
    const int64_t* slots, RowOf row_of, const acc_t* packed, int64_t len, Store store) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int L = Simd<acc_t>::kLanes;
  const TA* a[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) a[m] = row_of(slots[m]);
  vec acc[MR][2];
  outer_tile<MR, acc_t, TA>(a, packed, len, acc);
  alignas(32) acc_t values[2 * L];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    *reinterpret_cast<vec*>(values) = acc[m][0];
    *reinterpret_cast<vec*>(values + L) = acc[m][1];
    store(slots[m], values);
  }
}

// Few slots (decode): packing B would cost more than it saves, so each of MR rows is
// dotted with NR rows of B directly, vectorised along len, and reduced at the end.
template <int MR, int NR, typename acc_t, typename TA, typename TB>
inline __attribute__((always_inline)) void dot_tile(
    const TA* const* a, const TB* const* b, int64_t len, acc_t (&out)[MR][NR]) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int L = Simd<acc_t>::kLanes;
  vec acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = vec{};
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    vec av[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) av[m] = load_vec<acc_t>(a[m] + i);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const vec bv = load_vec<acc_t>(b[n] + i);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] += av[m] * bv;
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      acc_t total = 0;
      for (int l = 0; l < L; ++l) total += acc[m][n][l];
      for (int64_t j = i; j < len; ++j)
        total += static_cast<acc_t>(a[m][j]) * static_cast<acc_t>(b[n][j]);
      out[m][n] = total;
    }
}

template <int MR, typename acc_t, typename TA, typename TB, typename RowOf, typename Store>
inline __attribute__((always_inline)) void direct_tile(
    const int64_t* slots, RowOf row_of, const TB* b, int64_t b_stride, int64_t col0,
    int64_t ncols, int64_t len, Store store) {
  constexpr int TC = tile_cols<acc_t>(), NR = 4;
  const TA* a[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) a[m] = row_of(slots[m]);
  acc_t values[MR][TC];
  for (int64_t c = 0; c < ncols; c += NR) {
    const TB* bp[NR];
    // Past the last column, re-read it: valid memory, result discarded.
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) bp[n] = b + (col0 + (c + n < ncols ? c + n : ncols - 1)) * b_stride;
    acc_t out[MR][NR];
    dot_tile<MR, NR, acc_t>(a, bp, len, out);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) values[m][c + n] = out[m][n];
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) store(slots[m], values[m]);
}

// A task with at least this many slots gets its B tile packed (see the top of the file).
constexpr int64_t kPackMinSlots = 8;

// out(slot, col0 + c) for c < ncols and every slot, handed row by row to
// store(slot, values[TC]). `packed` is scratch of len * TC elements, 32-byte aligned.
template <typename acc_t, typename TA, typename TB, typename RowOf, typename Store>
void all_slots(const int64_t* slots, int64_t num_slots, RowOf row_of, const TB* b,
               int64_t b_stride, int64_t col0, int64_t ncols, int64_t len, acc_t* packed,
               Store store) {
  int64_t s = 0;
  if (num_slots < kPackMinSlots) {
    for (; s + 2 <= num_slots; s += 2)
      direct_tile<2, acc_t, TA>(slots + s, row_of, b, b_stride, col0, ncols, len, store);
    if (s < num_slots)
      direct_tile<1, acc_t, TA>(slots + s, row_of, b, b_stride, col0, ncols, len, store);
    return;
  }
  pack_tile(b, b_stride, col0, ncols, len, packed);
  for (; s + kTileRows <= num_slots; s += kTileRows)
    slot_tile<kTileRows, acc_t, TA>(slots + s, row_of, packed, len, store);
  switch (num_slots - s) {
    case 5: slot_tile<5, acc_t, TA>(slots + s, row_of, packed, len, store); break;
    case 4: slot_tile<4, acc_t, TA>(slots + s, row_of, packed, len, store); break;
    case 3: slot_tile<3, acc_t, TA>(slots + s, row_of, packed, len, store); break;
    case 2: slot_tile<2, acc_t, TA>(slots + s, row_of, packed, len, store); break;
    case 1: slot_tile<1, acc_t, TA>(slots + s, row_of, packed, len, store); break;
    default: break;
  }
}

// Expand for output columns [col_begin, col_end) of every task's slots.
// `packed` is caller scratch of r * tile_cols<acc_t>() elements, 32-byte aligned.
template <typename acc_t, typename scalar_t>
void expand_columns(
    const acc_t* __restrict__ h,               // [N * k, r] scaled projections
    const scalar_t* __restrict__ U,            // [T, d_out, r]
    const int64_t* __restrict__ task_slots,    // slots grouped by task
    const int64_t* __restrict__ task_offsets,  // [T + 1] into task_slots
    int64_t T, int64_t r, int64_t d_out, int64_t k, int64_t col_begin, int64_t col_end,
    acc_t* __restrict__ packed,                // [r, TC] scratch
    acc_t* __restrict__ y) {                   // [N, d_out]
  constexpr int TC = tile_cols<acc_t>();
  const auto row_of = [h, r](int64_t slot) { return h + slot * r; };
  for (int64_t c0 = col_begin; c0 < col_end; c0 += TC) {
    const int64_t ncols = c0 + TC <= col_end ? TC : col_end - c0;
    const auto store = [y, d_out, k, c0, ncols](int64_t slot, const acc_t* values) {
      acc_t* out = y + (slot / k) * d_out + c0;
      for (int64_t c = 0; c < ncols; ++c) out[c] += values[c];
    };
    for (int64_t t = 0; t < T; ++t) {
      const int64_t begin = task_offsets[t], end = task_offsets[t + 1];
      if (begin == end) continue;
      all_slots<acc_t, acc_t>(task_slots + begin, end - begin, row_of, U + t * d_out * r, r, c0,
                              ncols, r, packed, store);
    }
  }
}

// Shrink for rank rows [q_begin, q_end) of task t over a run of its slots.
// `packed` is caller scratch of d_in * tile_cols<acc_t>() elements, 32-byte aligned.
template <typename acc_t, typename scalar_t>
void shrink_rows(
    const scalar_t* __restrict__ x,  // [N, d_in], rows x_row_stride apart
    int64_t x_row_stride,
    const scalar_t* __restrict__ V_t,        // [r, d_in]
    const scalar_t* __restrict__ S_t,        // [r]
    const acc_t* __restrict__ slot_weights,  // [N * k]
    const int64_t* __restrict__ slots, int64_t num_slots, int64_t k, int64_t r,
    int64_t d_in, int64_t q_begin, int64_t q_end,
    acc_t* __restrict__ packed,  // [d_in, TC] scratch
    acc_t* __restrict__ h) {     // [N * k, r]
  constexpr int TC = tile_cols<acc_t>();
  const auto row_of = [x, x_row_stride, k](int64_t slot) {
    return x + (slot / k) * x_row_stride;
  };
  for (int64_t q0 = q_begin; q0 < q_end; q0 += TC) {
    const int64_t nq = q0 + TC <= q_end ? TC : q_end - q0;
    const auto store = [h, r, q0, nq, S_t, slot_weights](int64_t slot, const acc_t* values) {
      for (int64_t c = 0; c < nq; ++c)
        h[slot * r + q0 + c] = values[c] * slot_weights[slot] * static_cast<acc_t>(S_t[q0 + c]);
    };
    all_slots<acc_t, scalar_t>(slots, num_slots, row_of, V_t, d_in, q0, nq, d_in, packed, store);
  }
}

// ||x[n]||^2 for n in [row_begin, row_end), into out[n - row_begin].
template <typename acc_t>
void row_norms2(
    const acc_t* __restrict__ x, int64_t x_row_stride, int64_t d_in, int64_t row_begin,
    int64_t row_end, acc_t* __restrict__ out) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int L = Simd<acc_t>::kLanes;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const acc_t* row = x + n * x_row_stride;
    vec acc = vec{};
    int64_t i = 0;
    for (; i + L <= d_in; i += L) {
      const vec v = load_vec<acc_t>(row + i);
      acc += v * v;
    }
    acc_t total = 0;
    for (int l = 0; l < L; ++l) total += acc[l];
    for (; i < d_in; ++i) total += row[i] * row[i];
    out[n - row_begin] = total;
  }
}
