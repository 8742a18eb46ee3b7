// Launcher of the spatial gate's head (kernels/spatial_head.cuh): checks, outputs, one launch.
#include <string>

#include "kernels/spatial_head.cuh"
#include "launchers/common.h"

namespace cbam {
namespace {

// A [1] parameter of the head, checked; undefined when absent.
at::Tensor head_scalar(const std::optional<at::Tensor>& t, const at::Tensor& u, const char* arg) {
  constexpr const char* op = "spatial_head";
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == u.device(), op, ": ", arg, " must be on the device of avg (",
              u.device(), "), got ", t->device());
  TORCH_CHECK(t->numel() == 1 && t->dim() == 1, op, ": ", arg, " must have shape [1], got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == u.scalar_type(), op, ": ", arg, " must have the dtype of avg (",
              u.scalar_type(), "), got ", t->scalar_type());
  return t->contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_head(
    const at::Tensor& u_in, const at::Tensor& v_in, const at::Tensor& w_in,
    const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& bn_w_in,
    const std::optional<at::Tensor>& bn_b_in, const std::optional<at::Tensor>& bn_rm_in,
    const std::optional<at::Tensor>& bn_rv_in, double bn_eps, c10::string_view order_in,
    bool gate) {
  constexpr const char* op = "spatial_head";
  const c10::DeviceGuard device_guard(u_in.device());
  const std::string order(order_in);
  TORCH_CHECK(order == "max,mean" || order == "mean,max" || order == "blend", op,
              ": spatial_pools must be 'max,mean', 'mean,max' or 'blend', got '", order, "'");
  const int64_t nd = u_in.dim() - 2;
  TORCH_CHECK(nd >= 1 && nd <= 3 && u_in.size(1) == 1, op,
              ": avg must have shape [N, 1, *spatial] with 1 to 3 spatial dimensions, got ",
              u_in.sizes());
  TORCH_CHECK(u_in.scalar_type() == at::kFloat || u_in.scalar_type() == at::kDouble, op,
              ": avg must be float32 or float64 (the accumulation dtype), got ",
              u_in.scalar_type());
  TORCH_CHECK(v_in.device() == u_in.device(), op, ": max must be on the device of avg (",
              u_in.device(), "), got ", v_in.device());
  TORCH_CHECK(v_in.sizes() == u_in.sizes(), op, ": max must have the shape of avg ",
              u_in.sizes(), ", got ", v_in.sizes());
  TORCH_CHECK(v_in.scalar_type() == u_in.scalar_type(), op, ": max must have the dtype of avg (",
              u_in.scalar_type(), "), got ", v_in.scalar_type());
  const int cin = order == "blend" ? 1 : 2;
  TORCH_CHECK(w_in.device() == u_in.device(), op, ": conv_w must be on the device of avg (",
              u_in.device(), "), got ", w_in.device());
  TORCH_CHECK(w_in.scalar_type() == u_in.scalar_type(), op, ": conv_w must have the dtype of avg (",
              u_in.scalar_type(), "), got ", w_in.scalar_type());
  bool cubic = w_in.dim() == nd + 2 && w_in.size(0) == 1 && w_in.size(1) == cin;
  const int64_t k = cubic ? w_in.size(-1) : 0;
  for (int64_t d = 2; cubic && d < w_in.dim(); ++d) cubic = w_in.size(d) == k;
  TORCH_CHECK(cubic && k % 2 == 1, op, ": conv_w must have shape [1, ", cin, ", k",
              (nd > 1 ? ", k" : ""), (nd > 2 ? ", k" : ""), "] with an odd k, got ", w_in.sizes());
  int64_t taps = cin;
  for (int64_t d = 0; d < nd; ++d) taps *= k;
  TORCH_CHECK(taps <= kMaxHeadTaps, op, ": conv_w has ", taps, " weights, at most ", kMaxHeadTaps,
              " are supported");
  const at::Tensor b = head_scalar(b_in, u_in, "conv_b");
  const at::Tensor bn_w = head_scalar(bn_w_in, u_in, "bn_w");
  const at::Tensor bn_b = head_scalar(bn_b_in, u_in, "bn_b");
  const at::Tensor bn_rm = head_scalar(bn_rm_in, u_in, "bn_rm");
  const at::Tensor bn_rv = head_scalar(bn_rv_in, u_in, "bn_rv");
  TORCH_CHECK(bn_rm.defined() == bn_rv.defined(), op,
              ": bn_rm and bn_rv must be given together (BatchNorm in eval mode)");
  TORCH_CHECK(bn_rv.defined() || (!bn_w.defined() && !bn_b.defined()), op,
              ": bn_w and bn_b need bn_rm and bn_rv (BatchNorm in eval mode)");

  const at::Tensor u = u_in.contiguous(), v = v_in.contiguous(), w = w_in.contiguous();
  const int64_t N = u.size(0);
  int64_t S = 1;
  int ext[3] = {1, 1, 1};  // D, H, W
  for (int64_t d = 0; d < nd; ++d) S *= u.size(2 + d);
  TORCH_CHECK(S <= std::numeric_limits<int32_t>::max(), op,
              ": avg must have fewer than 2^31 spatial positions, got ", S);
  for (int64_t d = 0; d < nd; ++d) ext[3 - nd + d] = static_cast<int>(u.size(2 + d));
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
    a.N = N;
    a.S = S;
    a.D = ext[0];
    a.H = ext[1];
    a.W = ext[2];
    a.kd = nd > 2 ? static_cast<int>(k) : 1;
    a.kh = nd > 1 ? static_cast<int>(k) : 1;
    a.kw = static_cast<int>(k);
    a.cin = cin;
    a.order = order == "max,mean" ? 0 : order == "mean,max" ? 1 : 2;
    a.reach = static_cast<int64_t>(a.kd / 2) * a.H * a.W + static_cast<int64_t>(a.kh / 2) * a.W +
              a.kw / 2;
    // debug tile modes (tests): 1, one block (every chunk through the grid-stride loop); 2, no
    // staging (the taps read u and v in global memory)
    const dim3 grid = debug::tile_mode == 1 ? dim3(1) : grid_1d(N * S);
    const int64_t stage_bytes =
        static_cast<int64_t>(cin) * (kBlockThreads + 2 * a.reach) * sizeof(acc_t);
    if (stage_bytes <= kMaxHeadStageBytes && debug::tile_mode != 2) {
      launch(op, &spatial_head_kernel<acc_t, true>, grid, dim3(kBlockThreads),
             static_cast<int>(stage_bytes), a);
    } else {
      launch(op, &spatial_head_kernel<acc_t, false>, grid, dim3(kBlockThreads), 0, a);
    }
  });
  return {gs, smap, zconv};
}

}  // namespace cbam
