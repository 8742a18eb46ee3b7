// Shared by the CBAM block's C++ composites (block_forward.cpp, block_backward.cpp): the package's
// own ops called through the dispatcher, parameters in the accumulation dtype and the `pools`
// string.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "pools_string.h"

namespace cbam {
namespace block {

using OptT = std::optional<at::Tensor>;
using Pools3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Pools5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The package's own ops through the dispatcher (their CUDA, CPU or simulator kernels).
inline Pools3 pool_over_s(const at::Tensor& x, const OptT& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cbam_fused::pool_over_s", "")
                             .typed<Pools3(const at::Tensor&, const OptT&)>();
  return op.call(x, scale);
}

inline Pools5 pool_over_s_lp_lse(const at::Tensor& x, const OptT& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cbam_fused::pool_over_s_lp_lse", "")
                             .typed<Pools5(const at::Tensor&, const OptT&)>();
  return op.call(x, scale);
}

inline Pools3 pool_over_c(const at::Tensor& x, const OptT& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cbam_fused::pool_over_c", "")
                             .typed<Pools3(const at::Tensor&, const OptT&)>();
  return op.call(x, scale);
}

inline at::Tensor apply_gates(const at::Tensor& x, const OptT& gc, const OptT& gs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cbam_fused::apply_gates", "")
                             .typed<at::Tensor(const at::Tensor&, const OptT&, const OptT&)>();
  return op.call(x, gc, gs);
}

inline Pools3 channel_head(const at::Tensor& avg, const at::Tensor& max, const OptT& lp,
                          const OptT& lse, const at::Tensor& w1, const OptT& b1, const OptT& w2,
                          const OptT& b2, const std::string& pools, const std::string& act) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cbam_fused::channel_head", "")
          .typed<Pools3(const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                        const at::Tensor&, const OptT&, const OptT&, const OptT&,
                        c10::string_view, c10::string_view)>();
  return op.call(avg, max, lp, lse, w1, b1, w2, b2, pools, act);
}

inline Pools5 channel_head_backward(const at::Tensor& dzc, const at::Tensor& p,
                                   const at::Tensor& h, const at::Tensor& w1, const OptT& w2,
                                   bool has_b1, bool has_b2, const std::string& pools,
                                   const std::string& act) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cbam_fused::channel_head_backward", "")
          .typed<Pools5(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const OptT&, bool, bool, c10::string_view,
                        c10::string_view)>();
  return op.call(dzc, p, h, w1, w2, has_b1, has_b2, pools, act);
}

inline Pools3 spatial_head(const at::Tensor& avg, const at::Tensor& max, const at::Tensor& conv_w,
                          const OptT& conv_b, const OptT& bn_w, const OptT& bn_b,
                          const OptT& bn_rm, const OptT& bn_rv, double bn_eps,
                          const std::string& spatial_pools, bool gate) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cbam_fused::spatial_head", "")
          .typed<Pools3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                        const OptT&, const OptT&, const OptT&, const OptT&, double,
                        c10::string_view, bool)>();
  return op.call(avg, max, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, bn_eps, spatial_pools, gate);
}

using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (gs [N, S], mean, invstd, unbiased var): BatchNorm with batch statistics and the sigmoid
inline Tensors4 batch_norm_gate(const at::Tensor& zconv, const OptT& bn_w, const OptT& bn_b,
                                double bn_eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cbam_fused::batch_norm_gate", "")
          .typed<Tensors4(const at::Tensor&, const OptT&, const OptT&, double)>();
  return op.call(zconv, bn_w, bn_b, bn_eps);
}

// (d zconv [N, S], d bn_w, d bn_b), the last two empty where not asked for
inline Pools3 batch_norm_gate_backward(const at::Tensor& dgs, const at::Tensor& gs,
                                       const at::Tensor& zconv, const at::Tensor& mean,
                                       const at::Tensor& invstd, const OptT& bn_w, bool has_b) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cbam_fused::batch_norm_gate_backward", "")
          .typed<Pools3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const OptT&, bool)>();
  return op.call(dgs, gs, zconv, mean, invstd, bn_w, has_b);
}

// (du, dv, d conv_w, d conv_b, d bn_w, d bn_b), empty where the parameter is not given
using HeadGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline HeadGrads spatial_head_backward(const at::Tensor& grad, const OptT& gs,
                                       const at::Tensor& smap, const OptT& zconv,
                                       const at::Tensor& conv_w, const OptT& conv_b,
                                       const OptT& bn_w, const OptT& bn_b, const OptT& bn_rm,
                                       const OptT& bn_rv, double bn_eps,
                                       const std::string& spatial_pools) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cbam_fused::spatial_head_backward", "")
          .typed<HeadGrads(const at::Tensor&, const OptT&, const at::Tensor&, const OptT&,
                           const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
                           const OptT&, double, c10::string_view)>();
  return op.call(grad, gs, smap, zconv, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, bn_eps,
                 spatial_pools);
}

// A parameter in the accumulation dtype; MLP weights in Linear form ([out, in]).
inline OptT acc(const OptT& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->scalar_type() == dtype ? *t : t->to(dtype);
}

inline OptT linear_form(const OptT& w) {
  if (!w.has_value() || w->dim() == 2) return w;
  return w->reshape({w->size(0), w->size(1)});
}

// An optional tensor from a tensor that may be undefined (absent).
inline OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : OptT(); }

// The heads' parameters in the accumulation dtype of x (float64 for float64 x, else float32),
// MLP weights in Linear form.
struct AccParams {
  OptT w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv;
};

inline AccParams acc_params(const at::Tensor& x, const OptT& w1, const OptT& b1, const OptT& w2,
                            const OptT& b2, const OptT& conv_w, const OptT& conv_b,
                            const OptT& bn_w, const OptT& bn_b, const OptT& bn_rm,
                            const OptT& bn_rv) {
  const at::ScalarType dt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {linear_form(acc(w1, dt)), acc(b1, dt), linear_form(acc(w2, dt)), acc(b2, dt),
          acc(conv_w, dt), acc(conv_b, dt), acc(bn_w, dt), acc(bn_b, dt), acc(bn_rm, dt),
          acc(bn_rv, dt)};
}

// Whether a `pools` string of the channel gate has the official code's lp or lse pools.
inline bool has_lp_lse(const std::string& pools) {
  if (pools == "blend") return false;
  for (const auto& k : split_pools(pools)) {
    if (k == "lp" || k == "lse") return true;
  }
  return false;
}

// The backward's ops (schemas: op_schemas.h).
inline std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& g, const at::Tensor& x,
                                                          const OptT& gc, const OptT& gs,
                                                          bool need_rc, bool need_rs) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cbam_fused::backward_reduce", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const OptT&, const OptT&, bool, bool)>();
  return op.call(g, x, gc, gs, need_rc, need_rs);
}

// pool_over_c_backward_scale and pool_over_s_backward_scale (same signature): (base + the
// scale's gradient), times gate (1 - gate) when gate is given
inline at::Tensor backward_scale(const char* name, const at::Tensor& x, const OptT& d_avg,
                                 const OptT& d_max, const OptT& argmax, const OptT& base,
                                 const OptT& gate) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .typed<at::Tensor(const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
                        const OptT&)>()
      .call(x, d_avg, d_max, argmax, base, gate);
}

inline at::Tensor pool_over_s_backward_scale_lp_lse(const at::Tensor& x, const OptT& d_avg,
                                                    const OptT& d_max, const OptT& argmax,
                                                    const OptT& scale, const OptT& d_lp,
                                                    const OptT& lp, const OptT& d_lse,
                                                    const OptT& lse, const OptT& base) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cbam_fused::pool_over_s_backward_scale_lp_lse", "")
                             .typed<at::Tensor(const at::Tensor&, const OptT&, const OptT&,
                                               const OptT&, const OptT&, const OptT&, const OptT&,
                                               const OptT&, const OptT&, const OptT&,
                                               const OptT&)>();
  return op.call(x, d_avg, d_max, argmax, scale, d_lp, lp, d_lse, lse, base, std::nullopt);
}

inline at::Tensor grad_input(const at::Tensor& g, const OptT& gc, const OptT& gs, const OptT& da,
                             const OptT& dm, const OptT& idx_s, const OptT& du, const OptT& dv,
                             const OptT& idx_c, int64_t arrangement) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cbam_fused::grad_input", "")
                             .typed<at::Tensor(const at::Tensor&, const OptT&, const OptT&,
                                               const OptT&, const OptT&, const OptT&, const OptT&,
                                               const OptT&, const OptT&, int64_t)>();
  return op.call(g, gc, gs, da, dm, idx_s, du, dv, idx_c, arrangement);
}

inline at::Tensor grad_input_lp_lse(const at::Tensor& g, const at::Tensor& x, const OptT& gc,
                                    const OptT& gs, const OptT& da, const OptT& dm,
                                    const OptT& idx_s, const OptT& du, const OptT& dv,
                                    const OptT& idx_c, const OptT& d_lp, const OptT& lp,
                                    const OptT& d_lse, const OptT& lse, int64_t arrangement) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("cbam_fused::grad_input_lp_lse", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, const OptT&,
                            const OptT&, const OptT&, const OptT&, const OptT&, const OptT&,
                            const OptT&, const OptT&, const OptT&, const OptT&, const OptT&,
                            int64_t)>();
  return op.call(g, x, gc, gs, da, dm, idx_s, du, dv, idx_c, d_lp, lp, d_lse, lse, arrangement);
}

}  // namespace block
}  // namespace cbam
