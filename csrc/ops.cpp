// The op schema, defined once. Kernels attach per device with TORCH_LIBRARY_IMPL
// (CPU: routed_linear_cpu.cpp; CUDA: cuda/).
#include <Python.h>
#include <torch/library.h>

// Importing mass_ext._C only has to load this library: its static initialisers
// register the ops with the dispatcher, so the Python module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mass_ext, m) {
  // Residual routing of every row of x over the T task subspaces V: top_k task ids
  // (-1 = dropped by threshold), their weights, and the residuals ||x - V_t^T V_t x||.
  m.def(
      "route(Tensor x, Tensor V, int top_k, float temperature, float threshold, "
      "str weighting) -> (Tensor indices, Tensor weights, Tensor residuals)");
  // y = x W^T + b + sum_{kept j} w_j U_{t_j} (S_{t_j} * V_{t_j} x), each row routed as
  // in `route`; also returns the routing it used (indices, weights).
  m.def(
      "routed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor U, Tensor S, "
      "Tensor V, int top_k, float temperature, float threshold, str weighting) "
      "-> (Tensor out, Tensor indices, Tensor weights)");
  // The same y for a routing decided elsewhere: indices (..., k) int64, -1 = none.
  m.def(
      "routed_linear_prerouted(Tensor x, Tensor weight, Tensor? bias, Tensor U, "
      "Tensor S, Tensor V, Tensor indices, Tensor weights) -> Tensor");
  // y = x weights[g]^T + b for each row, g = groups[row] in [0, G): the dense GEMM of
  // merged weights built elsewhere (RoutedLinear's merged-weight cache). Inference only.
  m.def(
      "_grouped_linear(Tensor x, Tensor[] weights, Tensor? bias, Tensor groups) -> Tensor");
}
