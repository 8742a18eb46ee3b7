// The pools and their scale gradients (Q2), each one reduction (launchers/reduction.h), as
// templates on the policy's lp / lse terms. Six files instantiate them, one policy each, so
// that nvcc compiles them side by side (for sm_90 alone, here: 29-34 s each, against 67 s for
// the one file they were, the longest of the build): pool.cu (pool_over_s, pool_over_c, with a
// scale), pool_unscaled.cu (the two without), pool_lp_lse.cu and pool_lp_lse_unscaled.cu
// (pool_over_s_lp_lse), pool_backward_scale.cu (pool_over_s_backward_scale,
// pool_over_c_backward_scale) and pool_backward_scale_lp_lse.cu
// (pool_over_s_backward_scale_lp_lse).
#pragma once

#include <optional>
#include <vector>

#include "launchers/reduction.h"

namespace cbam {

// over_s: pool over S (scale [N, S], outputs [N, C]); else pool over C. LPLSE (over S only):
// also the lp and lse pools, in the same pass. SCALED: whether scale is given (the policy
// without weights otherwise, PoolPolicy). Returns avg, max, argmax (and lp, lse).
template <bool LPLSE, bool SCALED>
std::vector<at::Tensor> pool_of(const char* op, const at::Tensor& x_in,
                                const std::optional<at::Tensor>& scale_in, bool over_s) {
  const c10::DeviceGuard device_guard(x_in.device());  // launches go to x's device
  const XView v = view_x(x_in, op, "x");
  const auto acc = acc_type_of(v.x.scalar_type());
  const int64_t E = over_s ? v.S : v.C, L = over_s ? v.C : v.S;
  const at::Tensor scale = small_arg(scale_in, v.x, v.N, E, acc, op, "scale",
                                     over_s ? "[N, S]" : "[N, C]");
  TORCH_CHECK(scale.defined() == SCALED, op, ": internal error: scale ",
              SCALED ? "missing" : "given", " for the ", SCALED ? "scaled" : "unscaled",
              " pool");
  const auto opts = v.x.options().dtype(acc);
  std::vector<at::Tensor> out{new_output({v.N, L}, opts), new_output({v.N, L}, opts),
                              new_output({v.N, L}, opts.dtype(at::kLong))};
  if constexpr (LPLSE) {
    out.push_back(new_output({v.N, L}, opts));
    out.push_back(new_output({v.N, L}, opts));
  }
  if (v.N == 0 || L == 0) return out;
  TORCH_CHECK(E > 0, op, ": x must have at least one ", over_s ? "spatial position" : "channel",
              " to pool over, got shape ", x_in.sizes());
  const bool over_k = over_s != v.cl;  // channels-first keeps S contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "cbam_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PoolPolicy<acc_t, LPLSE, SCALED> pol{};  // (value-initialized: the fields not set here
    pol.scale = opt_ptr<acc_t>(scale);        // are null)
    pol.E = E;
    pol.avg = global_ptr<acc_t>(out[0]);
    pol.mx = global_ptr<acc_t>(out[1]);
    pol.arg = global_ptr<int64_t>(out[2]);
    if constexpr (LPLSE) {
      pol.lp = global_ptr<acc_t>(out[3]);
      pol.lse = global_ptr<acc_t>(out[4]);
    }
    reduction<scalar_t>(op, v, over_k, pol);
  });
  return out;
}

// The pools without a scale, each in a file of its own (pool_unscaled.cu,
// pool_lp_lse_unscaled.cu) so that nvcc compiles them beside the scaled ones.
std::vector<at::Tensor> pool_unscaled(const char* op, const at::Tensor& x, bool over_s);
std::vector<at::Tensor> pool_lp_lse_unscaled(const char* op, const at::Tensor& x);

// The pool of x times scale where scale is given, else of x (pool_of).
template <bool LPLSE>
std::vector<at::Tensor> pool(const char* op, const at::Tensor& x,
                             const std::optional<at::Tensor>& scale, bool over_s) {
  if (scale.has_value() && scale->defined()) return pool_of<LPLSE, true>(op, x, scale, over_s);
  if constexpr (LPLSE) {
    TORCH_CHECK(over_s, op, ": internal error: the lp / lse pools go over S");
    return pool_lp_lse_unscaled(op, x);
  } else {
    return pool_unscaled(op, x, over_s);
  }
}

// The extra inputs of pool_over_s_backward_scale_lp_lse ([N, S] scale, [N, C] the others).
struct LpLseScaleGrads {
  std::optional<at::Tensor> scale, d_lp, lp, d_lse, lse;
};

// over_s: the scale gradient of pool_over_s ([N, S] = sum_c x (da/S + dm [s == is]), small
// tensors [N, C]); else of pool_over_c ([N, C] = sum_s x (du/C + dv [c == ic]), small [N, S]).
// LPLSE (over_s only): also the lp / lse pools' terms (pool_over_s_backward_scale_lp_lse), whose
// inputs ext holds (nullptr otherwise).
// base, gate ([N, S] over_s, else [N, C]): out = (base + the sum) gate (1 - gate), each step
// where given (the block's next steps, in the kernels' store).
template <bool LPLSE>
at::Tensor pool_backward_scale(const char* op, const at::Tensor& x_in,
                               const std::optional<at::Tensor>& d_avg_in,
                               const std::optional<at::Tensor>& d_max_in,
                               const std::optional<at::Tensor>& argmax_in,
                               const std::optional<at::Tensor>& base_in,
                               const std::optional<at::Tensor>& gate_in, bool over_s,
                               const LpLseScaleGrads* ext = nullptr) {
  TORCH_CHECK((ext != nullptr) == LPLSE, op, ": internal error: the lp / lse inputs ",
              LPLSE ? "missing" : "given");
  const c10::DeviceGuard device_guard(x_in.device());
  const XView v = view_x(x_in, op, "x");
  const auto acc = acc_type_of(v.x.scalar_type());
  // The forward pool reduced over E_fwd and kept L_fwd; this reduction goes over L_fwd.
  const int64_t E_fwd = over_s ? v.S : v.C, L_fwd = over_s ? v.C : v.S;
  const char* shape = over_s ? "[N, C]" : "[N, S]";
  const at::Tensor d_avg = small_arg(d_avg_in, v.x, v.N, L_fwd, acc, op, "d_avg", shape);
  const at::Tensor d_max = small_arg(d_max_in, v.x, v.N, L_fwd, acc, op, "d_max", shape);
  const at::Tensor argmax = small_arg(argmax_in, v.x, v.N, L_fwd, at::kLong, op, "argmax", shape);
  TORCH_CHECK(!d_max.defined() || argmax.defined(), op, ": d_max needs argmax");
  at::Tensor scale, d_lp, lp, d_lse, lse;
  if (ext != nullptr) {
    scale = small_arg(ext->scale, v.x, v.N, E_fwd, acc, op, "scale", "[N, S]");
    d_lp = small_arg(ext->d_lp, v.x, v.N, L_fwd, acc, op, "d_lp", shape);
    lp = small_arg(ext->lp, v.x, v.N, L_fwd, acc, op, "lp", shape);
    d_lse = small_arg(ext->d_lse, v.x, v.N, L_fwd, acc, op, "d_lse", shape);
    lse = small_arg(ext->lse, v.x, v.N, L_fwd, acc, op, "lse", shape);
    TORCH_CHECK(!d_lp.defined() || lp.defined(), op, ": d_lp needs lp");
    TORCH_CHECK(!d_lse.defined() || lse.defined(), op, ": d_lse needs lse");
  }
  const char* out_shape = over_s ? "[N, S]" : "[N, C]";
  const at::Tensor base = small_arg(base_in, v.x, v.N, E_fwd, acc, op, "base", out_shape);
  const at::Tensor gate = small_arg(gate_in, v.x, v.N, E_fwd, acc, op, "gate", out_shape);
  at::Tensor out = new_output({v.N, E_fwd}, v.x.options().dtype(acc));
  if (out.numel() == 0) return out;
  if (L_fwd == 0) {  // an empty sum: the store's steps alone
    at::Tensor z = base.defined() ? base.clone() : out.zero_();
    return gate.defined() ? at::sigmoid_backward(z, gate) : z;
  }
  const bool over_k = over_s == v.cl;  // reduces over the forward pool's kept axis
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "cbam_fused", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    WeightedSumPolicy<acc_t, LPLSE> pol{};
    pol.wa = opt_ptr<acc_t>(d_avg);
    pol.wb = opt_ptr<acc_t>(d_max);
    pol.widx = opt_ptr<int64_t>(argmax);
    pol.E = L_fwd;
    pol.div = static_cast<acc_t>(E_fwd);
    pol.out = global_ptr<acc_t>(out);
    pol.base = opt_ptr<acc_t>(base);
    pol.gate = opt_ptr<acc_t>(gate);
    pol.kscale = opt_ptr<acc_t>(scale);
    pol.L = E_fwd;
    pol.wl = opt_ptr<acc_t>(d_lp);
    pol.lp = opt_ptr<acc_t>(lp);
    pol.we = opt_ptr<acc_t>(d_lse);
    pol.lse = opt_ptr<acc_t>(lse);
    reduction<scalar_t>(op, v, over_k, pol);
  });
  return out;
}

}  // namespace cbam
