// Launcher of the spatial gate's head backward (kernels/spatial_head_backward.cuh): checks,
// outputs, two launches (the pass over the map, then the deterministic sums of the parameter
// gradients).
#include <string>

#include "kernels/spatial_head_backward.cuh"
#include "launchers/common.h"
#include "launchers/spatial_head_common.h"

namespace cbam {
namespace {

// A [N, S] (or [N, 1, *spatial]) argument shaped like `want`.
void check_head_map_arg(const at::Tensor& t, const at::Tensor& smap, at::IntArrayRef want,
                        const char* op, const char* arg) {
  check_like_head(t, smap, op, arg, "smap");
  TORCH_CHECK(t.sizes() == want, op, ": ", arg, " must have shape ", want, ", got ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
spatial_head_backward(const at::Tensor& grad_in, const std::optional<at::Tensor>& gs_in,
                      const at::Tensor& smap_in, const std::optional<at::Tensor>& zconv_in,
                      const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
                      const std::optional<at::Tensor>& bn_w_in,
                      const std::optional<at::Tensor>& bn_b_in,
                      const std::optional<at::Tensor>& bn_rm_in,
                      const std::optional<at::Tensor>& bn_rv_in, double bn_eps,
                      c10::string_view order_in) {
  constexpr const char* op = "spatial_head_backward";
  const c10::DeviceGuard device_guard(smap_in.device());
  const int order = head_order(std::string(order_in), op);
  const int cin = order == 2 ? 1 : 2;
  const int64_t nd = smap_in.dim() - 2;
  TORCH_CHECK(nd >= 1 && nd <= 3 && smap_in.size(1) == cin, op, ": smap must have shape [N, ",
              cin, ", *spatial] with 1 to 3 spatial dimensions, got ", smap_in.sizes());
  TORCH_CHECK(smap_in.scalar_type() == at::kFloat || smap_in.scalar_type() == at::kDouble, op,
              ": smap must be float32 or float64 (the accumulation dtype), got ",
              smap_in.scalar_type());
  int ext[3];  // D, H, W
  const int64_t S = head_extents(smap_in, ext, op, "smap");
  const int64_t N = smap_in.size(0);
  std::vector<int64_t> z_shape = smap_in.sizes().vec();
  z_shape[1] = 1;
  check_head_map_arg(grad_in, smap_in, {N, S}, op, "grad");
  const bool has_gs = gs_in.has_value() && gs_in->defined();
  if (has_gs) check_head_map_arg(*gs_in, smap_in, {N, S}, op, "gs");
  const bool has_zconv = zconv_in.has_value() && zconv_in->defined();
  if (has_zconv) check_head_map_arg(*zconv_in, smap_in, z_shape, op, "zconv");
  const int64_t k = check_head_conv_w(w_in, smap_in, nd, cin, op, "smap");
  const at::Tensor b = head_scalar(b_in, smap_in, op, "conv_b", "smap");
  const at::Tensor bn_w = head_scalar(bn_w_in, smap_in, op, "bn_w", "smap");
  const at::Tensor bn_b = head_scalar(bn_b_in, smap_in, op, "bn_b", "smap");
  const at::Tensor bn_rm = head_scalar(bn_rm_in, smap_in, op, "bn_rm", "smap");
  const at::Tensor bn_rv = head_scalar(bn_rv_in, smap_in, op, "bn_rv", "smap");
  check_head_bn(bn_w, bn_b, bn_rm, bn_rv, op);
  TORCH_CHECK(has_gs || !bn_rv.defined(), op,
              ": BatchNorm (bn_rm, bn_rv) needs gs (without gs, grad is the conv output's "
              "gradient)");
  TORCH_CHECK(has_zconv || !bn_rv.defined(), op, ": BatchNorm (bn_rm, bn_rv) needs zconv");

  const at::Tensor grad = grad_in.contiguous(), smap = smap_in.contiguous(),
                   w = w_in.contiguous();
  const at::Tensor gs = has_gs ? gs_in->contiguous() : at::Tensor();
  const at::Tensor zconv = has_zconv ? zconv_in->contiguous() : at::Tensor();
  const auto opts = smap.options();
  at::Tensor du = new_output({N, S}, opts), dv = new_output({N, S}, opts);
  at::Tensor dw = new_output(w.sizes(), opts);
  const auto scalar_grad = [&](const at::Tensor& p) {
    return p.defined() ? new_output({1}, opts) : at::empty({0}, opts);
  };
  at::Tensor db = scalar_grad(b), dbn_w = scalar_grad(bn_w), dbn_b = scalar_grad(bn_b);

  AT_DISPATCH_FLOATING_TYPES(smap.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    SpatialHeadBackwardArgs<acc_t> a;
    a.grad = global_ptr<acc_t>(grad);
    a.gs = opt_ptr<acc_t>(gs);
    a.smap = global_ptr<acc_t>(smap);
    a.zconv = opt_ptr<acc_t>(zconv);
    a.w = global_ptr<acc_t>(w);
    a.bn_w = opt_ptr<acc_t>(bn_w);
    a.bn_rm = opt_ptr<acc_t>(bn_rm);
    a.bn_rv = opt_ptr<acc_t>(bn_rv);
    a.bn_eps = static_cast<acc_t>(bn_eps);
    a.du = global_ptr<acc_t>(du);
    a.dv = global_ptr<acc_t>(dv);
    set_head_geom(a, N, S, ext, nd, k, cin, order);
    const int taps = cin * a.kd * a.kh * a.kw;
    const auto out_ptr = [](at::Tensor& t) {
      return t.numel() > 0 ? global_ptr<acc_t>(t) : nullptr;
    };
    a.L = taps + kHeadBackwardExtras;
    // chunks of 64 or 128 positions where 256 leave SMs idle (head_block_threads), while each
    // thread folds at most kMaxHeadSlotsPerThread slots: a chunk's parameter sums cost a thread
    // about (L / threads) x (its run of positions)
    const int threads = head_block_threads(
        N * S, a.reach, [&](int t) { return a.L <= t * kMaxHeadSlotsPerThread; });
    a.groups = a.L <= threads ? threads / a.L : 1;
    // Each block folds its chunks into one set of partial sums, so the grid is kept to a few
    // blocks an SM: the partials (L x blocks x groups) stay small for the second pass.
    // debug tile modes (tests): 1, one block (every chunk through the grid-stride loop); 2, no
    // staging (the taps read grad, gs and smap in global memory)
    const int64_t chunks = ceil_div(N * S, threads);
    const int64_t blocks =
        debug::tile_mode == 1 ? 1 : std::min<int64_t>(chunks, static_cast<int64_t>(num_sms()) * 4);
    const int64_t P = N * S == 0 ? 0 : blocks * a.groups;
    const at::Tensor partials = at::empty({a.L, std::max<int64_t>(P, 1)}, opts);
    a.partials = global_ptr<acc_t>(partials);
    if (N * S > 0) {
      const int64_t stage_bytes =
          static_cast<int64_t>(cin + 1) * (threads + 2 * a.reach) * sizeof(acc_t);
      const dim3 grid(static_cast<unsigned>(blocks));
      if (stage_bytes <= kMaxHeadStageBytes && debug::tile_mode != 2) {
        launch(op, &spatial_head_backward_kernel<acc_t, true>, grid, dim3(threads),
               static_cast<int>(stage_bytes), a);
      } else {
        launch(op, &spatial_head_backward_kernel<acc_t, false>, grid, dim3(threads), 0, a);
      }
    }
    // an empty batch: P = 0, every sum is 0
    launch(op, &spatial_head_backward_combine_kernel<acc_t>, dim3(static_cast<unsigned>(a.L)),
           dim3(kBlockThreads), 0, global_ptr<acc_t>(partials), P, a.L, taps,
           global_ptr<acc_t>(dw), out_ptr(db), out_ptr(dbn_w), out_ptr(dbn_b));
  });
  return {du, dv, dw, db, dbn_w, dbn_b};
}

}  // namespace cbam
