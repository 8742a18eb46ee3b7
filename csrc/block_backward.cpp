// The CBAM block's backward in closed form, cbam_fused::cbam_block_backward, in C++ (its
// CompositeExplicitAutograd kernel: every device). The same steps as the Python composite
// cbam_fused.functional._backward_composite, which is the op's fake kernel; tests check the two
// bitwise. In C++ for the reason block_forward.cpp is: host time.
//
//   rc, rs = backward_reduce(g, x, gc, gs)                          Q1: reads g and x
//   heads' backward: dgs = rs (+ Q2) -> spatial_head_backward -> du, dv, conv / BN grads;
//                                  dgc = rc (+ Q2) -> d pools, MLP grads
//   Q2 (channel first): dzc = pool_over_c_backward_scale(x, du, dv, ic, rc, gc)     reads x
//      (its store adds rc and takes the sigmoid's backward)
//      (spatial first): dgs = pool_over_s_backward_scale(x, da, dm, is, base=rs) (+ lp / lse)
//   dx = grad_input(g, gc, gs, da, dm, is, du, dv, ic)              Q3: reads g, writes dx
//        (grad_input_lp_lse with the official lp / lse pools: reads x too)
// Inputs: grad of y, x, the parameters, and what the forward saved (functional._SAVED; an empty
// tensor for an absent one). Returns [dx, then the gradients of the parameters given, in the order
// w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b], each in its parameter's dtype and shape (every
// parameter given gets one: no placeholders, which would cost an allocation each).
#include "block_common.h"

#include <map>

namespace cbam {
namespace {

using namespace block;  // NOLINT(build/namespaces): the helpers of block_common.h

OptT present(const OptT& t) {
  return t.has_value() && t->defined() && t->numel() > 0 ? t : std::nullopt;
}

// A saved tensor or parameter the backward of a gate needs: an error naming it, not a crash,
// when a direct call of the op leaves it out.
const at::Tensor& required(const OptT& t, const char* name) {
  TORCH_CHECK(t.has_value(), "cbam_block_backward: ", name,
              " is required by the arguments given (the forward's output or the gate's "
              "parameter)");
  return *t;
}


struct ChannelGrads {
  std::map<std::string, at::Tensor> dpool;  // by pool name
  at::Tensor dw1, db1, dw2, db2;
};

// The channel head's backward for dzc = d(pre-sigmoid channel logits): one op
// (channel_head_backward), then its dP split by pool (views; the blend's dP is both pools').
ChannelGrads channel_backward(const at::Tensor& dzc, const std::string& pools, const at::Tensor& p,
                              const at::Tensor& h, const at::Tensor& w1, const OptT& b1,
                              const OptT& w2, const OptT& b2, const std::string& act) {
  const int64_t n = dzc.size(0);
  ChannelGrads out;
  at::Tensor dp, db1, dw2, db2;
  std::tie(dp, out.dw1, db1, dw2, db2) =
      channel_head_backward(dzc, p, h, w1, w2, b1.has_value(), b2.has_value(), pools, act);
  if (b1.has_value()) out.db1 = db1;
  if (w2.has_value()) out.dw2 = dw2;
  if (b2.has_value()) out.db2 = db2;
  if (pools == "blend") {
    out.dpool["avg"] = dp;
    out.dpool["max"] = dp;
    return out;
  }
  const std::vector<std::string> kinds = split_pools(pools);
  for (size_t i = 0; i < kinds.size(); ++i) {
    const int64_t i64 = static_cast<int64_t>(i);
    out.dpool[kinds[i]] = dp.slice(0, i64 * n, (i64 + 1) * n);
  }
  return out;
}

struct SpatialGrads {
  at::Tensor du, dv, dcw, dcb, dbw, dbb;
};

// The spatial head's backward from dgs = d gs [N, S]: one spatial_head_backward op (the sigmoid's
// and BatchNorm's (eval) backward, the conv's, the map's split); with BatchNorm in training
// mode, batch_norm_gate_backward (the sigmoid's and the batch statistics' backward) first.
SpatialGrads spatial_backward(const at::Tensor& dgs, const at::Tensor& gs, const at::Tensor& smap,
                              const at::Tensor& zconv, const at::Tensor& conv_w, const OptT& conv_b,
                              bool batch_norm, const OptT& bn_w, const OptT& bn_b,
                              const OptT& bn_rm, const OptT& bn_rv, bool bn_training,
                              double bn_eps, const OptT& mean, const OptT& invstd,
                              const std::string& order) {
  SpatialGrads out;
  const OptT none;
  at::Tensor dcb, dbw, dbb;  // empty where the parameter is not given
  if (batch_norm && bn_training) {
    at::Tensor dzconv, no_bn_w, no_bn_b;
    std::tie(dzconv, dbw, dbb) =
        batch_norm_gate_backward(dgs, gs, zconv, required(mean, "mean"),
                                 required(invstd, "invstd"), bn_w, bn_b.has_value());
    std::tie(out.du, out.dv, out.dcw, dcb, no_bn_w, no_bn_b) = spatial_head_backward(
        dzconv, none, smap, none, conv_w, conv_b, none, none, none, none, bn_eps, order);
  } else {
    std::tie(out.du, out.dv, out.dcw, dcb, dbw, dbb) = spatial_head_backward(
        dgs, gs, smap, batch_norm ? OptT(zconv) : none, conv_w, conv_b,
        batch_norm ? bn_w : none, batch_norm ? bn_b : none, batch_norm ? bn_rm : none,
        batch_norm ? bn_rv : none, bn_eps, order);
  }
  if (dbw.numel() > 0) out.dbw = dbw;
  if (dbb.numel() > 0) out.dbb = dbb;
  if (dcb.numel() > 0) out.dcb = dcb;
  return out;
}

c10::MemoryFormat memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && x.is_contiguous(c10::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
    return c10::MemoryFormat::ChannelsLast;
  }
  if (x.dim() == 5 && x.is_contiguous(c10::MemoryFormat::ChannelsLast3d) && !x.is_contiguous()) {
    return c10::MemoryFormat::ChannelsLast3d;
  }
  return c10::MemoryFormat::Contiguous;
}

// A gradient computed in the accumulation dtype, in its parameter's dtype and shape.
at::Tensor back(const at::Tensor& g, const OptT& like) {
  at::Tensor out = g.scalar_type() == like->scalar_type() ? g : g.to(like->scalar_type());
  return out.sizes() == like->sizes() ? out : out.reshape(like->sizes());
}

std::vector<at::Tensor> cbam_block_backward(
    const at::Tensor& grad, const at::Tensor& x, const OptT& w1_in, const OptT& b1_in,
    const OptT& w2_in, const OptT& b2_in, const OptT& conv_w_in, const OptT& conv_b_in,
    const OptT& bn_w_in, const OptT& bn_b_in, const OptT& bn_rm_in, const OptT& bn_rv_in,
    const OptT& gc_in, const OptT& gs_in, const OptT& idx_s_in, const OptT& idx_c_in,
    const OptT& p_in, const OptT& h_in, const OptT& smap_in, const OptT& zconv_in,
    const OptT& mean_in, const OptT& invstd_in, c10::string_view pools_in,
    c10::string_view act_in, c10::string_view spatial_pools_in, int64_t arrangement,
    bool batch_norm, bool bn_training, double bn_eps) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const std::string pools(pools_in), act(act_in), order(spatial_pools_in);
  const auto [w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv] = acc_params(
      x, w1_in, b1_in, w2_in, b2_in, conv_w_in, conv_b_in, bn_w_in, bn_b_in, bn_rm_in, bn_rv_in);
  const OptT gc = present(gc_in), gs = present(gs_in), idx_s = present(idx_s_in),
             idx_c = present(idx_c_in), p = present(p_in), h = present(h_in),
             smap = present(smap_in), zconv = present(zconv_in), mean = present(mean_in),
             invstd = present(invstd_in);
  const bool channel = gc.has_value(), spatial = gs.has_value();
  const int64_t n = x.size(0);
  at::Tensor g = grad;
  if (g.strides() != x.strides()) g = g.contiguous(memory_format(x));  // e.g. NCHW g, NHWC x

  auto [rc, rs] = backward_reduce(g, x, gc, gs, channel, spatial);  // Q1
  const bool lp_lse = channel && has_lp_lse(pools);
  std::map<std::string, at::Tensor> pooled;  // the lp / lse pools, by name (inside p)
  if (lp_lse) {
    const auto kinds = split_pools(pools);
    for (size_t i = 0; i < kinds.size(); ++i) {
      pooled[kinds[i]] = p->slice(0, static_cast<int64_t>(i) * n,
                                  static_cast<int64_t>(i + 1) * n);
    }
  }
  ChannelGrads cg;
  SpatialGrads sg;
  auto channel_back = [&](const at::Tensor& dzc) {  // dzc: d of the channel gate's logits
    cg = channel_backward(dzc, pools, required(p, "p"), required(h, "h"), required(w1, "w1"), b1,
                          w2, b2, act);
  };
  auto spatial_back = [&](const at::Tensor& dgs) {
    sg = spatial_backward(dgs, *gs, required(smap, "smap"), required(zconv, "zconv"),
                          required(conv_w, "conv_w"), conv_b, batch_norm, bn_w, bn_b, bn_rm,
                          bn_rv, bn_training, bn_eps, mean, invstd, order);
  };
  auto dpool = [&](const char* name) {
    const auto it = cg.dpool.find(name);
    return it == cg.dpool.end() ? OptT() : OptT(it->second);
  };
  auto pool = [&](const char* name) {
    const auto it = pooled.find(name);
    return it == pooled.end() ? OptT() : OptT(it->second);
  };

  if (arrangement == 0) {  // channel first: the spatial gate pooled x * gc
    if (spatial) spatial_back(rs);
    if (channel) {
      // Q2, its store adding rc and taking the sigmoid's backward (no launch of their own)
      channel_back(spatial ? backward_scale("cbam_fused::pool_over_c_backward_scale", x,
                                            opt(sg.du), opt(sg.dv), idx_c, rc, gc)
                           : at::sigmoid_backward(rc, *gc));
    }
  } else if (arrangement == 1) {  // spatial first: the channel gate pooled x * gs
    if (channel) channel_back(at::sigmoid_backward(rc, *gc));
    if (spatial) {
      at::Tensor dgs = rs;
      if (channel) {  // Q2, its store adding rs
        dgs = lp_lse ? pool_over_s_backward_scale_lp_lse(x, dpool("avg"), dpool("max"), idx_s, gs,
                                                         dpool("lp"), pool("lp"), dpool("lse"),
                                                         pool("lse"), rs)
                     : backward_scale("cbam_fused::pool_over_s_backward_scale", x, dpool("avg"),
                                      dpool("max"), idx_s, rs, std::nullopt);
      }
      spatial_back(dgs);
    }
  } else {  // parallel: both gates pooled plain x, no Q2
    if (channel) channel_back(at::sigmoid_backward(rc, *gc));
    if (spatial) spatial_back(rs);
  }

  const OptT dm = dpool("max"), dv = opt(sg.dv);
  const OptT is = dm.has_value() ? idx_s : OptT(), ic = dv.has_value() ? idx_c : OptT();
  const at::Tensor dx =
      lp_lse ? grad_input_lp_lse(g, x, gc, gs, dpool("avg"), dm, is, opt(sg.du), dv, ic,
                                 dpool("lp"), pool("lp"), dpool("lse"), pool("lse"), arrangement)
             : grad_input(g, gc, gs, dpool("avg"), dm, is, opt(sg.du), dv, ic, arrangement);
  std::vector<at::Tensor> out{dx};
  const std::pair<const at::Tensor*, const OptT*> pgrads[] = {
      {&cg.dw1, &w1_in}, {&cg.db1, &b1_in}, {&cg.dw2, &w2_in}, {&cg.db2, &b2_in},
      {&sg.dcw, &conv_w_in}, {&sg.dcb, &conv_b_in}, {&sg.dbw, &bn_w_in}, {&sg.dbb, &bn_b_in}};
  for (const auto& [grad_p, param] : pgrads) {
    if (!param->has_value()) continue;
    TORCH_CHECK(grad_p->defined(), "cbam_block_backward: no gradient for a given parameter");
    out.push_back(back(*grad_p, *param));
  }
  return out;
}

}  // namespace
}  // namespace cbam

TORCH_LIBRARY_FRAGMENT(cbam_fused, m) {
  m.def(
      "cbam_block_backward(Tensor grad, Tensor x, Tensor? w1, Tensor? b1, Tensor? w2, "
      "Tensor? b2, Tensor? conv_w, Tensor? conv_b, Tensor? bn_w, Tensor? bn_b, Tensor? bn_rm, "
      "Tensor? bn_rv, Tensor? gc, Tensor? gs, Tensor? idx_s, Tensor? idx_c, Tensor? p, "
      "Tensor? h, Tensor? smap, Tensor? zconv, Tensor? mean, Tensor? invstd, str pools, "
      "str act, str spatial_pools, int arrangement, bool batch_norm, bool bn_training, "
      "float bn_eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(cbam_fused, CompositeExplicitAutograd, m) {
  m.impl("cbam_block_backward", &cbam::cbam_block_backward);
}
