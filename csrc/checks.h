// Argument validation shared by every device's kernels. Each failure raises a Python
// ValueError / TypeError / IndexError naming the argument, the expectation and the value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

#include "routing.h"

namespace mass_ext {

// Sizes of one routed layer: x (..., d_in), weight (d_out, d_in), U (T, d_out, r),
// S (T, r), V (T, r, d_in); N = number of rows of x (product of its leading dims).
struct LayerDims {
  int64_t N, d_in, d_out, T, r;
};

std::string shape_str(at::IntArrayRef sizes);
std::string dtype_str(at::ScalarType dtype);

// x and V alone (the `route` op).
LayerDims check_route_inputs(const at::Tensor& x, const at::Tensor& V);

// Everything a routed linear layer reads.
LayerDims check_layer_inputs(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V);

// top_k in 1..T, temperature finite and > 0, threshold finite, known weighting name.
Weighting check_routing_options(
    int64_t top_k, int64_t T, double temperature, double threshold,
    c10::string_view weighting);

// indices (..., k) int64 and weights (..., k) floating, leading shape of x, same device.
// Their values are checked by the kernels (they need the data).
void check_prerouted_inputs(
    const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights);

// _grouped_linear's inputs: x (..., d_in); weights G >= 1 tensors (d_out, d_in), each
// of x's dtype or its accumulation dtype; bias (d_out,) of x's dtype or none; groups
// int64 of shape x.shape[:-1] (its values are checked by the kernels). Returns d_out.
int64_t check_grouped_linear_inputs(
    const at::Tensor& x, at::TensorList weights, const c10::optional<at::Tensor>& bias,
    const at::Tensor& groups);

// x viewed as (N, d_in) rows with a unit inner stride (copies only if it must).
at::Tensor as_rows(const at::Tensor& x, int64_t N, int64_t d_in);

// The leading shape of x with `last` appended: the shape of an output.
std::vector<int64_t> leading_shape_with(const at::Tensor& x, int64_t last);

}  // namespace mass_ext
