// Register-tiled dot products for both halves of the per-task low-rank product, over
// the rows ("slots") that selected one task t:
//   shrink:  h[slot, q]    = w[slot] * S_t[q] * sum_i x[row(slot), i] * V_t[q, i]
//   expand:  y[row(slot), c] += sum_q h[slot, q] * U_t[c, q]
// Both are C[slots, cols] = A[slots, :] . B[cols, :]^T with rows of A and B contiguous
// (V is (T, r, d_in), U is (T, d_out, r)), so one micro-kernel serves both, reading the
// factors in place: no packing, no transposed copies.
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
  // A bit cast, not a reinterpret_cast of a reference: reading a uint32 vector through a
  // float vector lvalue breaks strict aliasing (GCC: "'bits' is used uninitialized").
  return __builtin_bit_cast(Simd<float>::vec, bits);
}

// Sums of the lanes of 4 vectors: {sum(v0), sum(v1), sum(v2), sum(v3)}, in a fixed
// order. Reducing 4 accumulators together costs 1/4 of reducing them one by one.
inline void lane_sums4(const Simd<float>::vec (&v)[4], float (&out)[4]) {
  using vec = Simd<float>::vec;
  using idx = int __attribute__((vector_size(32)));
  const vec t0 = __builtin_shuffle(v[0], v[1], idx{0, 8, 2, 10, 4, 12, 6, 14}) +
                 __builtin_shuffle(v[0], v[1], idx{1, 9, 3, 11, 5, 13, 7, 15});
  const vec t1 = __builtin_shuffle(v[2], v[3], idx{0, 8, 2, 10, 4, 12, 6, 14}) +
                 __builtin_shuffle(v[2], v[3], idx{1, 9, 3, 11, 5, 13, 7, 15});
  // u = {s0 lo, s1 lo, s2 lo, s3 lo, s0 hi, s1 hi, s2 hi, s3 hi}
  const vec u = __builtin_shuffle(t0, t1, idx{0, 1, 8, 9, 4, 5, 12, 13}) +
                __builtin_shuffle(t0, t1, idx{2, 3, 10, 11, 6, 7, 14, 15});
  for (int n = 0; n < 4; ++n) out[n] = u[n] + u[n + 4];
}

inline void lane_sums4(const Simd<double>::vec (&v)[4], double (&out)[4]) {
  for (int n = 0; n < 4; ++n) out[n] = (v[n][0] + v[n][2]) + (v[n][1] + v[n][3]);
}

// out[m][n] = sum_i a[m][i] * b[n][i]: MR rows of A against 4 rows of B, vectorised
// along i. 3 x 4 fills the AVX2 registers: 12 accumulators + 3 A vectors + 1 B vector.
// The loops are fully unrolled so that the accumulators live in registers.
template <int MR, typename acc_t, typename TA, typename TB>
inline __attribute__((always_inline)) void dot_tile(
    const TA* const* a,  // MR row pointers, each [len]
    const TB* const* b,  // 4 row pointers, each [len]
    int64_t len, acc_t (&out)[MR][4]) {
  using vec = typename Simd<acc_t>::vec;
  constexpr int L = Simd<acc_t>::kLanes;
  vec acc[MR][4];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) acc[m][n] = vec{};
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    vec av[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) av[m] = load_vec<acc_t>(a[m] + i);
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) {
      const vec bv = load_vec<acc_t>(b[n] + i);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] += av[m] * bv;
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    lane_sums4(acc[m], out[m]);
    for (int64_t j = i; j < len; ++j)
#pragma GCC unroll 4
      for (int n = 0; n < 4; ++n)
        out[m][n] += static_cast<acc_t>(a[m][j]) * static_cast<acc_t>(b[n][j]);
  }
}

// For MR slots (row of x = rows[m]) and every col in [col_begin, col_end), 4 cols at a
// time: the dot of A's row a_of(slot, row) with B's row col goes to
// put(dest_of(slot, row), col, value).
template <int MR, typename acc_t, typename TA, typename TB, typename AOf, typename DestOf,
          typename Put>
inline __attribute__((always_inline)) void slot_tile(
    const int64_t* slots, const int64_t* rows, AOf a_of, DestOf dest_of, Put put, const TB* b,
    int64_t b_stride, int64_t col, int64_t col_end, int64_t len) {
  const TA* a[MR];
  decltype(dest_of(slots[0], rows[0])) dest[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    a[m] = a_of(slots[m], rows[m]);
    dest[m] = dest_of(slots[m], rows[m]);
  }
  const TB* bp[4];
  // Past the last column, re-read it: valid memory, result discarded.
#pragma GCC unroll 4
  for (int n = 0; n < 4; ++n) bp[n] = b + (col + n < col_end ? col + n : col_end - 1) * b_stride;
  acc_t out[MR][4];
  dot_tile<MR, acc_t>(a, bp, len, out);
  if (col + 4 <= col_end) {
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int n = 0; n < 4; ++n) put(dest[m], col + n, out[m][n]);
  } else {
    for (int m = 0; m < MR; ++m)
      for (int64_t n = 0; col + n < col_end; ++n) put(dest[m], col + n, out[m][n]);
  }
}

// Every slot against every col in [col_begin, col_end). Columns outermost: the 4 rows
// of B in flight stay in L1 while the slots' rows of A go past.
template <typename acc_t, typename TA, typename TB, typename AOf, typename DestOf, typename Put>
void grouped_dot(const int64_t* slots, const int64_t* rows, int64_t num_slots, AOf a_of,
                 DestOf dest_of, Put put, const TB* b, int64_t b_stride, int64_t col_begin,
                 int64_t col_end, int64_t len) {
  for (int64_t col = col_begin; col < col_end; col += 4) {
    int64_t s = 0;
    for (; s + 3 <= num_slots; s += 3)
      slot_tile<3, acc_t, TA>(slots + s, rows + s, a_of, dest_of, put, b, b_stride, col, col_end, len);
    if (num_slots - s == 2)
      slot_tile<2, acc_t, TA>(slots + s, rows + s, a_of, dest_of, put, b, b_stride, col, col_end, len);
    else if (num_slots - s == 1)
      slot_tile<1, acc_t, TA>(slots + s, rows + s, a_of, dest_of, put, b, b_stride, col, col_end, len);
  }
}

// Expand for output columns [col_begin, col_end):
//   y[slot / k, col] += sum_q h[slot, q] * U[t, col, q]   for every slot routed to t.
// Tasks are visited in order for each column block, so every y element receives its
// contributions in the same order whatever the thread split.
template <typename acc_t, typename scalar_t>
void expand_columns(
    const acc_t* __restrict__ h,               // [N * k, r] scaled projections
    const scalar_t* __restrict__ U,            // [T, d_out, r]
    const int64_t* __restrict__ task_slots,    // slots grouped by task
    const int64_t* __restrict__ task_rows,     // row of x of each of those slots
    const int64_t* __restrict__ task_offsets,  // [T + 1] into task_slots
    int64_t T, int64_t r, int64_t d_out, int64_t col_begin, int64_t col_end,
    acc_t* __restrict__ y) {                   // [N, d_out]
  // 64 rows of U_t (24 KB at r = 96) stay in L1 while every slot of t streams past.
  constexpr int64_t kColBlock = 64;
  const auto a_of = [h, r](int64_t slot, int64_t) { return h + slot * r; };
  const auto dest_of = [y, d_out](int64_t, int64_t row) { return y + row * d_out; };
  const auto put = [](acc_t* y_row, int64_t col, acc_t v) { y_row[col] += v; };
  for (int64_t c0 = col_begin; c0 < col_end; c0 += kColBlock) {
    const int64_t c1 = c0 + kColBlock < col_end ? c0 + kColBlock : col_end;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t begin = task_offsets[t], end = task_offsets[t + 1];
      if (begin == end) continue;
      grouped_dot<acc_t, acc_t>(task_slots + begin, task_rows + begin, end - begin, a_of,
                                dest_of, put, U + t * d_out * r, r, c0, c1, r);
    }
  }
}

// The same expand when each U_t is stored column-major (U[t, c, q] at
// U + t * d_out * r + q * d_out + c, i.e. U.transpose(1, 2) contiguous): then a row
// of U_t^T is contiguous and 6 slots x 16 columns are accumulated as outer products
// (12 accumulator vectors + 2 U vectors + 1 broadcast of h), with no sums across lanes.
// Columns past the last full 16 are done one by one.
template <int MR, typename acc_t, typename scalar_t>
inline __attribute__((always_inline)) void outer_tile(
    const acc_t* const* h_rows, acc_t* const* y_rows, const scalar_t* U_t, int64_t r,
    int64_t d_out, int64_t c0) {
  using vec = typename Simd<acc_t>::vec;
  using unaligned_vec = typename Simd<acc_t>::unaligned_vec;
  constexpr int L = Simd<acc_t>::kLanes;
  vec acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = vec{};
  for (int64_t q = 0; q < r; ++q) {
    const vec b0 = load_vec<acc_t>(U_t + q * d_out + c0);
    const vec b1 = load_vec<acc_t>(U_t + q * d_out + c0 + L);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const acc_t hv = h_rows[m][q];
      acc[m][0] += hv * b0;
      acc[m][1] += hv * b1;
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    auto* y0 = reinterpret_cast<unaligned_vec*>(y_rows[m] + c0);
    auto* y1 = reinterpret_cast<unaligned_vec*>(y_rows[m] + c0 + L);
    *y0 = *y0 + acc[m][0];
    *y1 = *y1 + acc[m][1];
  }
}

// Fewer slots than a tile (decode): stream whole rows of U_t^T, contiguous, and add
// h[q] * U_t^T[q] into each slot's y block, which stays in L1. Reading U_t^T in 16-column
// strips instead would touch one page per row of U_t^T for every strip.
template <typename acc_t, typename scalar_t>
inline void axpy_rows(
    const acc_t* const* h_rows, acc_t* const* y_rows, int64_t rows, const scalar_t* U_t,
    int64_t r, int64_t d_out, int64_t col_begin, int64_t col_end) {
  using vec = typename Simd<acc_t>::vec;
  using unaligned_vec = typename Simd<acc_t>::unaligned_vec;
  constexpr int L = Simd<acc_t>::kLanes;
  constexpr int64_t kBlock = 1024;  // columns of y per pass: 4 KB per row in float32
  for (int64_t b0 = col_begin; b0 < col_end; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < col_end ? b0 + kBlock : col_end;
    for (int64_t q = 0; q < r; ++q) {
      const scalar_t* u = U_t + q * d_out;
      for (int64_t m = 0; m < rows; ++m) {
        const acc_t hv = h_rows[m][q];
        acc_t* y = y_rows[m];
        int64_t c = b0;
        for (; c + L <= b1; c += L) {
          auto* yv = reinterpret_cast<unaligned_vec*>(y + c);
          *yv = *yv + hv * load_vec<acc_t>(u + c);
        }
        for (; c < b1; ++c) y[c] += hv * static_cast<acc_t>(u[c]);
      }
    }
  }
}

template <typename acc_t, typename scalar_t>
void expand_columns_column_major(
    const acc_t* __restrict__ h,               // [N * k, r]
    const scalar_t* __restrict__ U,            // [T, r, d_out] storage of (T, d_out, r)
    const int64_t* __restrict__ task_slots, const int64_t* __restrict__ task_rows,
    const int64_t* __restrict__ task_offsets, int64_t T, int64_t r, int64_t d_out,
    int64_t col_begin, int64_t col_end, acc_t* __restrict__ y) {  // y: [N, d_out]
  constexpr int TC = 2 * Simd<acc_t>::kLanes;
  constexpr int MR = 6;
  const int64_t full_end = col_begin + (col_end - col_begin) / TC * TC;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t begin = task_offsets[t], end = task_offsets[t + 1];
    const scalar_t* U_t = U + t * d_out * r;
    if (end - begin < MR) {
      const acc_t* h_rows[MR];
      acc_t* y_rows[MR];
      for (int64_t m = 0; m < end - begin; ++m) {
        h_rows[m] = h + task_slots[begin + m] * r;
        y_rows[m] = y + task_rows[begin + m] * d_out;
      }
      axpy_rows(h_rows, y_rows, end - begin, U_t, r, d_out, col_begin, col_end);
      continue;
    }
    // Column tile outermost: its r rows of U_t^T (r cache lines) stay in L1 while every
    // slot of t goes past.
    for (int64_t c0 = col_begin; c0 < full_end; c0 += TC) {
      for (int64_t s = begin; s < end; s += MR) {
        const int64_t rows = end - s < MR ? end - s : MR;
        const acc_t* h_rows[MR];
        acc_t* y_rows[MR];
        for (int64_t m = 0; m < rows; ++m) {
          h_rows[m] = h + task_slots[s + m] * r;
          y_rows[m] = y + task_rows[s + m] * d_out;
        }
        switch (rows) {
          case 6: outer_tile<6>(h_rows, y_rows, U_t, r, d_out, c0); break;
          case 5: outer_tile<5>(h_rows, y_rows, U_t, r, d_out, c0); break;
          case 4: outer_tile<4>(h_rows, y_rows, U_t, r, d_out, c0); break;
          case 3: outer_tile<3>(h_rows, y_rows, U_t, r, d_out, c0); break;
          case 2: outer_tile<2>(h_rows, y_rows, U_t, r, d_out, c0); break;
          default: outer_tile<1>(h_rows, y_rows, U_t, r, d_out, c0); break;
        }
      }
    }
    for (int64_t s = begin; s < end; ++s) {
      const acc_t* h_row = h + task_slots[s] * r;
      acc_t* y_row = y + task_rows[s] * d_out;
      for (int64_t c = full_end; c < col_end; ++c) {
        acc_t total = 0;
        for (int64_t q = 0; q < r; ++q) total += h_row[q] * static_cast<acc_t>(U_t[q * d_out + c]);
        y_row[c] += total;
      }
    }
  }
}

// Shrink for rank rows [q_begin, q_end) of task t over a run of its slots.
template <typename acc_t, typename scalar_t>
void shrink_rows(
    const scalar_t* __restrict__ x,  // [N, d_in], rows x_row_stride apart
    int64_t x_row_stride,
    const scalar_t* __restrict__ V_t,        // [r, d_in]
    const scalar_t* __restrict__ S_t,        // [r]
    const acc_t* __restrict__ slot_weights,  // [N * k]
    const int64_t* __restrict__ slots, const int64_t* __restrict__ rows, int64_t num_slots,
    int64_t r, int64_t d_in, int64_t q_begin, int64_t q_end,
    acc_t* __restrict__ h) {     // [N * k, r]
  const auto a_of = [x, x_row_stride](int64_t, int64_t row) { return x + row * x_row_stride; };
  struct Dest { acc_t* h_row; acc_t weight; };
  const auto dest_of = [h, r, slot_weights](int64_t slot, int64_t) {
    return Dest{h + slot * r, slot_weights[slot]};
  };
  const auto put = [S_t](const Dest& dest, int64_t q, acc_t v) {
    dest.h_row[q] = v * dest.weight * static_cast<acc_t>(S_t[q]);
  };
  grouped_dot<acc_t, scalar_t>(slots, rows, num_slots, a_of, dest_of, put, V_t, d_in, q_begin,
                               q_end, d_in);
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
