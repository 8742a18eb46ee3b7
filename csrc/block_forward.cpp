// The CBAM block's forward composite, cbam_fused::cbam_block, in C++ (its CompositeExplicitAutograd
// kernel: every device). The same steps as the Python composite cbam_fused.functional._forward,
// which is the op's fake kernel (symbolic shapes); tests/test_functional.py checks the two are
// bitwise equal. In C++ because a call of the block is bound by host time at every ResNet-50 site
// on a GPU (the H200 run of 2026-11-26): each of its dozen-odd ATen calls costs a Python round
// trip there, a few microseconds here.
//
//   a, m, is = pool_over_s(x, scale)            channel gate: pools over S (lp, lse too if asked)
//   gc = sigmoid(sum over pools p of W2 act(W1 p + b1) + b2)     (or W1 p + b1: single layer)
//   u, v, ic = pool_over_c(x, scale)            spatial gate: pools over C
//   gs = sigmoid(BN(conv(stack(u, v))))
//   y = apply_gates(x, gc, gs)
// arrangement 0: the spatial gate pools x gc; 1: the channel gate pools x gs; 2: both plain x.
// Returns [y, gc, gs, idx_s, idx_c, p, h, smap, zconv, mean, invstd] (functional._SAVED), then
// var, the unbiased batch variance of zconv for the BatchNorm's running variance (training
// mode); an empty tensor for an absent one; no two of them aliasing (an op's outputs must not).
#include "block_common.h"

namespace cbam {
namespace {

using namespace block;  // NOLINT(build/namespaces): the helpers of block_common.h

struct ChannelGate {
  at::Tensor gc, idx_s, p, h;  // h: the hidden layer (after relu, before another activation)
};

// The channel gate: the pools over S, then its head in one op (channel_head: the stacked pools,
// the MLP summed over them, the sigmoid).
ChannelGate channel_gate(const at::Tensor& x, const OptT& scale, const std::string& pools,
                         const OptT& w1, const OptT& b1, const OptT& w2, const OptT& b2,
                         const std::string& act) {
  at::Tensor a, m, lp, lse;
  ChannelGate out;
  if (has_lp_lse(pools)) {
    std::tie(a, m, out.idx_s, lp, lse) = pool_over_s_lp_lse(x, scale);
  } else {
    std::tie(a, m, out.idx_s) = pool_over_s(x, scale);
  }
  std::tie(out.gc, out.p, out.h) = channel_head(a, m, opt(lp), opt(lse), *w1, b1, w2, b2, pools,
                                                act);
  return out;
}

struct SpatialGate {
  at::Tensor gs, idx_c, smap, zconv, mean, invstd, var;  // var: for the running variance
};

// The spatial gate: its head in one op (spatial_head: stacked map, conv, BatchNorm in eval
// mode, sigmoid); with BatchNorm in training mode the op gives the conv output, and
// batch_norm_gate normalizes it with the batch statistics and takes the sigmoid.
SpatialGate spatial_gate(const at::Tensor& x, const OptT& scale, const std::string& order,
                         const at::Tensor& conv_w, const OptT& conv_b, bool batch_norm,
                         const OptT& bn_w, const OptT& bn_b, const OptT& bn_rm,
                         const OptT& bn_rv, bool bn_training, double bn_eps) {
  const int64_t n = x.size(0);
  std::vector<int64_t> shape{n, 1};
  for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(x.size(d));
  auto [u_flat, v_flat, idx_c] = pool_over_c(x, scale);
  const at::Tensor u = u_flat.reshape(shape), v = v_flat.reshape(shape);
  SpatialGate out;
  out.idx_c = idx_c;
  const bool bn_eval = batch_norm && !bn_training;
  const bool bn_batch = batch_norm && bn_training;
  const OptT none;
  std::tie(out.gs, out.smap, out.zconv) =
      spatial_head(u, v, conv_w, conv_b, bn_eval ? bn_w : none, bn_eval ? bn_b : none,
                   bn_eval ? bn_rm : none, bn_eval ? bn_rv : none, bn_eps, order, !bn_batch);
  if (bn_eval) {  // what native_batch_norm returns in eval mode: no batch statistics
    out.mean = at::empty({0}, u.options());
    out.invstd = at::empty({0}, u.options());
  }
  if (bn_batch) {
    TORCH_CHECK_VALUE(out.zconv.numel() > 1,
                      "Expected more than 1 value per channel when training, got input size ",
                      out.zconv.sizes(), " (the spatial map's BatchNorm)");
    std::tie(out.gs, out.mean, out.invstd, out.var) =
        batch_norm_gate(out.zconv, bn_w, bn_b, bn_eps);
  }
  return out;
}

std::vector<at::Tensor> cbam_block(const at::Tensor& x, const OptT& w1_in, const OptT& b1_in,
                                   const OptT& w2_in, const OptT& b2_in, const OptT& conv_w_in,
                                   const OptT& conv_b_in, const OptT& bn_w_in,
                                   const OptT& bn_b_in, const OptT& bn_rm_in,
                                   const OptT& bn_rv_in, c10::string_view pools_in,
                                   c10::string_view act_in, c10::string_view spatial_pools_in,
                                   int64_t arrangement, bool batch_norm, bool bn_training,
                                   double bn_eps) {
  // The heads run in the accumulation dtype whatever autocast the caller has on (a compiled
  // graph calls this kernel in the caller's autocast state)
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const std::string pools(pools_in), act(act_in), order(spatial_pools_in);
  const auto [w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv] = acc_params(
      x, w1_in, b1_in, w2_in, b2_in, conv_w_in, conv_b_in, bn_w_in, bn_b_in, bn_rm_in, bn_rv_in);
  const bool channel = w1.has_value(), spatial = conv_w.has_value();

  ChannelGate ch;
  SpatialGate sp;
  auto run_channel = [&](const OptT& scale) {
    ch = channel_gate(x, scale, pools, w1, b1, w2, b2, act);
  };
  auto run_spatial = [&](const OptT& scale) {
    sp = spatial_gate(x, scale, order, *conv_w, conv_b, batch_norm, bn_w, bn_b, bn_rm, bn_rv,
                      bn_training, bn_eps);
  };
  if (arrangement == 0) {  // channel first: the spatial gate pools x * gc
    if (channel) run_channel(std::nullopt);
    if (spatial) run_spatial(opt(ch.gc));
  } else if (arrangement == 1) {  // spatial first: the channel gate pools x * gs
    if (spatial) run_spatial(std::nullopt);
    if (channel) run_channel(opt(sp.gs));
  } else {  // parallel: both gates pool plain x
    if (channel) run_channel(std::nullopt);
    if (spatial) run_spatial(std::nullopt);
  }
  std::vector<at::Tensor> out{apply_gates(x, opt(ch.gc), opt(sp.gs)),
                              ch.gc, sp.gs, ch.idx_s, sp.idx_c, ch.p, ch.h,
                              sp.smap, sp.zconv, sp.mean, sp.invstd, sp.var};
  const auto empty_opts =
      x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  for (size_t i = 0; i < out.size(); ++i) {
    if (!out[i].defined()) {
      out[i] = at::empty({0}, empty_opts);
      continue;
    }
    for (size_t j = 0; j < i; ++j) {  // no two outputs share storage (zconv is zs without BN)
      if (out[i].numel() > 0 && out[j].numel() > 0 && out[i].is_alias_of(out[j])) {
        out[i] = out[i].clone();
        break;
      }
    }
  }
  return out;
}

}  // namespace
}  // namespace cbam

TORCH_LIBRARY_FRAGMENT(cbam_fused, m) {
  m.def(
      "cbam_block(Tensor x, Tensor? w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor? conv_w, "
      "Tensor? conv_b, Tensor? bn_w, Tensor? bn_b, Tensor? bn_rm, Tensor? bn_rv, str pools, "
      "str act, str spatial_pools, int arrangement, bool batch_norm, bool bn_training, "
      "float bn_eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(cbam_fused, CompositeExplicitAutograd, m) {
  m.impl("cbam_block", &cbam::cbam_block);
}
