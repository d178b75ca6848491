#include "checks.h"

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

namespace mass_ext {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

std::string dtype_str(at::ScalarType dtype) {
  // Python's spelling (torch.float32 -> "float32"), as users write it.
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kUInt16: return "uint16";
    case at::kUInt32: return "uint32";
    case at::kUInt64: return "uint64";
    case at::kComplexHalf: return "complex32";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    case at::kFloat8_e5m2: return "float8_e5m2";
    case at::kFloat8_e4m3fn: return "float8_e4m3fn";
    case at::kFloat8_e5m2fnuz: return "float8_e5m2fnuz";
    case at::kFloat8_e4m3fnuz: return "float8_e4m3fnuz";
    default: return c10::toString(dtype);  // newer or rarer dtypes: C++'s spelling
  }
}

namespace {

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
          dtype == at::kHalf,
      name, " must be float32, float64, bfloat16 or float16, got ", dtype_str(dtype));
}

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (",
      dtype_str(x.scalar_type()), "), got ", dtype_str(t.scalar_type()));
  TORCH_CHECK_VALUE(
      t.device() == x.device(), name, " must be on the device of x (", x.device(),
      "), got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, const char* symbolic,
                 at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(
      t.sizes() == expected, name, " must have shape ", symbolic, " = ",
      shape_str(expected), ", got ", shape_str(t.sizes()));
}

}  // namespace

LayerDims check_route_inputs(const at::Tensor& x, const at::Tensor& V) {
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension (..., d_in), got a 0-d tensor");
  TORCH_CHECK_VALUE(
      V.dim() == 3, "V must have 3 dimensions (T, r, d_in), got shape ", shape_str(V.sizes()));
  check_like_x(V, "V", x);
  LayerDims dims;
  dims.d_in = x.size(-1);
  dims.N = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) dims.N *= x.size(i);
  dims.T = V.size(0);
  dims.r = V.size(1);
  dims.d_out = 0;
  TORCH_CHECK_VALUE(dims.T >= 1, "V must hold at least one task (T >= 1), got shape ", shape_str(V.sizes()));
  TORCH_CHECK_VALUE(dims.r >= 1, "V must have rank r >= 1, got shape ", shape_str(V.sizes()));
  check_shape(V, "V", "(T, r, d_in)", {dims.T, dims.r, dims.d_in});
  return dims;
}

LayerDims check_layer_inputs(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V) {
  LayerDims dims = check_route_inputs(x, V);
  TORCH_CHECK_VALUE(
      weight.dim() == 2, "weight must have 2 dimensions (d_out, d_in), got shape ",
      shape_str(weight.sizes()));
  check_like_x(weight, "weight", x);
  dims.d_out = weight.size(0);
  check_shape(weight, "weight", "(d_out, d_in)", {dims.d_out, dims.d_in});
  if (bias.has_value()) {
    check_like_x(*bias, "bias", x);
    check_shape(*bias, "bias", "(d_out,)", {dims.d_out});
  }
  check_like_x(U, "U", x);
  check_shape(U, "U", "(T, d_out, r)", {dims.T, dims.d_out, dims.r});
  check_like_x(S, "S", x);
  check_shape(S, "S", "(T, r)", {dims.T, dims.r});
  return dims;
}

Weighting check_routing_options(
    int64_t top_k, int64_t T, double temperature, double threshold,
    c10::string_view weighting) {
  TORCH_CHECK_VALUE(
      top_k >= 1 && top_k <= T, "top_k must be in 1..T = 1..", T, ", got ", top_k);
  TORCH_CHECK_VALUE(
      std::isfinite(temperature) && temperature > 0,
      "temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(
      std::isfinite(threshold), "threshold must be a finite number, got ", threshold);
  if (weighting == "uniform") return Weighting::kUniform;
  if (weighting == "softmax") return Weighting::kSoftmax;
  if (weighting == "renormalized") return Weighting::kRenormalized;
  TORCH_CHECK_VALUE(
      false, "weighting must be one of 'uniform', 'softmax', 'renormalized', got '",
      std::string(weighting), "'");
}

void check_prerouted_inputs(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights) {
  TORCH_CHECK_TYPE(
      indices.scalar_type() == at::kLong, "indices must be int64, got ",
      dtype_str(indices.scalar_type()));
  TORCH_CHECK_VALUE(
      indices.device() == x.device(), "indices must be on the device of x (", x.device(),
      "), got ", indices.device());
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK_VALUE(
      indices.dim() == x.dim() && indices.size(-1) >= 1 &&
          indices.sizes().slice(0, x.dim() - 1) == lead,
      "indices must have shape (*x.shape[:-1], k) with k >= 1, where x.shape[:-1] = ",
      shape_str(lead), ", got ", shape_str(indices.sizes()));
  TORCH_CHECK_TYPE(
      at::isFloatingType(weights.scalar_type()), "weights must be a floating tensor, got ",
      dtype_str(weights.scalar_type()));
  TORCH_CHECK_VALUE(
      weights.device() == x.device(), "weights must be on the device of x (", x.device(),
      "), got ", weights.device());
  TORCH_CHECK_VALUE(
      weights.sizes() == indices.sizes(), "weights must have the shape of indices ",
      shape_str(indices.sizes()), ", got ", shape_str(weights.sizes()));
}

int64_t check_grouped_linear_inputs(
    const at::Tensor& x, at::TensorList weights, const c10::optional<at::Tensor>& bias,
    const at::Tensor& groups) {
  check_float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension (..., d_in), got a 0-d tensor");
  TORCH_CHECK_VALUE(!weights.empty(), "weights must hold at least one (d_out, d_in) weight, got none");
  const int64_t d_in = x.size(-1), d_out = weights[0].dim() == 2 ? weights[0].size(0) : -1;
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  for (size_t g = 0; g < weights.size(); ++g) {
    const std::string name = "weights[" + std::to_string(g) + "]";
    TORCH_CHECK_TYPE(
        weights[g].scalar_type() == x.scalar_type() || weights[g].scalar_type() == acc,
        name, " must have the dtype of x (", dtype_str(x.scalar_type()), ") or its "
        "accumulation dtype (", dtype_str(acc), "), got ", dtype_str(weights[g].scalar_type()));
    TORCH_CHECK_VALUE(
        weights[g].device() == x.device(), name, " must be on the device of x (", x.device(),
        "), got ", weights[g].device());
    TORCH_CHECK_VALUE(
        weights[g].dim() == 2 && weights[g].size(0) == d_out && weights[g].size(1) == d_in,
        name, " must have shape (d_out, d_in) = (", d_out, ", ", d_in, ") (d_out from "
        "weights[0], d_in from x), got ", shape_str(weights[g].sizes()));
  }
  if (bias.has_value()) {
    check_like_x(*bias, "bias", x);
    check_shape(*bias, "bias", "(d_out,)", {d_out});
  }
  TORCH_CHECK_TYPE(
      groups.scalar_type() == at::kLong, "groups must be int64, got ",
      dtype_str(groups.scalar_type()));
  TORCH_CHECK_VALUE(
      groups.device() == x.device(), "groups must be on the device of x (", x.device(),
      "), got ", groups.device());
  TORCH_CHECK_VALUE(
      groups.sizes() == x.sizes().slice(0, x.dim() - 1),
      "groups must have shape x.shape[:-1] = ", shape_str(x.sizes().slice(0, x.dim() - 1)),
      ", got ", shape_str(groups.sizes()));
  return d_out;
}

at::Tensor as_rows(const at::Tensor& x, int64_t N, int64_t d_in) {
  // Explicit N: reshape({-1, 0}) of an empty tensor is ambiguous and throws (d_in = 0).
  at::Tensor rows = x.reshape({N, d_in});
  // Kernels walk rows with a row stride but need contiguous elements inside a row.
  if (rows.size(0) > 0 && d_in > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

std::vector<int64_t> leading_shape_with(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(last);
  return shape;
}

}  // namespace mass_ext
