// Per-row routing math of DESIGN.md (steps 2-3), shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define MASS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MASS_HOST_DEVICE inline
#endif

namespace mass_ext {

enum class Weighting : int { kUniform = 0, kSoftmax = 1, kRenormalized = 2 };

// Added to the standard deviation before dividing, as in DESIGN.md.
constexpr double kStandardizeEps = 1e-6;

// res_t = sqrt(max(||x||^2 - ||z_t||^2, 0)) (V_t has orthonormal rows). A row with a
// NaN or inf gets NaN residuals, as the explicit ||x - V_t^T z_t|| would; so does a norm
// that overflowed (the kernels rescale finite rows first, see route_rows, so that only
// happens for rows whose norm is beyond the largest value of acc_t).
template <typename acc_t>
MASS_HOST_DEVICE acc_t residual_from_norms(acc_t x_norm2, acc_t z_norm2) {
  const acc_t diff = x_norm2 - z_norm2;
  if (std::isnan(diff) || std::isinf(x_norm2) || std::isinf(z_norm2))
    return std::numeric_limits<acc_t>::quiet_NaN();
  return std::sqrt(diff > acc_t(0) ? diff : acc_t(0));
}

// Below this ||x||^2 some squares of a row may have lost bits to underflow (float32:
// ||x|| < ~1e-12); above the largest acc_t they overflowed (float32: ||x|| > ~1.8e19).
template <typename acc_t>
MASS_HOST_DEVICE constexpr acc_t norm2_safe_min() {
  return std::numeric_limits<acc_t>::min() /
         (std::numeric_limits<acc_t>::epsilon() * std::numeric_limits<acc_t>::epsilon());
}

// Whether a row with this ||x||^2 must be redone divided by a power of two (see
// rescale_exponent): its squares overflowed or underflowed (or it holds a NaN / inf).
template <typename acc_t>
MASS_HOST_DEVICE bool norm2_needs_rescale(acc_t x_norm2) {
  return !(x_norm2 >= norm2_safe_min<acc_t>() && x_norm2 <= std::numeric_limits<acc_t>::max());
}

// e such that the largest |x_i| (max_abs) of a row is in [2^(e-1), 2^e): the row divided
// by 2^e (exact) has squares in range. 0 for a zero row or a row holding a NaN or inf
// (all_finite false): their residuals are already right.
template <typename acc_t>
MASS_HOST_DEVICE int rescale_exponent(acc_t max_abs, bool all_finite) {
  int e = 0;
  if (all_finite && max_abs > acc_t(0)) std::frexp(max_abs, &e);
  return e;
}

// The residual of one task from the norms of the row and its projection, both divided by
// 2^e (e from rescale_exponent; 0 = not rescaled), in the row's own units.
template <typename acc_t>
MASS_HOST_DEVICE acc_t scaled_residual(acc_t x_norm2, acc_t z_norm2, int e) {
  const acc_t res = residual_from_norms(x_norm2, z_norm2);
  return e != 0 ? std::ldexp(res, e) : res;
}

// logit_t = -res_t; a NaN logit becomes -inf so that a non-finite row still selects
// valid tasks (the lowest ids, as ties).

template <typename acc_t>
MASS_HOST_DEVICE acc_t logit_from_residual(acc_t residual) {
  return std::isnan(residual) ? -std::numeric_limits<acc_t>::infinity() : -residual;
}

// From T logits: p = softmax(standardize(logits) / temperature) into `probs`, the
// top_k tasks by logit (ties -> lower task index) into `indices`, slots j >= 1 whose
// p <= threshold dropped (index -1, weight 0), and the slot weights into `weights`.
template <typename acc_t>
MASS_HOST_DEVICE void select_tasks(
    const acc_t* __restrict__ logits,  // [T]
    acc_t* __restrict__ probs,         // [T], output
    int64_t T, int64_t top_k, acc_t temperature, acc_t threshold, Weighting weighting,
    int64_t* __restrict__ indices,     // [top_k], output
    acc_t* __restrict__ weights) {     // [top_k], output
  if (T == 1) {
    probs[0] = acc_t(1);
  } else {
    // The logits are divided by a power of two 2^e near their largest magnitude first
    // (eps too; exact), so that the sum and the squares below cannot overflow (float32
    // residuals beyond ~1e19) or underflow.
    acc_t max_abs = 0;
    for (int64_t t = 0; t < T; ++t) {
      const acc_t a = std::fabs(logits[t]);
      if (std::isfinite(a) && a > max_abs) max_abs = a;
    }
    int e = 0;
    if (max_abs > acc_t(0)) std::frexp(max_abs, &e);
    acc_t mean = 0;
    for (int64_t t = 0; t < T; ++t) mean += std::ldexp(logits[t], -e);
    mean /= acc_t(T);
    // Corrected two-pass variance: sum c^2 - (sum c)^2 / T removes the rounding error of
    // `mean` (c = l - mean). Without it, rows whose logits are large and nearly tied lose
    // most of the spread's bits in float32 (p off by up to 40% when the spread is 1e-6 of
    // the logits; 6e-7 with it). NaN stays NaN.
    acc_t var = 0, centred_sum = 0;
    for (int64_t t = 0; t < T; ++t) {
      const acc_t centred = std::ldexp(logits[t], -e) - mean;
      var += centred * centred;
      centred_sum += centred;
    }
    var -= centred_sum * centred_sum / acc_t(T);
    if (var < acc_t(0)) var = acc_t(0);
    // eps / 2^e is at least the smallest denormal: the divisor is never 0.
    const acc_t divisor = std::sqrt(var / acc_t(T - 1)) + std::ldexp(acc_t(kStandardizeEps), -e);
    acc_t max_standardized = -std::numeric_limits<acc_t>::infinity();
    for (int64_t t = 0; t < T; ++t) {
      probs[t] = (std::ldexp(logits[t], -e) - mean) / divisor;
      max_standardized = probs[t] > max_standardized ? probs[t] : max_standardized;
    }
    // The max is subtracted before the temperature divides: every exponent is then finite
    // and <= 0 for any temperature > 0 (a tiny one gives the arg-max, not inf - inf). A
    // temperature that rounded to 0 in acc_t has the same limit as the smallest one.
    const acc_t temp =
        temperature > acc_t(0) ? temperature : std::numeric_limits<acc_t>::denorm_min();
    acc_t total = 0;
    for (int64_t t = 0; t < T; ++t) {
      probs[t] = std::exp((probs[t] - max_standardized) / temp);
      total += probs[t];
    }
    for (int64_t t = 0; t < T; ++t) probs[t] /= total;
  }

  // Selection by repeated arg-max: O(top_k * T), and T is small. Scanning upward
  // with a strict '>' keeps the lower task index on ties.
  acc_t kept_prob_sum = 0;
  for (int64_t j = 0; j < top_k; ++j) {
    int64_t best = -1;
    for (int64_t t = 0; t < T; ++t) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= (indices[i] == t);
      if (taken) continue;
      if (best < 0 || logits[t] > logits[best]) best = t;
    }
    indices[j] = best;
  }
  // A dropped slot keeps its place (shapes stay fixed); the first slot is never dropped.
  for (int64_t j = 1; j < top_k; ++j) {
    if (!(probs[indices[j]] > threshold)) indices[j] = -1;
  }
  for (int64_t j = 0; j < top_k; ++j) {
    if (indices[j] >= 0) kept_prob_sum += probs[indices[j]];
  }
  for (int64_t j = 0; j < top_k; ++j) {
    const int64_t t = indices[j];
    if (t < 0) {
      weights[j] = acc_t(0);
    } else if (weighting == Weighting::kUniform) {
      weights[j] = acc_t(1);
    } else if (weighting == Weighting::kSoftmax) {
      weights[j] = probs[t];
    } else {
      weights[j] = probs[t] / kept_prob_sum;
    }
  }
}

}  // namespace mass_ext
