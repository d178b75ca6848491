// Autograd for the routed ops, device-agnostic (registered for the Autograd key; the
// forward redispatches to the device kernel). The routing decision is a constant: the
// gradients flow to x, weight, bias, U, S, V (and the given weights in the pre-routed
// form) through the selected tasks only. `route` is not differentiable.
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace mass_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Gradients of y = x W^T + b + sum_t c_t U_t (S_t * V_t x), c = the per-row weight of
// each task (0 where a row did not select it). Dense over tasks: O(N * T * r) memory,
// like the forward's projections.
variable_list expert_backward(
    AutogradContext* ctx, const at::Tensor& grad_out, const variable_list& saved,
    bool has_bias, bool weights_are_input) {
  const at::Tensor &x = saved[0], &weight = saved[1], &U = saved[2], &S = saved[3],
                   &V = saved[4], &indices = saved[5], &weights = saved[6];
  const auto acc = acc_type(x);
  const int64_t d_in = x.size(-1), d_out = weight.size(0), T = V.size(0), k = indices.size(-1);
  // Explicit N: reshape({-1, 0}) of an empty tensor is ambiguous and throws (d_in or d_out 0).
  const int64_t N = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  const at::Tensor g = grad_out.reshape({N, d_out}).to(acc);
  const at::Tensor rows = x.reshape({N, d_in}).to(acc);
  const at::Tensor U_acc = U.to(acc), S_acc = S.to(acc), V_acc = V.to(acc);
  const at::Tensor flat_indices = indices.reshape({N, k});
  const at::Tensor kept = flat_indices.ge(0);
  const at::Tensor coefficients =
      at::zeros({rows.size(0), T}, rows.options())
          .scatter_add_(1, flat_indices.clamp_min(0),
                        at::where(kept, weights.reshape({N, k}).to(acc), 0.0))
          .unsqueeze(-1);                                  // (N, T, 1)
  const at::Tensor z = at::einsum("ni,tri->ntr", {rows, V_acc});   // V_t x
  const at::Tensor a = at::einsum("no,tor->ntr", {g, U_acc});      // U_t^T g
  const at::Tensor c_a_S = a * coefficients * S_acc;
  // needs_input_grad counts tensor inputs only: an absent bias shifts the later ones.
  const auto needs = [&](size_t arg) {
    return ctx->needs_input_grad(has_bias || arg < 2 ? arg : arg - 1);
  };

  at::Tensor grad_x, grad_weight, grad_bias, grad_U, grad_S, grad_V, grad_weights;
  if (needs(0))
    grad_x = (at::mm(g, weight.to(acc)) + at::einsum("ntr,tri->ni", {c_a_S, V_acc}))
                 .reshape(x.sizes()).to(x.scalar_type());
  if (needs(1)) grad_weight = at::mm(g.t(), rows).to(weight.scalar_type());
  if (has_bias && needs(2)) grad_bias = g.sum(0).to(weight.scalar_type());
  if (needs(3))
    grad_U = at::einsum("no,ntr->tor", {g, coefficients * S_acc * z}).to(U.scalar_type());
  if (needs(4)) grad_S = (coefficients * a * z).sum(0).to(S.scalar_type());
  if (needs(5))
    grad_V = at::einsum("ntr,ni->tri", {c_a_S, rows}).to(V.scalar_type());
  if (weights_are_input && needs(7)) {
    // d y / d w_j = <U_t^T g, S_t * V_t x> at t = indices[j]; 0 for dropped slots.
    const at::Tensor per_task = (a * S_acc * z).sum(-1);   // (N, T)
    grad_weights = at::where(kept, per_task.gather(1, flat_indices.clamp_min(0)), 0.0)
                       .reshape(indices.sizes())
                       .to(weights.scalar_type());
  }
  return {grad_x, grad_weight, grad_bias, grad_U, grad_S, grad_V, at::Tensor(), grad_weights};
}

class RoutedLinearFunction : public torch::autograd::Function<RoutedLinearFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& U, const at::Tensor& S,
      const at::Tensor& V, int64_t top_k, double temperature, double threshold,
      c10::string_view weighting) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mass_ext::routed_linear", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                             double, double, c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, indices, weights] =
        op.call(x, weight, bias, U, S, V, top_k, temperature, threshold, weighting);
    ctx->save_for_backward({x, weight, U, S, V, indices, weights});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({indices, weights});
    return {out, indices, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads = expert_backward(ctx, grad_outputs[0], ctx->get_saved_variables(),
                                          ctx->saved_data["has_bias"].toBool(), false);
    grads.resize(10);  // x, weight, bias, U, S, V, then 4 non-tensor arguments
    for (size_t i = 6; i < grads.size(); ++i) grads[i] = at::Tensor();
    return grads;
  }
};

class PreroutedFunction : public torch::autograd::Function<PreroutedFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& U, const at::Tensor& S,
      const at::Tensor& V, const at::Tensor& indices, const at::Tensor& weights) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mass_ext::routed_linear_prerouted", "")
                         .typed<at::Tensor(
                             const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(x, weight, bias, U, S, V, indices, weights);
    ctx->save_for_backward({x, weight, U, S, V, indices, weights});
    ctx->saved_data["has_bias"] = bias.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return expert_backward(ctx, grad_outputs[0], ctx->get_saved_variables(),
                           ctx->saved_data["has_bias"].toBool(), true);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_linear_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, int64_t top_k,
    double temperature, double threshold, c10::string_view weighting) {
  auto outs = RoutedLinearFunction::apply(x, weight, bias, U, S, V, top_k, temperature,
                                          threshold, weighting);
  return {outs[0], outs[1], outs[2]};
}

at::Tensor routed_linear_prerouted_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& U, const at::Tensor& S, const at::Tensor& V, const at::Tensor& indices,
    const at::Tensor& weights) {
  return PreroutedFunction::apply(x, weight, bias, U, S, V, indices, weights);
}

// A routing decision has no gradient: run below autograd, so no output requires grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_autograd(
    const at::Tensor& x, const at::Tensor& V, int64_t top_k, double temperature,
    double threshold, c10::string_view weighting) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mass_ext::route", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, int64_t, double, double,
                           c10::string_view)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, V, top_k, temperature, threshold, weighting);
}

// _grouped_linear serves inference (the merged-weight cache runs only without autograd):
// it refuses inputs that require grad rather than return an output that drops them.
at::Tensor grouped_linear_autograd(const at::Tensor& x, at::TensorList weights,
                                   const c10::optional<at::Tensor>& bias, const at::Tensor& groups) {
  bool needs_grad = x.requires_grad() || (bias.has_value() && bias->requires_grad());
  for (const at::Tensor& w : weights) needs_grad = needs_grad || w.requires_grad();
  TORCH_CHECK_VALUE(
      !(needs_grad && at::GradMode::is_enabled()),
      "_grouped_linear has no backward: call it under torch.no_grad() or "
      "torch.inference_mode(), or with inputs that do not require grad");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mass_ext::_grouped_linear", "")
                       .typed<at::Tensor(const at::Tensor&, at::TensorList,
                                         const c10::optional<at::Tensor>&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, weights, bias, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(mass_ext, Autograd, m) {
  m.impl("_grouped_linear", &grouped_linear_autograd);
  m.impl("routed_linear", &routed_linear_autograd);
  m.impl("routed_linear_prerouted", &routed_linear_prerouted_autograd);
  m.impl("route", &route_autograd);
}

}  // namespace mass_ext
