// Launcher of the spatial gate's head (kernels/spatial_head.cuh): checks, outputs, one launch.
#include <string>

#include "kernels/spatial_head.cuh"
#include "launchers/common.h"
#include "launchers/spatial_head_common.h"

namespace cbam {

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_head(
    const at::Tensor& u_in, const at::Tensor& v_in, const at::Tensor& w_in,
    const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& bn_w_in,
    const std::optional<at::Tensor>& bn_b_in, const std::optional<at::Tensor>& bn_rm_in,
    const std::optional<at::Tensor>& bn_rv_in, double bn_eps, c10::string_view order_in,
    bool gate) {
  constexpr const char* op = "spatial_head";
  const c10::DeviceGuard device_guard(u_in.device());
  const int order = head_order(std::string(order_in), op);
  const int64_t nd = u_in.dim() - 2;
  TORCH_CHECK(nd >= 1 && nd <= 3 && u_in.size(1) == 1, op,
              ": avg must have shape [N, 1, *spatial] with 1 to 3 spatial dimensions, got ",
              u_in.sizes());
  TORCH_CHECK(u_in.scalar_type() == at::kFloat || u_in.scalar_type() == at::kDouble, op,
              ": avg must be float32 or float64 (the accumulation dtype), got ",
              u_in.scalar_type());
  check_like_head(v_in, u_in, op, "max", "avg");
  TORCH_CHECK(v_in.sizes() == u_in.sizes(), op, ": max must have the shape of avg ",
              u_in.sizes(), ", got ", v_in.sizes());
  const int cin = order == 2 ? 1 : 2;
  const int64_t k = check_head_conv_w(w_in, u_in, nd, cin, op, "avg");
  const at::Tensor b = head_scalar(b_in, u_in, op, "conv_b", "avg");
  const at::Tensor bn_w = head_scalar(bn_w_in, u_in, op, "bn_w", "avg");
  const at::Tensor bn_b = head_scalar(bn_b_in, u_in, op, "bn_b", "avg");
  const at::Tensor bn_rm = head_scalar(bn_rm_in, u_in, op, "bn_rm", "avg");
  const at::Tensor bn_rv = head_scalar(bn_rv_in, u_in, op, "bn_rv", "avg");
  check_head_bn(bn_w, bn_b, bn_rm, bn_rv, op);

  const at::Tensor u = u_in.contiguous(), v = v_in.contiguous(), w = w_in.contiguous();
  const int64_t N = u.size(0);
  int ext[3];  // D, H, W
  const int64_t S = head_extents(u, ext, op, "avg");
  std::vector<int64_t> map_shape = u.sizes().vec(), z_shape = u.sizes().vec();
  map_shape[1] = cin;
  const auto opts = u.options();
  at::Tensor smap = new_output(map_shape, opts);
  at::Tensor zconv = new_output(z_shape, opts);
  at::Tensor gs = gate ? new_output({N, S}, opts) : at::empty({0}, opts);
  if (N * S == 0) return {gs, smap, zconv};

  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    SpatialHeadArgs<acc_t> a;
    a.u = global_ptr<acc_t>(u);
    a.v = global_ptr<acc_t>(v);
    a.w = global_ptr<acc_t>(w);
    a.bias = opt_ptr<acc_t>(b);
    a.bn_w = opt_ptr<acc_t>(bn_w);
    a.bn_b = opt_ptr<acc_t>(bn_b);
    a.bn_rm = opt_ptr<acc_t>(bn_rm);
    a.bn_rv = opt_ptr<acc_t>(bn_rv);
    a.bn_eps = static_cast<acc_t>(bn_eps);
    a.gs = gate ? global_ptr<acc_t>(gs) : nullptr;
    a.smap = global_ptr<acc_t>(smap);
    a.zconv = global_ptr<acc_t>(zconv);
    set_head_geom(a, N, S, ext, nd, k, cin, order);
    // debug tile modes (tests): 1, one block (every chunk through the grid-stride loop); 2, no
    // staging (the taps read u and v in global memory); 3, blocks of kBlockThreads
    const int threads = head_block_threads(N * S, a.reach, [](int) { return true; });
    const int64_t blocks =
        std::min<int64_t>(ceil_div(N * S, threads), static_cast<int64_t>(num_sms()) * 16);
    const dim3 grid(debug::tile_mode == 1 ? 1u : static_cast<unsigned>(blocks));
    const int64_t stage_bytes =
        static_cast<int64_t>(cin) * (threads + 2 * a.reach) * sizeof(acc_t);
    if (stage_bytes <= kMaxHeadStageBytes && debug::tile_mode != 2) {
      launch(op, &spatial_head_kernel<acc_t, true>, grid, dim3(threads),
             static_cast<int>(stage_bytes), a);
    } else {
      launch(op, &spatial_head_kernel<acc_t, false>, grid, dim3(threads), 0, a);
    }
  });
  return {gs, smap, zconv};
}

}  // namespace cbam
