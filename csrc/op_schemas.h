// The schemas of the cbam_fused ops, defined once and used by both libraries that declare them:
// cbam_fused (csrc/ops.cpp) and the simulator's cbam_fused_sim (csrc/sim/kernels_sim.cpp).
// Notation (DESIGN.md section 1): x is [N, C, *spatial] viewed as [N, C, S]; the "small"
// tensors are [N, C] or [N, S] in the accumulation dtype (float32 for float16 / bfloat16 /
// float32 inputs, float64 for float64), argmax indices are int64.
#pragma once
#include <torch/library.h>

namespace cbam {

inline void define_ops(torch::Library& m) {
  // a[n,c] = mean_s x*scale, m[n,c] = max_s x*scale, argmax[n,c]; scale is [N, S] or None.
  m.def("pool_over_s(Tensor x, Tensor? scale) -> (Tensor avg, Tensor max, Tensor argmax)");
  // pool_over_s plus the official code's lp and lse pools of v = x*scale, in the same pass:
  // lp[n,c] = sqrt(sum_s v^2) (F.lp_pool2d, norm 2), lse[n,c] = M + log(sum_s exp(v - M)) with
  // M = max_s v (logsumexp_2d; NaN where M is not finite).
  m.def(
      "pool_over_s_lp_lse(Tensor x, Tensor? scale) -> (Tensor avg, Tensor max, Tensor argmax, "
      "Tensor lp, Tensor lse)");
  // u[n,s] = mean_c x*scale, v[n,s] = max_c x*scale, argmax[n,s]; scale is [N, C] or None.
  m.def("pool_over_c(Tensor x, Tensor? scale) -> (Tensor avg, Tensor max, Tensor argmax)");
  // y[n,c,s] = x * gc[n,c] * gs[n,s] (a missing gate counts as 1); y keeps x's memory format.
  m.def("apply_gates(Tensor x, Tensor? gc, Tensor? gs) -> Tensor");
  // The channel gate's head on the pools over S ([N, C] each, acc dtype; lp and lse where `pools`
  // names them), its MLP summed over the pools and the sigmoid:
  //   p = the stacked MLP inputs [k N, C] (the pools in `pools` order; 'blend': 0.5 (avg + max)),
  //   h = p w1^T + b1 [k N, H], after `act` when act is relu (before it otherwise),
  //   gc = sigmoid(sum over the pools of (act(h) w2^T + b2)) [N, C]; without w2 (one layer,
  //   H = C): gc = sigmoid(sum over the pools of h).
  m.def(
      "channel_head(Tensor avg, Tensor max, Tensor? lp, Tensor? lse, Tensor w1, Tensor? b1, "
      "Tensor? w2, Tensor? b2, str pools, str act) -> (Tensor gc, Tensor p, Tensor h)");
  // Its backward, from dzc = d of the gate's logits [N, C] (every pool's MLP output receives it)
  // and the forward's p and h: dp [k N, C] (blend: [N, C], 0.5 of the MLP input's gradient: that
  // of avg and of max alike), d w1, d b1, d w2, d b2 (a bias's gradient where has_b1 / has_b2,
  // d w2 with w2; empty otherwise).
  m.def(
      "channel_head_backward(Tensor dzc, Tensor p, Tensor h, Tensor w1, Tensor? w2, bool has_b1, "
      "bool has_b2, str pools, str act) -> (Tensor dp, Tensor dw1, Tensor db1, Tensor dw2, "
      "Tensor db2)");
  // The spatial gate's head on the pools over C (avg, max: [N, 1, *spatial], acc dtype):
  //   smap = the stacked map ((max, avg), (avg, max) or 0.5 (avg + max), by spatial_pools),
  //   zconv = conv(smap, conv_w, conv_b) (one output channel, odd k, zero padding k / 2),
  //   gs = sigmoid(BN_eval(zconv)) as [N, S] (BN when bn_rm and bn_rv are given; an empty gs
  //   without `gate`, for a caller that normalizes zconv with batch statistics itself).
  m.def(
      "spatial_head(Tensor avg, Tensor max, Tensor conv_w, Tensor? conv_b, Tensor? bn_w, "
      "Tensor? bn_b, Tensor? bn_rm, Tensor? bn_rv, float bn_eps, str spatial_pools, bool gate) "
      "-> (Tensor gs, Tensor smap, Tensor zconv)");
  // Its backward, from grad = d gs [N, S] (dzs = grad gs (1 - gs), then BatchNorm in eval mode)
  // or, without gs, grad = d zconv (a caller that ran BatchNorm's training backward itself):
  //   du, dv [N, S] (the stacked map's gradient, by spatial_pools), d conv_w, d conv_b, d bn_w,
  //   d bn_b ([1] each, empty where the parameter is not given; BatchNorm needs gs and zconv).
  m.def(
      "spatial_head_backward(Tensor grad, Tensor? gs, Tensor smap, Tensor? zconv, Tensor conv_w, "
      "Tensor? conv_b, Tensor? bn_w, Tensor? bn_b, Tensor? bn_rm, Tensor? bn_rv, float bn_eps, "
      "str spatial_pools) -> (Tensor d_avg, Tensor d_max, Tensor d_conv_w, Tensor d_conv_b, "
      "Tensor d_bn_w, Tensor d_bn_b)");
  // The spatial gate's BatchNorm with batch statistics (training mode) and its sigmoid, on the
  // conv output zconv [N, 1, *spatial] (acc dtype, M = N S > 1 values):
  //   mean = sum z / M, var = sum (z - mean)^2 / M, invstd = 1 / sqrt(var + eps),
  //   gs = sigmoid((z - mean) invstd bn_w + bn_b) as [N, S], var_u = var M / (M - 1) (for the
  //   running variance); mean, invstd and var_u as [1].
  m.def(
      "batch_norm_gate(Tensor zconv, Tensor? bn_w, Tensor? bn_b, float bn_eps) -> (Tensor gs, "
      "Tensor mean, Tensor invstd, Tensor var)");
  // Its backward, from dgs = d gs [N, S] and the forward's gs, mean and invstd:
  //   dzs = dgs gs (1 - gs), xhat = (z - mean) invstd, A = sum dzs, B = sum dzs xhat,
  //   d zconv = (dzs - A / M - xhat B / M) invstd bn_w as [N, S], d bn_w = B (with bn_w),
  //   d bn_b = A (with has_b); [1] each, empty otherwise.
  m.def(
      "batch_norm_gate_backward(Tensor dgs, Tensor gs, Tensor zconv, Tensor mean, Tensor invstd, "
      "Tensor? bn_w, bool has_b) -> (Tensor d_zconv, Tensor d_bn_w, Tensor d_bn_b)");
  // Q1: rc[n,c] = sum_s g x gs, rs[n,s] = sum_c g x gc (an output not needed is returned empty).
  m.def(
      "backward_reduce(Tensor grad, Tensor x, Tensor? gc, Tensor? gs, bool need_rc, "
      "bool need_rs) -> (Tensor rc, Tensor rs)");
  // Q2, d/d(scale) of pool_over_c(x, scale): [N, C] = sum_s x (du/C + dv [c == ic[n,s]]).
  // Each Q2 op also takes the two steps that follow it in the block's backward, into its store
  // (no launch of their own): out = base + Q2 with `base` ([N, C] here: rc of Q1), and then,
  // with `gate` (the sigmoid gate g the scale was), the sigmoid's backward out g (1 - g).
  m.def(
      "pool_over_c_backward_scale(Tensor x, Tensor? d_avg, Tensor? d_max, Tensor? argmax, "
      "Tensor? base=None, Tensor? gate=None) -> Tensor");
  // Q2, d/d(scale) of pool_over_s(x, scale): [N, S] = sum_c x (da/S + dm [s == is[n,c]])
  // (+ base, then g (1 - g) with gate, [N, S]).
  m.def(
      "pool_over_s_backward_scale(Tensor x, Tensor? d_avg, Tensor? d_max, Tensor? argmax, "
      "Tensor? base=None, Tensor? gate=None) -> Tensor");
  // Q2 when the channel gate also pooled lp / lse of v = x*scale over S (spatial first):
  //   [N, S] = sum_c x (da/S + dm [s == is[n,c]] + (d_lp / lp) v + d_lse exp(v - lse))
  // scale is the forward's [N, S] scale (None: 1); d_lp needs lp, d_lse needs lse; base and
  // gate as above.
  m.def(
      "pool_over_s_backward_scale_lp_lse(Tensor x, Tensor? d_avg, Tensor? d_max, Tensor? argmax, "
      "Tensor? scale, Tensor? d_lp, Tensor? lp, Tensor? d_lse, Tensor? lse, Tensor? base=None, "
      "Tensor? gate=None) -> Tensor");
  // Q3, dx written once:
  //   dx = g gc gs + kc (da/S + dm [s == is]) + ks (du/C + dv [c == ic])
  // arrangement 0 (channel first): kc = 1, ks = gc; 1 (spatial first): kc = gs, ks = 1;
  // 2 (parallel): kc = ks = 1. Missing tensors count as 0 (gradients) or 1 (gates).
  m.def(
      "grad_input(Tensor grad, Tensor? gc, Tensor? gs, Tensor? da, Tensor? dm, Tensor? idx_s, "
      "Tensor? du, Tensor? dv, Tensor? idx_c, int arrangement) -> Tensor");
  // Q3 when the channel gate also pooled lp / lse over S (reads x as well):
  //   dx = grad_input(...) + kc ((d_lp / lp) v + d_lse exp(v - lse)),  v = x (arrangement 1: x gs)
  // x has grad's shape and dtype (any strides); d_lp needs lp, d_lse needs lse.
  m.def(
      "grad_input_lp_lse(Tensor grad, Tensor x, Tensor? gc, Tensor? gs, Tensor? da, Tensor? dm, "
      "Tensor? idx_s, Tensor? du, Tensor? dv, Tensor? idx_c, Tensor? d_lp, Tensor? lp, "
      "Tensor? d_lse, Tensor? lse, int arrangement) -> Tensor");
}

}  // namespace cbam
